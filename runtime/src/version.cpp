#include "pgrt/runtime/version.hpp"

namespace pgrt {

namespace {
#define PGRT_STRINGIFY_IMPL(x) #x
#define PGRT_STRINGIFY(x) PGRT_STRINGIFY_IMPL(x)
constexpr std::string_view compiled_version = PGRT_STRINGIFY(PGRT_VERSION);
#undef PGRT_STRINGIFY
#undef PGRT_STRINGIFY_IMPL
}  // namespace

std::string_view version_string() noexcept {
  return compiled_version;
}

}  // namespace pgrt
