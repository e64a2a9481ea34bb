#pragma once

// Reading configuration from the environment and refusing a bad value, the same way in every
// component of the service library (internal).

#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "pgrt/db/error.hpp"

namespace pgrt::detail {

// Throws pgrt::Error with client_errc::invalid_config: `message` says which value is wrong and
// why, `hint` what to give instead.
[[noreturn]] inline void invalid(std::string message, std::string hint) {
  throw Error(make_error_code(client_errc::invalid_config),
              Diagnostics{.message = std::move(message), .hint = std::move(hint)});
}

// The environment variable `name`, or nothing when it is unset.
inline std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): read at start-up
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

}  // namespace pgrt::detail
