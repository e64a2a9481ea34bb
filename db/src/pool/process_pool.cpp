// The process-wide pool: pgrt::configure(), pgrt::pool(), co_await pgrt::connection().
#include "driver.hpp"

namespace pgrt {

namespace asio = boost::asio;
using detail::Clock;
using detail::coarse_now;
using detail::throw_pool_error;

namespace {
std::mutex global_mutex;
std::shared_ptr<Pool> global_pool;  // NOLINT(cppcoreguidelines-avoid-non-const-global-variables)

}  // namespace

std::shared_ptr<Pool> detail::forget_if_process_pool(const Pool* pool) {
  std::lock_guard lock(global_mutex);
  if (global_pool.get() != pool) return nullptr;
  return std::exchange(global_pool, nullptr);
}

namespace {
// Makes `make_pool()` the process-wide pool, unless one is configured already.
template <typename MakePool>
void install_process_pool(MakePool make_pool) {
  std::lock_guard lock(global_mutex);
  if (global_pool) {
    throw_pool_error(client_errc::already_configured,
                     "pgrt::configure() was called twice; the process-wide pool is configured "
                     "once",
                     "configure it once at start-up; use pgrt::Pool objects for more pools");
  }
  global_pool = make_pool();
}
}  // namespace

void configure(PoolConfig config) {
  install_process_pool([&] { return std::make_shared<Pool>(std::move(config)); });
}

void configure(PoolConfig config, asio::any_io_executor executor) {
  install_process_pool(
      [&] { return std::make_shared<Pool>(std::move(executor), std::move(config)); });
}

namespace {
[[noreturn]] void throw_not_configured() {
  throw_pool_error(client_errc::pool_not_configured, "the process-wide pool is not configured",
                   "call pgrt::configure(pgrt::PoolConfig::from_env()) (or with your own "
                   "PoolConfig) before pgrt::connection()");
}
}  // namespace

Pool& pool() {
  std::lock_guard lock(global_mutex);
  if (!global_pool) throw_not_configured();
  return *global_pool;
}

std::shared_ptr<const Pool> configured_pool() noexcept {
  std::lock_guard lock(global_mutex);
  return global_pool;
}

namespace {
asio::awaitable<Lease> fail_not_configured() {
  throw_not_configured();
  co_return Lease{};
}
}  // namespace

namespace {
// One look at the global, kept for the whole acquire: a configure() or close() on another thread
// meanwhile cannot leave the acquire with a null or dangling pool.
std::shared_ptr<Pool> current_pool() {
  std::lock_guard lock(global_mutex);
  return global_pool;
}
}  // namespace

// The connection() overloads are not coroutines themselves (one frame, the acquire's, which holds
// the pool's state, so it runs to its end even if the process-wide pool is shut down meanwhile);
// errors still come out of the co_await, never out of the call.
asio::awaitable<Lease> connection(Priority priority, std::source_location site) {
  const std::shared_ptr<Pool> current = current_pool();
  if (!current) return fail_not_configured();
  return current->acquire(priority, site);
}

asio::awaitable<Lease> connection(std::string_view consumer, Priority priority,
                                  std::source_location site) {
  const std::shared_ptr<Pool> current = current_pool();
  if (!current) return fail_not_configured();
  return current->acquire(consumer, priority, site);
}

// Not a coroutine either: query_with()'s frame holds the pool's state.
asio::awaitable<Result> detail::query_process_pool(std::string sql, ParamSink params) {
  const std::shared_ptr<Pool> current = current_pool();
  if (!current) throw_not_configured();  // (from the call, as pool() throws)
  return current->query_with(std::move(sql), std::move(params));
}

}  // namespace pgrt
