#pragma once

// A start that waits for the database (PoolComponent, StartupHygiene): `attempt` is retried while
// its error is one that waiting can cure, each new reason logged once, until `start_wait` has
// passed since the first attempt.

#include <algorithm>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <spdlog/spdlog.h>
#include <string>

#include "config_input.hpp"
#include "pgrt/db/error.hpp"

namespace pgrt::detail {

// Whether waiting can cure `error`: the server is down, starting up, shutting down or full, or
// a bounded wait for a connection ended (the pool keeps retrying meanwhile).
inline bool worth_waiting(const boost::system::error_code& code) {
  return code == condition::connection_error || code == condition::too_many_connections ||
         code == client_errc::timeout || code == client_errc::pool_timeout ||
         code == client_errc::name_resolution;
}

// PGRT_START_WAIT_S (whole seconds, 0-86400), or `fallback` when it is unset; a malformed value
// throws Error(client_errc::invalid_config). Read by both components that wait.
inline std::chrono::milliseconds start_wait_from_env(std::chrono::milliseconds fallback) {
  const auto text = env("PGRT_START_WAIT_S");
  if (!text) return fallback;
  return std::chrono::seconds(
      whole_number("PGRT_START_WAIT_S", *text, 0, 86'400,
                   "expected whole seconds, 0-86400 (0: do not wait for the database at start)"));
}

// Runs `attempt` until it completes. An error worth waiting for is retried after a pause (100 ms
// doubling to 1 s), its reason (`reason_of`, newlines folded) logged when it differs from the
// last one logged; once `start_wait` has passed, the last such error is thrown, saying so. Any
// other error is thrown at once.
inline boost::asio::awaitable<void> retry_until_the_database_answers(
    const std::function<boost::asio::awaitable<void>()>& attempt,
    std::chrono::milliseconds start_wait,
    const std::function<std::string(const Error&)>& reason_of) {
  using Clock = std::chrono::steady_clock;
  using std::chrono::milliseconds;
  // (Saturated: a start_wait too long to add to the clock, milliseconds::max() for one, waits
  // without a limit; the sum would overflow into the past and give up after the first try.)
  const auto now = Clock::now();
  const auto deadline =
      std::chrono::duration_cast<milliseconds>(Clock::time_point::max() - now) <= start_wait
          ? Clock::time_point::max()
          : now + start_wait;
  std::string logged;
  auto pause = milliseconds(100);
  for (int attempts = 1;; ++attempts) {
    std::string reason;
    try {
      co_await attempt();
      if (!logged.empty())
        spdlog::info("pgrt: the database answers, after {} attempt(s)", attempts);
      co_return;
    } catch (const Error& error) {
      if (!worth_waiting(error.code())) throw;
      reason = reason_of(error);
      std::replace(reason.begin(), reason.end(), '\n', ' ');
      std::replace(reason.begin(), reason.end(), '\t', ' ');
      if (Clock::now() >= deadline) {
        throw Error(error.code(),
                    Diagnostics{.message = "the database did not answer within " +
                                           std::to_string(start_wait.count()) +
                                           " ms of the start: " + reason,
                                .hint = "PGRT_START_WAIT_S (the start_wait options) bounds how "
                                        "long a start waits for the database"});
      }
    }
    if (reason != logged) {
      spdlog::warn("pgrt: waiting for the database (up to {} ms): {}", start_wait.count(), reason);
      logged = reason;
    }
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor,
                                    std::clamp(std::min(pause, left), milliseconds(0), pause));
    co_await timer.async_wait(boost::asio::use_awaitable);
    pause = std::min(pause * 2, milliseconds(1'000));
  }
}

}  // namespace pgrt::detail
