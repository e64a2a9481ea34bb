#include "pgrt/service/startup_hygiene.hpp"

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdlib>
#include <spdlog/spdlog.h>
#include <string_view>
#include <utility>

#include "async/run_blocking.hpp"
#include "pgrt/runtime/identity.hpp"
#include "start_wait.hpp"

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

constexpr const char* cluster_lock_key_sql = "SELECT hashtextextended($1, 0)";
constexpr const char* cluster_lock_holder_sql =
    "SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local'), "
    "a.backend_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
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
  options.start_wait = detail::start_wait_from_env(options.start_wait);
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
      guards_(pool_config.guards),
      application_(pool_config.application),
      instance_(pool_config.instance),
      tag_(make_connection_tag(pool_config.application, pool_config.instance)),
      options_(std::move(options)) {}

ConnectOptions StartupHygiene::connect_options() const {
  ConnectOptions options = with_session_guards(connect_options_, guards_);
  options.conninfo = conninfo_;
  options.application_name = tag_;  // this process's own tag: never terminated as a leftover
  return options;
}

asio::awaitable<Connection> StartupHygiene::connect() {
  Connection connection;
  // Named callables: g++ 12 miscompiles capturing lambdas written inside a co_await.
  auto attempt = [this, &connection]() -> asio::awaitable<void> {
    connection = co_await asio::co_spawn(executor_, Connection::connect(connect_options()),
                                         asio::use_awaitable);
  };
  auto reason_of = [](const Error& error) { return std::string(error.what()); };
  co_await detail::retry_until_the_database_answers(attempt, options_.start_wait, reason_of);
  co_return connection;
}

namespace {

// Whether `application_name` is a tag of an earlier local holder of the instance lock: such a
// process no longer holds the lock (it exited or died), so a session of it is a leftover (kept
// open by a proxy, or not yet noticed gone by the server).
bool earlier_local_holder(const std::optional<InstanceLock>& lock, const std::string& prefix,
                          const std::string& application_name) {
  if (!lock || !application_name.starts_with(prefix)) return false;
  const std::string incarnation = application_name.substr(prefix.size());
  if (incarnation == process_identity().incarnation) return false;
  const auto& earlier = lock->earlier_incarnations();
  return std::find(earlier.begin(), earlier.end(), incarnation) != earlier.end();
}

}  // namespace

asio::awaitable<void> StartupHygiene::take_cluster_lock() {
  cluster_lock_connection_ = co_await connect();
  const std::string prefix = connection_tag_prefix(application_, instance_);
  const std::string key_name = "pgrt instance " + prefix;
  const auto key = (co_await cluster_lock_connection_.query(cluster_lock_key_sql, key_name))
                       .scalar<std::int64_t>();
  std::string holder = "another session";
  std::string refusal_hint =
      "stop that instance first (pgrt-diag shows where it runs); if it is what a crashed run on "
      "another host left, terminate that backend";
  std::optional<int> terminated;
  for (int attempt = 0; attempt < 50; ++attempt) {
    const bool locked =
        (co_await cluster_lock_connection_.query("SELECT pg_try_advisory_lock($1)", key))
            .scalar<bool>();
    if (locked) {
      spdlog::info("pgrt: holding the cluster-wide lock of {} (advisory lock {})", prefix, key);
      co_return;
    }
    auto holders = co_await cluster_lock_connection_.query(cluster_lock_holder_sql, key);
    if (holders.empty()) {
      // Released between the two statements (or by a terminated holder just now): try again.
    } else {
      const Row row = holders[0];
      const int pid = row.get<int>(0);
      const std::string application_name = row.get<std::string>(1);
      holder = "backend " + std::to_string(pid) + " (" + application_name + ", client " +
               row.get<std::string>(2) + ", since " + row.get<std::string>(3) + ")";
      if (terminated == pid) {
        // Terminated, not gone yet.
      } else if (!terminated && earlier_local_holder(lock_, prefix, application_name)) {
        spdlog::warn(
            "pgrt: the cluster-wide lock of {} is held by {}, a session of an earlier holder of "
            "the instance lock {} that is no longer running: terminating it",
            prefix, holder, lock_->path().string());
        try {
          const bool done = (co_await cluster_lock_connection_.query(
                                 "SELECT pg_terminate_backend($1, 5000)", pid))
                                .scalar<bool>();
          if (done) {
            spdlog::info("pgrt: terminated backend {} ({}): it held the cluster-wide lock", pid,
                         application_name);
          } else {
            spdlog::info("pgrt: backend {} ({}) was already gone", pid, application_name);
          }
          terminated = pid;
        } catch (const Error& error) {
          if (sqlstate_of(error.code()) != "42501") throw;
          refusal_hint =
              "it is a leftover of an earlier run, but this role may not terminate it (" +
              error.diagnostics().message +
              "): GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) TO the role, "
              "or terminate backend " +
              std::to_string(pid) + " by hand";
          break;
        }
      } else {
        break;  // a live instance elsewhere (or not provably ours): refuse
      }
    }
    asio::steady_timer pause(co_await asio::this_coro::executor, std::chrono::milliseconds(100));
    co_await pause.async_wait(asio::use_awaitable);
  }
  cluster_lock_connection_.close();
  throw Error(make_error_code(client_errc::instance_locked),
              Diagnostics{.message = "another " + prefix +
                                     " holds the cluster-wide instance lock: " + holder,
                          .hint = refusal_hint});
}

asio::awaitable<void> StartupHygiene::start() {
  spdlog::info("pgrt: starting {} ({})", tag_, describe_process_identity());
  if (options_.instance_lock) {
    InstanceLockOptions lock_options{.application = application_,
                                     .instance = instance_,
                                     .directory = options_.lock_directory,
                                     .force = options_.force,
                                     .takeover_grace = options_.takeover_grace};
    // A named callable: g++ 12 miscompiles capturing lambdas written inside a co_await. It runs
    // on a thread of its own; if this start() is cancelled or destroyed meanwhile, that thread
    // finishes alone and releases the lock it may still take.
    auto acquire = [lock_options] { return InstanceLock::acquire(lock_options); };
    lock_ = co_await detail::async::run_blocking(std::move(acquire));
    if (auto previous = lock_->took_over_from()) {
      spdlog::warn("pgrt: took over {} from pid {} (force)", lock_->path().string(), *previous);
    } else {
      spdlog::info("pgrt: holding the instance lock {}", lock_->path().string());
    }
  }
  if (options_.cluster_lock) co_await take_cluster_lock();
  if (options_.cleanup && connect_options_.pooler == Pooler::transaction) {
    // The backends the server shows are the pooler's, shared by its clients and tagged with
    // whichever client used them last: none of them is ours to end.
    report_.skipped = true;
    report_.warning =
        "cleanup skipped: behind a transaction pooler (PGRT_POOLER=transaction) the server's "
        "backends belong to the pooler, whatever application_name they carry, and ending one "
        "would break its other clients. The pooler closes its idle server connections itself "
        "(PgBouncer: server_idle_timeout)";
    spdlog::info("pgrt cleanup: {}", report_.warning);
  } else if (options_.cleanup && !lock_ && !cluster_lock_connection_.is_open()) {
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
    if (pool_config.connect.pooler == Pooler::transaction) {
      invalid(
          "the cluster-wide instance lock (PGRT_CLUSTER_LOCK) is a session-level advisory lock, "
          "and a transaction pooler (PGRT_POOLER=transaction) keeps no session for it",
          "turn cluster_lock off, or run the service with a DSN straight to the server");
    }
    if (pool_config.max_size < 2) {
      invalid(
          "the cluster-wide instance lock needs a connection of its own, counted against "
          "max_size, which is " +
              std::to_string(pool_config.max_size),
          "raise max_size to 2 or more, or turn cluster_lock (PGRT_CLUSTER_LOCK) off");
    }
    --pool_config.max_size;
  }
  // A forced takeover blocks the start for up to max_takeover_time(): the start deadline covers
  // it on top of the usual one, so the new instance never gives up on a holder it is still
  // stopping (and that it may already have killed).
  lifecycle::ComponentLimits limits;
  const bool connects = options.cleanup || options.cluster_lock;
  if ((options.instance_lock && options.force) || (connects && options.start_wait.count() > 0)) {
    limits.start_timeout =
        app.options().start_timeout +
        (options.instance_lock
             ? max_takeover_time({.force = options.force, .takeover_grace = options.takeover_grace})
             : std::chrono::milliseconds(0)) +
        (connects ? options.start_wait : std::chrono::milliseconds(0));
  }
  return app.add(std::make_shared<StartupHygiene>(app.executor(), pool_config, std::move(options)),
                 {}, limits);
}

}  // namespace pgrt
