#pragma once

// Range checks of the settings a connection is made with, shared by Connection::connect() and
// PoolConfig::validate() (which checks the same ConnectOptions inside a pool's config).

#include <chrono>
#include <limits>
#include <optional>
#include <ratio>
#include <string>
#include <string_view>
#include <type_traits>

#include "pgrt/db/connection.hpp"
#include "pgrt/db/error.hpp"

namespace pgrt::detail {

// The longest a duration setting may be. Durations are added to steady_clock instants, which
// count nanoseconds (about 292 years in all): a "forever" such as milliseconds::max() would
// overflow and turn into a deadline in the past. Where a setting has a "never" or "off", it is 0.
inline constexpr std::chrono::hours longest_duration{24 * 365};

// A duration as a message shows it: seconds for a setting in seconds, milliseconds otherwise.
template <typename Rep, typename Period>
std::string show_duration(std::chrono::duration<Rep, Period> value) {
  if constexpr (std::is_same_v<Period, std::ratio<1>>) {
    return std::to_string(value.count()) + " s";
  } else {
    return std::to_string(std::chrono::milliseconds(value).count()) + " ms";
  }
}

// What is wrong with `value`, named `field`, when it is longer than longest_duration (`instead`
// ends the hint: the setting's other choices), or nothing.
template <typename Rep, typename Period>
std::optional<Diagnostics> longer_than_a_year(std::string_view field,
                                              std::chrono::duration<Rep, Period> value,
                                              std::string_view instead) {
  if (value <= longest_duration) return std::nullopt;
  return Diagnostics{
      .message = std::string(field) + " is " + show_duration(value) + ", longer than a year",
      .hint = "give at most 365 days (8760 h)" + std::string(instead)};
}

// What is wrong with a duration that may be zero (meaning `zero_means`) but never negative, nor
// longer than a year; or nothing.
template <typename Rep, typename Period>
std::optional<Diagnostics> negative_or_too_long(std::string_view field,
                                                std::chrono::duration<Rep, Period> value,
                                                std::string_view zero_means) {
  if (auto problem = longer_than_a_year(field, value, ", or 0 for " + std::string(zero_means))) {
    return problem;
  }
  if (value.count() >= 0) return std::nullopt;
  return Diagnostics{
      .message = std::string(field) + " is " + show_duration(value) + ", which is negative",
      .hint = "give a positive duration, or 0 for " + std::string(zero_means)};
}

// What is wrong with a setting (`field`) that `reader` ("libpq", "the server") takes as an int of
// milliseconds (at most about 24.8 days), when `value` is longer; or nothing.
inline std::optional<Diagnostics> longer_than_int_milliseconds(std::string_view field,
                                                               std::chrono::milliseconds value,
                                                               std::string_view reader) {
  constexpr std::chrono::milliseconds most{std::numeric_limits<int>::max()};
  if (value <= most) return std::nullopt;
  return Diagnostics{.message = std::string(field) + " is " + show_duration(value) +
                                ", longer than " + std::string(reader) + " takes (" +
                                show_duration(most) + ")",
                     .hint = "give at most 2147483647 ms (about 24.8 days), or 0"};
}

// The first of `options`' durations and numbers out of range, as a message and hint naming the
// field after `prefix` ("ConnectOptions::", or "connect." in a PoolConfig); nothing when all are
// in range.
std::optional<Diagnostics> connect_options_problem(const ConnectOptions& options,
                                                   std::string_view prefix);

}  // namespace pgrt::detail
