#pragma once

/// @file
/// The glue between the db and lifecycle layers: run the process-wide pool and pending writes as
/// lifecycle components.

#include "pgrt/service/metrics.hpp"           // IWYU pragma: export
#include "pgrt/service/metrics_endpoint.hpp"  // IWYU pragma: export
#include "pgrt/service/pool_component.hpp"    // IWYU pragma: export
#include "pgrt/service/startup_hygiene.hpp"   // IWYU pragma: export
#include "pgrt/service/watchdog.hpp"          // IWYU pragma: export
