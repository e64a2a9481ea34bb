#include "pgrt/service/pool_component.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <exception>
#include <spdlog/spdlog.h>
#include <utility>
#include <vector>

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

PoolComponent::PoolComponent(asio::any_io_executor executor, PoolConfig config,
                             PoolComponentOptions options)
    : executor_(std::move(executor)), options_(options) {
  configure(std::move(config));
}

asio::awaitable<void> PoolComponent::start() {
  std::exception_ptr failure;
  try {
    if (options_.check_connection) {
      co_await asio::co_spawn(executor_, open_first_connection(), asio::use_awaitable);
      spdlog::info("pgrt: the pool {} is up (max {})", pgrt::pool().application_name(),
                   pgrt::pool().config().max_size);
    }
    co_return;
  } catch (...) {
    failure = std::current_exception();
  }
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
  auto& component =
      app.add(PoolComponent(app.executor(), std::move(config), options), std::move(dependencies));
  app.on_exit([] {
    try {
      pgrt::pool().close_now();
    } catch (const Error&) {  // NOLINT(bugprone-empty-catch): closed already, nothing to do
    }
  });
  return component;
}

}  // namespace pgrt
