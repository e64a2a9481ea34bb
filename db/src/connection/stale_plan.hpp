#pragma once

// How a statement that did not run because its prepared plan went stale is told apart, for the
// callers of Connection::run() (pending writes): the server's 0A000 for a stale plan
// (is_stale_plan(): "cached plan must not change result type", told by the routine) and a
// genuine 0A000 (feature_not_supported) share the SQLSTATE, so run() gives the first a hint of
// its own, which this names.

#include <string_view>

#include "pgrt/db/error.hpp"

namespace pgrt::detail {

// The start of the hint Connection::run() gives a statement of a pipeline that did not run
// because its plan went stale, inside a transaction block (the statement cache has retired it:
// run again, it is prepared again, or runs unnamed inside a transaction block).
inline constexpr std::string_view stale_plan_hint =
    "the statement's result changed shape since it was prepared (an ALTER TABLE under a SELECT "
    "*), so it did not run";

// Whether `diagnostics` are those of a statement that did not run because its plan went stale.
inline bool not_run_for_a_stale_plan(const Diagnostics& diagnostics) {
  return diagnostics.sqlstate == "0A000" && diagnostics.hint.starts_with(stale_plan_hint);
}

}  // namespace pgrt::detail
