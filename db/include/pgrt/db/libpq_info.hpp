#pragma once

/// @file
/// Facts about the libpq that pgrt was linked against, for start-up checks and diagnostics.

namespace pgrt {

/// The libpq version in PostgreSQL's numeric form (for example 150018 for 15.18), from
/// `PQlibVersion()`. Pipeline mode needs 140000 or later.
///
/// Thread safety: may be called from any thread. Never throws.
[[nodiscard]] int libpq_version() noexcept;

/// Whether libpq was built thread-safe (`PQisthreadsafe()`). pgrt requires it: connections may be
/// used from more than one thread over their life.
///
/// Thread safety: may be called from any thread. Never throws.
[[nodiscard]] bool libpq_is_thread_safe() noexcept;

}  // namespace pgrt
