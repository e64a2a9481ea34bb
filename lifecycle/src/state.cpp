#include "pgrt/lifecycle/state.hpp"

namespace pgrt::lifecycle {

std::string_view to_string(State state) noexcept {
  switch (state) {
    case State::created:
      return "created";
    case State::starting:
      return "starting";
    case State::running:
      return "running";
    case State::stopping:
      return "stopping";
    case State::stopped:
      return "stopped";
    case State::failed:
      return "failed";
  }
  return "unknown";
}

}  // namespace pgrt::lifecycle
