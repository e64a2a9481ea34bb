#pragma once

/// @file
/// The lifecycle layer: components, the manager, states, supervised child processes. Knows nothing
/// of databases.

#include "pgrt/lifecycle/child_process.hpp"  // IWYU pragma: export
#include "pgrt/lifecycle/component.hpp"      // IWYU pragma: export
#include "pgrt/lifecycle/manager.hpp"        // IWYU pragma: export
#include "pgrt/lifecycle/state.hpp"          // IWYU pragma: export
