#pragma once

// Reading configuration from the environment and refusing a bad value, the same way in every
// component of the service library (internal).

#include <charconv>
#include <cstddef>
#include <cstdlib>
#include <optional>
#include <string>
#include <system_error>
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

// `text`, the value of the variable `name`, as a whole number from `min` to `max`: digits only (no
// white space, no sign), as every numeric PGRT_* variable is read; else invalid_config naming
// the variable, with `hint`.
inline long long whole_number(const char* name, const std::string& text, long long min,
                              long long max, std::string hint) {
  long long value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || text.front() == '-' || error != std::errc() ||
      end != text.data() + text.size() || value < min || value > max) {
    invalid(std::string(name) + "='" + text + "' is not valid", std::move(hint));
  }
  return value;
}

// `text`, the value of the variable `name`, as a plain decimal number ("0.8", "1", ".5"): digits
// with at most one '.', read the same in every locale; no white space, sign, exponent, hex float,
// "nan" or "inf". From `min` to `max`, `min` itself excluded when `above_min`; else
// invalid_config naming the variable, with `hint`.
inline double decimal_number(const char* name, const std::string& text, double min, double max,
                             bool above_min, std::string hint) {
  std::size_t digits = 0;
  std::size_t points = 0;
  for (const char c : text) {
    digits += c >= '0' && c <= '9' ? 1 : 0;
    points += c == '.' ? 1 : 0;
  }
  double value = 0;
  const char* const last = text.data() + text.size();
  const auto [end, error] = std::from_chars(text.data(), last, value, std::chars_format::fixed);
  if (digits == 0 || digits + points != text.size() || points > 1 || error != std::errc() ||
      end != last || value < min || (above_min && value == min) || value > max) {
    invalid(std::string(name) + "='" + text + "' is not valid", std::move(hint));
  }
  return value;
}

}  // namespace pgrt::detail
