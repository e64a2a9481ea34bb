#include "pgrt/runtime/event.hpp"

#include <spdlog/spdlog.h>
#include <string>

namespace pgrt {

void detail::log_subscriber_exception(const std::string& source, const char* what) noexcept {
  try {
    if (what != nullptr) {
      spdlog::error("{}: an event subscriber threw: {}", source, what);
    } else {
      spdlog::error("{}: an event subscriber threw", source);
    }
  } catch (...) {  // NOLINT(bugprone-empty-catch): nothing more can be done for a log line
  }
}

}  // namespace pgrt
