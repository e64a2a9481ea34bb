#include "pgrt/db/session_guards.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace pgrt {

ConnectOptions with_session_guards(ConnectOptions options, const SessionGuards& guards) {
  // Behind a transaction pooler no server setting can be sent or kept (docs/operations.md,
  // "Behind a pooler"): only the client's own TCP guards apply.
  const bool server_settings = options.pooler != Pooler::transaction;
  auto add_setting = [&options, server_settings](const std::string& name, long long value) {
    if (value <= 0 || !server_settings) return;
    const bool given = std::any_of(options.session_settings.begin(), options.session_settings.end(),
                                   [&name](const auto& setting) { return setting.first == name; });
    if (given) return;
    options.session_settings.insert(options.session_settings.begin(),
                                    {name, std::to_string(value)});
  };
  add_setting("idle_in_transaction_session_timeout", guards.idle_in_transaction_timeout.count());
  add_setting("client_connection_check_interval", guards.client_connection_check_interval.count());
  if (!guards.keepalives) options.keepalives.reset();
  if (options.tcp_user_timeout.count() == 0) options.tcp_user_timeout = guards.tcp_user_timeout;
  // The server's side of the same TCP guards, so that it too ends a session whose client it can
  // no longer reach (a lost host, a partition): without them an idle backend waits for its
  // client forever. They apply to TCP connections only (the server ignores them on a unix
  // socket).
  if (options.keepalives) {
    add_setting("tcp_keepalives_idle", options.keepalives->idle.count());
    add_setting("tcp_keepalives_interval", options.keepalives->interval.count());
    add_setting("tcp_keepalives_count", options.keepalives->count);
  }
  add_setting("tcp_user_timeout", options.tcp_user_timeout.count());
  return options;
}

namespace {

using std::chrono::milliseconds;

// Far beyond any bound that matters (ten years), and far within milliseconds' range: what the
// server's settings allow (INT_MAX seconds apart, INT_MAX probes) saturates here.
constexpr double longest_ms = 10.0 * 366 * 24 * 3600 * 1000;

// A time setting's value as the server reads it: a number, in `base` units or with one of its
// own (us, ms, s, min, h, d). Nothing for what is not one (the keyword `default`; anything else
// the server refuses at connect).
std::optional<milliseconds> setting_duration(std::string_view text, milliseconds base) {
  const auto blank = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!text.empty() && blank(text.front())) text.remove_prefix(1);
  while (!text.empty() && blank(text.back())) text.remove_suffix(1);
  double number = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), number);
  if (error != std::errc{} || !(number >= 0) || number > 1e15) return std::nullopt;
  std::string_view unit(end, static_cast<std::size_t>(text.data() + text.size() - end));
  while (!unit.empty() && blank(unit.front())) unit.remove_prefix(1);
  double unit_ms = 0;
  if (unit.empty()) {
    unit_ms = static_cast<double>(base.count());
  } else if (unit == "us") {
    unit_ms = 0.001;
  } else if (unit == "ms") {
    unit_ms = 1;
  } else if (unit == "s") {
    unit_ms = 1000;
  } else if (unit == "min") {
    unit_ms = 60'000;
  } else if (unit == "h") {
    unit_ms = 3'600'000;
  } else if (unit == "d") {
    unit_ms = 86'400'000;
  } else {
    return std::nullopt;
  }
  return milliseconds(static_cast<std::int64_t>(std::min(std::ceil(number * unit_ms), longest_ms)));
}

}  // namespace

std::chrono::milliseconds backend_end_bound(const ConnectOptions& guarded) {
  if (!guarded.keepalives) return milliseconds(0);
  // The server's keepalives and checks as it will run them: the guards' (in session_settings, as
  // with_session_guards() put them), unless the caller set its own there (the last one given
  // wins, as at the server). 0, or `default`, is the operating system's keepalive default
  // (Linux: 7200 s idle, 75 s apart, 9 probes).
  milliseconds idle = guarded.keepalives->idle;
  milliseconds interval = guarded.keepalives->interval;
  std::int64_t count = guarded.keepalives->count;
  milliseconds user_timeout = guarded.tcp_user_timeout;
  milliseconds check{0};
  const auto positive_or = [](std::optional<milliseconds> value, milliseconds otherwise) {
    return value && value->count() > 0 ? *value : otherwise;
  };
  for (const auto& [name, value] : guarded.session_settings) {
    if (name == "tcp_keepalives_idle") {
      idle = positive_or(setting_duration(value, std::chrono::seconds(1)), std::chrono::hours(2));
    } else if (name == "tcp_keepalives_interval") {
      interval =
          positive_or(setting_duration(value, std::chrono::seconds(1)), std::chrono::seconds(75));
    } else if (name == "tcp_keepalives_count") {
      std::int64_t probes = 0;
      const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), probes);
      count = error == std::errc{} && end == value.data() + value.size() && probes > 0 ? probes : 9;
    } else if (name == "tcp_user_timeout") {
      user_timeout = setting_duration(value, milliseconds(1)).value_or(milliseconds(0));
    } else if (name == "client_connection_check_interval") {
      check = setting_duration(value, milliseconds(1)).value_or(milliseconds(0));
    }
  }
  const double unreachable = static_cast<double>(idle.count()) +
                             static_cast<double>(interval.count()) * static_cast<double>(count);
  const double bound = std::max(unreachable, static_cast<double>(user_timeout.count())) +
                       static_cast<double>(check.count());
  return milliseconds(static_cast<std::int64_t>(std::min(bound, longest_ms)));
}

}  // namespace pgrt
