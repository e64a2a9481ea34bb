#include "options_check.hpp"

namespace pgrt::detail {

std::optional<Diagnostics> connect_options_problem(const ConnectOptions& options,
                                                   std::string_view prefix) {
  const std::string p(prefix);
  if (options.connect_timeout.count() <= 0) {
    return Diagnostics{.message = p + "connect_timeout is " +
                                  show_duration(options.connect_timeout) +
                                  ", which is not positive",
                       .hint = "give the longest a connect may take, e.g. 10 s (the default)"};
  }
  if (auto problem = longer_than_a_year(p + "connect_timeout", options.connect_timeout, "")) {
    return problem;
  }
  if (auto problem = negative_or_too_long(
          p + "tcp_user_timeout", options.tcp_user_timeout,
          "the system default (in a pool: its guards.tcp_user_timeout, when that is set)")) {
    return problem;
  }
  if (auto problem =
          longer_than_int_milliseconds(p + "tcp_user_timeout", options.tcp_user_timeout, "libpq")) {
    return problem;
  }
  if (auto problem = negative_or_too_long(p + "cancel_timeout", options.cancel_timeout,
                                          "closing a connection at once after a cancel, without "
                                          "waiting for the statement to end")) {
    return problem;
  }
  if (options.keepalives) {
    if (auto problem = negative_or_too_long(p + "keepalives.idle", options.keepalives->idle,
                                            "the system default")) {
      return problem;
    }
    if (auto problem = negative_or_too_long(p + "keepalives.interval", options.keepalives->interval,
                                            "the system default")) {
      return problem;
    }
    if (options.keepalives->count < 0) {
      return Diagnostics{.message = p + "keepalives.count is " +
                                    std::to_string(options.keepalives->count) +
                                    ", which is negative",
                         .hint = "give a positive number of probes, or 0 for the system default"};
    }
  }
  return std::nullopt;
}

}  // namespace pgrt::detail
