#include "pgrt/db/session_guards.hpp"

#include <algorithm>
#include <chrono>
#include <string>

namespace pgrt {

ConnectOptions with_session_guards(ConnectOptions options, const SessionGuards& guards) {
  auto add_setting = [&options](const std::string& name, std::chrono::milliseconds value) {
    if (value.count() <= 0) return;
    const bool given = std::any_of(options.session_settings.begin(), options.session_settings.end(),
                                   [&name](const auto& setting) { return setting.first == name; });
    if (given) return;
    options.session_settings.insert(options.session_settings.begin(),
                                    {name, std::to_string(value.count())});
  };
  add_setting("idle_in_transaction_session_timeout", guards.idle_in_transaction_timeout);
  add_setting("client_connection_check_interval", guards.client_connection_check_interval);
  if (!guards.keepalives) options.keepalives.reset();
  if (options.tcp_user_timeout.count() == 0) options.tcp_user_timeout = guards.tcp_user_timeout;
  return options;
}

}  // namespace pgrt
