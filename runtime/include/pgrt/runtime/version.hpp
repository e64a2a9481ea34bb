#pragma once

/// @file
/// The version of the pgrt library, for logs and diagnostics.

#include <string_view>

namespace pgrt {

/// The version the headers in use belong to. Kept equal to the CMake project version (a test
/// checks).
inline constexpr int version_major = 0;
inline constexpr int version_minor = 1;
inline constexpr int version_patch = 0;

/// The version of the compiled library, as "major.minor.patch".
///
/// Compare it with the `version_*` constants to detect headers and library from different builds.
/// Thread safety: may be called from any thread. Never throws.
[[nodiscard]] std::string_view version_string() noexcept;

}  // namespace pgrt
