#include "pgrt/db/session_guards.hpp"

#include <algorithm>
#include <chrono>
#include <string>

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

std::chrono::milliseconds backend_end_bound(const ConnectOptions& guarded) {
  if (!guarded.keepalives) return std::chrono::milliseconds(0);
  const auto& keepalives = *guarded.keepalives;
  const std::chrono::milliseconds unreachable =
      keepalives.idle + keepalives.interval * keepalives.count;
  std::chrono::milliseconds check{0};
  for (const auto& [name, value] : guarded.session_settings) {
    if (name == "client_connection_check_interval")
      check = std::chrono::milliseconds(std::stoll(value));
  }
  return std::max(unreachable, guarded.tcp_user_timeout) + check;
}

}  // namespace pgrt
