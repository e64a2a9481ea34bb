#include "pgrt/service/pool_component.hpp"

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <spdlog/spdlog.h>
#include <string>
#include <utility>
#include <vector>

#include "pgrt/db/deadline.hpp"
#include "start_wait.hpp"

namespace pgrt {

namespace asio = boost::asio;

namespace {
// The first acquire binds the pool to the executor it runs on: run it on the component's
// executor, not on the manager's strand that start() runs on.
asio::awaitable<void> open_first_connection() {
  Lease lease = co_await pgrt::connection();
  co_await lease->query("SELECT 1");
}
// Closes the process-wide pool, if it is still configured (a failed start closed it already).
// The component is the pool's only closer, so the pool cannot go between the two calls.
asio::awaitable<std::vector<std::string>> close_process_pool(std::chrono::milliseconds grace) {
  Pool* current = nullptr;
  try {
    current = &pgrt::pool();
  } catch (const Error&) {
    co_return std::vector<std::string>{};
  }
  co_return co_await current->close(grace);
}

}  // namespace

PoolComponentOptions PoolComponentOptions::from_env() {
  PoolComponentOptions options;
  options.start_wait = detail::start_wait_from_env(options.start_wait);
  return options;
}

PoolComponent::PoolComponent(asio::any_io_executor executor, PoolConfig config,
                             PoolComponentOptions options)
    : executor_(std::move(executor)), options_(options) {
  configure(std::move(config));
}

asio::awaitable<void> PoolComponent::wait_for_database() {
  // Each attempt is bounded, so that the reason (the pool's last connect error) is re-read and
  // logged when it changes while the pool retries.
  auto attempt = []() -> asio::awaitable<void> {
    // Only the wait for a connection is bounded: a slow first query is not cut short.
    Lease lease;
    std::exception_ptr failure;
    try {
      lease = co_await with_timeout(pgrt::connection(), std::chrono::milliseconds(1'000));
    } catch (const Error&) {
      failure = std::current_exception();
    }
    if (failure) {
      // The wait only timed out: what the pool's connects failed with decides whether waiting
      // can cure it (a wrong password, a missing database cannot).
      const PoolStats stats = pgrt::pool().stats();
      if (stats.last_connect_error_code && !detail::worth_waiting(stats.last_connect_error_code)) {
        throw Error(stats.last_connect_error_code,
                    Diagnostics{.message = stats.last_connect_error});
      }
      std::rethrow_exception(failure);
    }
    co_await lease->query("SELECT 1");
  };
  auto reason_of = [](const Error& error) {
    std::string last_connect_error = pgrt::pool().stats().last_connect_error;
    return last_connect_error.empty() ? std::string(error.what()) : last_connect_error;
  };
  co_await detail::retry_until_the_database_answers(attempt, options_.start_wait, reason_of);
}

asio::awaitable<void> PoolComponent::start() {
  std::exception_ptr failure;
  try {
    if (options_.check_connection) {
      if (options_.start_wait.count() > 0) {
        co_await asio::co_spawn(executor_, wait_for_database(), asio::use_awaitable);
      } else {
        co_await asio::co_spawn(executor_, open_first_connection(), asio::use_awaitable);
      }
      spdlog::info("pgrt: the pool {} is up (max {})", pgrt::pool().application_name(),
                   pgrt::pool().config().max_size);
    }
    co_return;
  } catch (...) {
    failure = std::current_exception();
  }
  // A start that was cancelled (a stop requested while the database is awaited, the start
  // timeout, another component's failure) closes the pool too: the close must not see that
  // cancellation (it threw at the close's first wait, and the pool outlived the manager's
  // io_context).
  co_await asio::this_coro::reset_cancellation_state();
  co_await asio::this_coro::throw_if_cancelled(false);
  co_await close_process_pool(std::chrono::milliseconds(0));
  std::rethrow_exception(failure);
}

asio::awaitable<void> PoolComponent::stop() {
  const auto outstanding = co_await close_process_pool(options_.close_grace);
  if (!outstanding.empty()) {
    spdlog::warn("pgrt: the pool closed with {} lease(s) interrupted", outstanding.size());
  }
}

PoolComponent& add_pool(lifecycle::Manager& app, PoolConfig config, PoolComponentOptions options,
                        lifecycle::After dependencies) {
  lifecycle::ComponentLimits limits;
  if (options.check_connection && options.start_wait.count() > 0) {
    limits.start_timeout = options.start_wait + std::chrono::milliseconds(5'000);
  }
  auto& component = app.add(PoolComponent(app.executor(), std::move(config), options),
                            std::move(dependencies), limits);
  // The pool's own handle, not pgrt::pool(): the process-wide pool is forgotten as its close()
  // begins, and a stop abandoned at the end of the shutdown budget leaves its leases out.
  app.on_exit([close_now = pgrt::pool().close_now_handle()] { close_now(); });
  return component;
}

}  // namespace pgrt
