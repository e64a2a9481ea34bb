#pragma once

/// @file
/// The states a lifecycle-managed process goes through.

#include <string_view>

namespace pgrt::lifecycle {

/// Where a process managed by pgrt is in its life. It only moves forward:
/// created -> starting -> running -> stopping -> stopped; a start that fails goes
/// starting -> stopping -> failed, and a stop requested during the start starting -> stopping ->
/// stopped.
enum class State {
  created,   ///< Components added, nothing started.
  starting,  ///< Components are starting along their dependencies.
  running,   ///< Every component started; the process is ready.
  stopping,  ///< A shutdown is in progress.
  stopped,   ///< Every started component was stopped (or abandoned after its deadline).
  failed,    ///< A component failed to start; what had started was stopped again.
};

/// The state's name as written in logs ("created", "starting", ...). Never throws.
[[nodiscard]] std::string_view to_string(State state) noexcept;

}  // namespace pgrt::lifecycle
