#include "pgrt/service/startup_hygiene.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdlib>
#include <exception>
#include <future>
#include <spdlog/spdlog.h>
#include <string_view>
#include <thread>
#include <utility>

#include "pgrt/runtime/identity.hpp"

namespace pgrt {

namespace asio = boost::asio;

namespace {

[[noreturn]] void invalid(const std::string& message, const std::string& hint) {
  throw Error(make_error_code(client_errc::invalid_config),
              Diagnostics{.message = message, .hint = hint});
}

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): read at start-up
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

bool env_flag(const char* name, bool fallback) {
  auto value = env(name);
  if (!value) return fallback;
  if (*value == "1" || *value == "true" || *value == "yes") return true;
  if (*value == "0" || *value == "false" || *value == "no") return false;
  invalid(std::string(name) + "='" + *value + "' is not valid", "expected 1 or 0 (or true/false)");
}

// Runs a blocking call on a thread of its own and waits for it without blocking the executor.
// The thread is always joined, also when the wait is cancelled.
template <typename Function>
asio::awaitable<std::invoke_result_t<Function>> run_blocking(Function function) {
  using Value = std::invoke_result_t<Function>;
  std::packaged_task<Value()> task(std::move(function));
  auto outcome = task.get_future();
  std::thread worker(std::move(task));
  asio::steady_timer timer(co_await asio::this_coro::executor);
  try {
    while (outcome.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
      timer.expires_after(std::chrono::milliseconds(20));
      co_await timer.async_wait(asio::use_awaitable);
    }
  } catch (...) {
    worker.join();
    throw;
  }
  worker.join();
  co_return outcome.get();
}

constexpr const char* cluster_lock_key_sql = "SELECT hashtextextended($1, 0)";
constexpr const char* cluster_lock_holder_sql =
    "SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local'), "
    "a.backend_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid::bigint = ($1::bigint >> 32) & 4294967295 "
    "AND l.objid::bigint = $1::bigint & 4294967295";

}  // namespace

StartupHygieneOptions StartupHygieneOptions::from_env() {
  StartupHygieneOptions options;
  options.instance_lock = env_flag("PGRT_INSTANCE_LOCK", options.instance_lock);
  options.force = env_flag("PGRT_FORCE", options.force);
  options.cluster_lock = env_flag("PGRT_CLUSTER_LOCK", options.cluster_lock);
  options.cleanup = env_flag("PGRT_CLEANUP", options.cleanup);
  if (auto dir = env("PGRT_RUNTIME_DIR"); dir && !dir->empty()) options.lock_directory = *dir;
  if (auto value = env("PGRT_CLEANUP_IDLE_S")) {
    char* end = nullptr;
    const long long seconds = std::strtoll(value->c_str(), &end, 10);
    if (value->empty() || *end != '\0' || seconds < 0 || seconds > 31'536'000) {
      invalid("PGRT_CLEANUP_IDLE_S='" + *value + "' is not valid",
              "expected whole seconds from 0 (off) to 31536000");
    }
    options.idle_threshold = std::chrono::seconds(seconds);
  }
  return options;
}

StartupHygiene::StartupHygiene(asio::any_io_executor executor, const PoolConfig& pool_config,
                               StartupHygieneOptions options)
    : executor_(std::move(executor)),
      conninfo_(pool_config.conninfo),
      connect_options_(pool_config.connect),
      application_(pool_config.application),
      instance_(pool_config.instance),
      tag_(make_connection_tag(pool_config.application, pool_config.instance)),
      options_(std::move(options)) {}

asio::awaitable<Connection> StartupHygiene::connect() {
  ConnectOptions options = connect_options_;
  options.conninfo = conninfo_;
  options.application_name = tag_;  // this process's own tag: never terminated as a leftover
  co_return co_await asio::co_spawn(executor_, Connection::connect(std::move(options)),
                                    asio::use_awaitable);
}

asio::awaitable<void> StartupHygiene::take_cluster_lock() {
  cluster_lock_connection_ = co_await connect();
  const std::string key_name = "pgrt instance " + connection_tag_prefix(application_, instance_);
  const auto key = (co_await cluster_lock_connection_.query(cluster_lock_key_sql, key_name))
                       .scalar<std::int64_t>();
  const bool locked =
      (co_await cluster_lock_connection_.query("SELECT pg_try_advisory_lock($1)", key))
          .scalar<bool>();
  if (locked) {
    spdlog::info("pgrt: holding the cluster-wide lock of {} (advisory lock {})",
                 connection_tag_prefix(application_, instance_), key);
    co_return;
  }
  auto holders = co_await cluster_lock_connection_.query(cluster_lock_holder_sql, key);
  std::string holder = "another session";
  if (!holders.empty()) {
    const Row row = holders[0];
    holder = "backend " + std::to_string(row.get<int>(0)) + " (" + row.get<std::string>(1) +
             ", client " + row.get<std::string>(2) + ", since " + row.get<std::string>(3) + ")";
  }
  cluster_lock_connection_.close();
  throw Error(make_error_code(client_errc::instance_locked),
              Diagnostics{.message = "another " + connection_tag_prefix(application_, instance_) +
                                     " holds the cluster-wide instance lock: " + holder,
                          .hint = "stop that instance first (pgrt-diag shows where it runs)"});
}

asio::awaitable<void> StartupHygiene::start() {
  spdlog::info("pgrt: starting {} ({})", tag_, describe_process_identity());
  if (options_.instance_lock) {
    InstanceLockOptions lock_options{.application = application_,
                                     .instance = instance_,
                                     .directory = options_.lock_directory,
                                     .force = options_.force,
                                     .takeover_grace = options_.takeover_grace};
    // A named callable: g++ 12 miscompiles capturing lambdas written inside a co_await.
    auto acquire = [lock_options] { return InstanceLock::acquire(lock_options); };
    lock_ = co_await run_blocking(std::move(acquire));
    if (auto previous = lock_->took_over_from()) {
      spdlog::warn("pgrt: took over {} from pid {} (force)", lock_->path().string(), *previous);
    } else {
      spdlog::info("pgrt: holding the instance lock {}", lock_->path().string());
    }
  }
  if (options_.cluster_lock) co_await take_cluster_lock();
  if (options_.cleanup && !lock_ && !cluster_lock_connection_.is_open()) {
    // Without a singleton, another incarnation's connections may belong to a live process.
    report_.skipped = true;
    report_.warning =
        "cleanup skipped: no instance lock is held (instance_lock and cluster_lock are both off), "
        "so the connections of " +
        connection_tag_prefix(application_, instance_) +
        " with another incarnation may be a running process's. Turn on instance_lock "
        "(PGRT_INSTANCE_LOCK=1) or cluster_lock (PGRT_CLUSTER_LOCK=1), or cleanup off "
        "(PGRT_CLEANUP=0)";
    spdlog::warn("pgrt cleanup: {}", report_.warning);
  } else if (options_.cleanup) {
    CleanupOptions cleanup{.application = application_,
                           .instance = instance_,
                           .idle_threshold = options_.idle_threshold};
    if (cluster_lock_connection_.is_open()) {
      report_ = co_await cleanup_predecessors(cluster_lock_connection_, cleanup, tag_);
    } else {
      Connection connection = co_await connect();
      report_ = co_await cleanup_predecessors(connection, cleanup, tag_);
      connection.close();
    }
  }
}

asio::awaitable<void> StartupHygiene::stop() {
  cluster_lock_connection_.close();  // ends the session: the server releases the advisory lock
  lock_.reset();
  co_return;
}

StartupHygiene& add_startup_hygiene(lifecycle::Manager& app, PoolConfig& pool_config,
                                    StartupHygieneOptions options) {
  if (options.cluster_lock) {
    if (pool_config.max_size < 2) {
      invalid(
          "the cluster-wide instance lock needs a connection of its own, counted against "
          "max_size, which is " +
              std::to_string(pool_config.max_size),
          "raise max_size to 2 or more, or turn cluster_lock (PGRT_CLUSTER_LOCK) off");
    }
    --pool_config.max_size;
  }
  return app.add(std::make_shared<StartupHygiene>(app.executor(), pool_config, std::move(options)));
}

}  // namespace pgrt
