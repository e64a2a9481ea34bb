#include "pgrt/service/startup_hygiene.hpp"

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdlib>
#include <fcntl.h>
#include <libpq-fe.h>
#include <optional>
#include <spdlog/spdlog.h>
#include <string_view>
#include <unistd.h>
#include <utility>

#include "async/run_blocking.hpp"
#include "config_input.hpp"
#include "pgrt/db/deadline.hpp"
#include "pgrt/runtime/identity.hpp"
#include "start_wait.hpp"

namespace pgrt {

namespace asio = boost::asio;

using detail::env;
using detail::invalid;

namespace {

bool env_flag(const char* name, bool fallback) {
  auto value = env(name);
  if (!value) return fallback;
  if (*value == "1" || *value == "true" || *value == "yes") return true;
  if (*value == "0" || *value == "false" || *value == "no") return false;
  invalid(std::string(name) + "='" + *value + "' is not valid", "expected 1 or 0 (or true/false)");
}

// Every name schema-qualified, operators too (OPERATOR(pg_catalog.=)): a schema put before
// pg_catalog in the role's search_path (a pg_try_advisory_lock() of its own that answers true, a
// hashtextextended() that gives every instance another key) must not let two instances both hold
// the lock.
constexpr const char* cluster_lock_held_sql =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid OPERATOR(pg_catalog.=) "
    "pg_catalog.pg_backend_pid() AND l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted "
    "AND l.objsubid OPERATOR(pg_catalog.=) 1 AND l.classid::pg_catalog.int8 "
    "OPERATOR(pg_catalog.=) (($1::pg_catalog.int8 OPERATOR(pg_catalog.>>) 32) "
    "OPERATOR(pg_catalog.&) 4294967295) AND l.objid::pg_catalog.int8 OPERATOR(pg_catalog.=) "
    "($1::pg_catalog.int8 OPERATOR(pg_catalog.&) 4294967295))";
constexpr const char* cluster_lock_key_sql = "SELECT pg_catalog.hashtextextended($1, 0)";
constexpr const char* cluster_lock_try_sql = "SELECT pg_catalog.pg_try_advisory_lock($1)";
constexpr const char* cluster_lock_holder_sql =
    "SELECT a.pid, a.application_name, CASE WHEN a.backend_start IS NOT NULL THEN "
    "coalesce(pg_catalog.host(a.client_addr), 'local') END, a.backend_start::pg_catalog.text "
    "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid "
    "OPERATOR(pg_catalog.=) l.pid WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND "
    "l.granted AND l.objsubid OPERATOR(pg_catalog.=) 1 AND l.database OPERATOR(pg_catalog.=) "
    "(SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) "
    "pg_catalog.current_database()) AND l.classid::pg_catalog.int8 OPERATOR(pg_catalog.=) "
    "(($1::pg_catalog.int8 OPERATOR(pg_catalog.>>) 32) OPERATOR(pg_catalog.&) 4294967295) AND "
    "l.objid::pg_catalog.int8 OPERATOR(pg_catalog.=) ($1::pg_catalog.int8 OPERATOR(pg_catalog.&) "
    "4294967295)";

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
    options.idle_threshold = std::chrono::seconds(
        detail::whole_number("PGRT_CLEANUP_IDLE_S", *value, 0, 31'536'000,
                             "expected whole seconds from 0 (off) to 31536000"));
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
      options_(std::move(options)) {
  if (options_.cluster_lock && options_.cluster_lock_check_interval.count() <= 0) {
    invalid("cluster_lock_check_interval is " +
                std::to_string(options_.cluster_lock_check_interval.count()) + " ms",
            "give the cluster-wide lock's check a positive interval (the default is 2000 ms)");
  }
}

ConnectOptions StartupHygiene::connect_options() const {
  ConnectOptions options = with_session_guards(connect_options_, guards_);
  options.conninfo = conninfo_;
  options.application_name = tag_;  // this process's own tag: never terminated as a leftover
  return options;
}

namespace {

// A connection with this component's options, waiting up to `start_wait` for a database that is
// down, starting up or full (retry_until_the_database_answers()).
asio::awaitable<Connection> connect_waiting(asio::any_io_executor executor, ConnectOptions options,
                                            std::chrono::milliseconds start_wait) {
  Connection connection;
  // Named callables: g++ 12 miscompiles capturing lambdas written inside a co_await.
  auto attempt = [&]() -> asio::awaitable<void> {
    connection =
        co_await asio::co_spawn(executor, Connection::connect(options), asio::use_awaitable);
  };
  auto reason_of = [](const Error& error) { return std::string(error.what()); };
  co_await detail::retry_until_the_database_answers(attempt, start_wait, reason_of);
  // A login role whose sessions SET role to a group role (ALTER ROLE ... SET role): back to the
  // login role, which the service's backends show in pg_stat_activity and which may see and
  // signal them.
  co_await connection.query("SET ROLE NONE");
  co_return connection;
}

}  // namespace

asio::awaitable<Connection> StartupHygiene::connect() {
  co_return co_await connect_waiting(executor_, connect_options(), options_.start_wait);
}

// The cluster-wide lock: taken at the start, then watched and retaken while the process runs.
// The watch's coroutine holds it (a shared_ptr), so it outlives a component destroyed without
// stop(). Everything but the constructor's fields is touched on `strand` only, once the watch
// runs; before, by start() alone.
struct StartupHygiene::ClusterLock {
  ClusterLock(asio::any_io_executor executor_in, ConnectOptions options, std::string prefix_in,
              std::string tag_in, std::chrono::milliseconds interval)
      : executor(std::move(executor_in)),
        connect_options(with_short_cancel(std::move(options))),
        prefix(std::move(prefix_in)),
        tag(std::move(tag_in)),
        check_interval(interval),
        strand(asio::make_strand(executor)),
        wake(strand),
        finished(strand, asio::steady_timer::time_point::max()) {}

  // A session that stops answering is given up on sooner than the pool's (its checks are
  // cancelled at their timeout, then drained at most 1 s).
  static ConnectOptions with_short_cancel(ConnectOptions options) {
    options.cancel_timeout =
        std::min<std::chrono::milliseconds>(options.cancel_timeout, std::chrono::seconds(1));
    return options;
  }

  asio::awaitable<void> take(std::chrono::milliseconds start_wait);
  asio::awaitable<void> watch();
  asio::awaitable<bool> still_held();
  asio::awaitable<void> wait_for_news();
  asio::awaitable<void> retake();
  bool leftover_holder(const std::string& application_name) const;

  const asio::any_io_executor executor;
  const ConnectOptions connect_options;
  const std::string prefix;  // <app>/<instance>/
  const std::string tag;     // this process's
  const std::chrono::milliseconds check_interval;
  std::vector<std::string> earlier_incarnations;  // of the local instance lock, if held
  std::string instance_lock_path;
  std::function<void(const std::string&)> on_lost;

  Connection connection;
  std::int64_t key = 0;

  asio::strand<asio::any_io_executor> strand;
  asio::steady_timer wake;      // the next check
  asio::steady_timer finished;  // cancelled when the watch has ended
  asio::cancellation_signal stop_signal;
  bool stopping = false;
  bool refused_by_leftover = false;  // take()'s refusal named a leftover (leftover_holder())
  bool running = false;              // spawned, not ended
  bool watch_started = false;        // its coroutine runs (cancellable)
};

// Whether `application_name` is a session that no live process but this one can own: one of
// this process (its own earlier lock session, kept open by a server that has not noticed it
// gone) or of an earlier local holder of the instance lock (that process exited or died: this
// one holds the lock now).
bool StartupHygiene::ClusterLock::leftover_holder(const std::string& application_name) const {
  if (application_name == tag) return true;
  if (!application_name.starts_with(prefix)) return false;
  const std::string incarnation = application_name.substr(prefix.size());
  return std::find(earlier_incarnations.begin(), earlier_incarnations.end(), incarnation) !=
         earlier_incarnations.end();
}

asio::awaitable<void> StartupHygiene::ClusterLock::take(std::chrono::milliseconds start_wait) {
  connection = co_await connect_waiting(executor, connect_options, start_wait);
  key = (co_await connection.query(cluster_lock_key_sql, "pgrt instance " + prefix))
            .scalar<std::int64_t>();
  std::string holder = "another session";
  std::string refusal_hint =
      "stop that instance first (pgrt-diag shows where it runs); if it is what a crashed run on "
      "another host left, terminate that backend";
  std::optional<int> terminated;
  bool holder_is_leftover = false;
  refused_by_leftover = false;
  for (int attempt = 0; attempt < 50; ++attempt) {
    const bool locked = (co_await connection.query(cluster_lock_try_sql, key)).scalar<bool>();
    if (locked) {
      spdlog::info("pgrt: holding the cluster-wide lock of {} (advisory lock {}, backend {})",
                   prefix, key, connection.backend_pid());
      co_return;
    }
    auto holders = co_await connection.query(cluster_lock_holder_sql, key);
    if (holders.empty()) {
      // Released between the two statements (or by a terminated holder just now): try again.
    } else {
      const Row row = holders[0];
      const int pid = row.get<int>(0);
      const std::string application_name = row.get<std::optional<std::string>>(1).value_or("");
      // Another role's session shows no client and no start to a role without
      // pg_read_all_stats: still a holder.
      const auto client = row.get<std::optional<std::string>>(2);
      const auto backend_start = row.get<std::optional<std::string>>(3);
      holder_is_leftover = leftover_holder(application_name);
      holder = "backend " + std::to_string(pid) + " (" + application_name + ", " +
               (client && backend_start ? "client " + *client + ", since " + *backend_start
                                        : std::string("another role's session")) +
               ")";
      if (terminated == pid) {
        // Terminated, not gone yet.
      } else if (!terminated && leftover_holder(application_name)) {
        if (application_name == tag) {
          spdlog::warn(
              "pgrt: the cluster-wide lock of {} is held by {}, this process's own earlier lock "
              "session: terminating it",
              prefix, holder);
        } else {
          spdlog::warn(
              "pgrt: the cluster-wide lock of {} is held by {}, a session of an earlier holder "
              "of the instance lock {} that is no longer running: terminating it",
              prefix, holder, instance_lock_path);
        }
        try {
          const bool done = co_await terminate_backend_if_unchanged(
              connection, pid, application_name, backend_start.value_or(""),
              std::chrono::milliseconds(5000));
          if (done) {
            spdlog::info("pgrt: terminated backend {} ({}): it held the cluster-wide lock", pid,
                         application_name);
          } else {
            spdlog::info("pgrt: backend {} ({}) did not end within 5 s, or was already gone", pid,
                         application_name);
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
    auto [paused] = co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
    if (paused || stopping) {
      throw Error(make_error_code(client_errc::cancelled),
                  Diagnostics{.message = "taking the cluster-wide lock was cancelled"});
    }
  }
  connection.close();
  refused_by_leftover = terminated.has_value() && holder_is_leftover;
  throw Error(make_error_code(client_errc::instance_locked),
              Diagnostics{.message = "another " + prefix +
                                     " holds the cluster-wide instance lock: " + holder,
                          .hint = refusal_hint});
}

// Whether this session still holds the lock (a failure: the session is gone or unusable).
asio::awaitable<bool> StartupHygiene::ClusterLock::still_held() {
  const auto deadline =
      std::max<std::chrono::steady_clock::duration>(check_interval, std::chrono::seconds(5));
  auto rows = co_await with_timeout(connection.query(cluster_lock_held_sql, key), deadline);
  co_return rows.scalar<bool>();
}

// Until the lock's socket turns readable (the server ended the session, or said something), the
// next check is due, or the watch is stopped.
asio::awaitable<void> StartupHygiene::ClusterLock::wait_for_news() {
  using namespace asio::experimental::awaitable_operators;
  wake.expires_after(check_interval);
  const int socket_fd = connection.is_open() ? PQsocket(connection.native_handle()) : -1;
  const int watched = socket_fd < 0 ? -1 : ::fcntl(socket_fd, F_DUPFD_CLOEXEC, 0);
  if (watched < 0) {
    co_await wake.async_wait(asio::as_tuple(asio::use_awaitable));
    co_return;
  }
  asio::posix::stream_descriptor socket(strand);
  boost::system::error_code assign_error;
  socket.assign(watched, assign_error);  // owns the copy from here (epoll_ctl may fail)
  if (assign_error) {
    ::close(watched);
    co_await wake.async_wait(asio::as_tuple(asio::use_awaitable));
    co_return;
  }
  constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);
  co_await (socket.async_wait(asio::posix::stream_descriptor::wait_read, no_throw) ||
            wake.async_wait(no_throw));
}

// Takes the lock again on a new connection, until it is held, lost to another session (then
// on_lost), or the watch is stopped. A database that cannot be reached is retried with backoff.
asio::awaitable<void> StartupHygiene::ClusterLock::retake() {
  connection.close();
  auto pause = std::chrono::milliseconds(100);
  std::string logged;
  while (!stopping) {
    std::string reason;
    try {
      co_await take(std::chrono::milliseconds(0));
      spdlog::warn("pgrt: retook the cluster-wide lock of {} (backend {})", prefix,
                   connection.backend_pid());
      co_return;
    } catch (const Error& error) {
      // Another instance holds it: lost for good. Not so a leftover of this process (or of an
      // earlier holder) that has not ended yet: that is retried, as a database that is down.
      if (!stopping && error.code() == client_errc::instance_locked && !refused_by_leftover) {
        const std::string lost_reason = std::string("the cluster-wide lock of ") + prefix +
                                        " was lost while this process ran, and " +
                                        error.diagnostics().message +
                                        ": this process is no longer that instance";
        spdlog::error("pgrt: {}", lost_reason);
        if (on_lost) on_lost(lost_reason);
        co_return;
      }
      reason = error.diagnostics().message;
    } catch (const std::exception& error) {
      reason = error.what();
    }
    if (stopping) co_return;
    if (reason != logged) {
      spdlog::warn("pgrt: cannot retake the cluster-wide lock of {} yet, retrying: {}", prefix,
                   reason);
      logged = reason;
    }
    connection.close();
    wake.expires_after(pause);
    co_await wake.async_wait(asio::as_tuple(asio::use_awaitable));
    pause = std::min(pause * 2, std::chrono::milliseconds(5'000));
  }
}

asio::awaitable<void> StartupHygiene::ClusterLock::watch() {
  // stop() cancels this loop: it winds down through `stopping`, never by an exception, so that
  // `running` always goes false.
  co_await asio::this_coro::throw_if_cancelled(false);
  watch_started = true;
  try {
    while (!stopping) {
      co_await wait_for_news();
      if (stopping) break;
      std::string lost;
      try {
        if (!(co_await still_held())) lost = "its session no longer holds it";
      } catch (const Error& error) {
        lost = error.diagnostics().message;
      } catch (const std::exception& error) {
        lost = error.what();
      }
      if (stopping) break;
      if (lost.empty()) continue;
      spdlog::warn("pgrt: the cluster-wide lock of {} was lost ({}): retaking it", prefix, lost);
      try {
        co_await retake();
      } catch (const std::exception& error) {  // (retake() itself catches what it expects)
        spdlog::error("pgrt: retaking the cluster-wide lock of {} failed: {}", prefix,
                      error.what());
      }
      if (!connection.is_open()) break;  // lost for good (on_lost ran), or stopping
    }
  } catch (const std::exception& error) {  // (a bug: the watch ends, and says so)
    spdlog::error("pgrt: the watch of the cluster-wide lock of {} failed: {}", prefix,
                  error.what());
  }
  connection.close();  // ends the session: the server releases the lock
  running = false;
  finished.cancel();
}

namespace {

// The watch's coroutine holds the lock's state: it outlives the component if it must.
asio::awaitable<void> watch_cluster_lock(std::shared_ptr<StartupHygiene::ClusterLock> lock) {
  co_await lock->watch();
}

void stop_watching_on_strand(const std::shared_ptr<StartupHygiene::ClusterLock>& lock) {
  lock->stopping = true;
  lock->wake.cancel();
  // Only into a running coroutine: one that has not yet turned throw_if_cancelled off would throw
  // from asio's entry point. One not started yet sees `stopping` first.
  if (lock->watch_started) lock->stop_signal.emit(asio::cancellation_type::terminal);
}

asio::awaitable<void> stop_watching(std::shared_ptr<StartupHygiene::ClusterLock> lock) {
  stop_watching_on_strand(lock);
  while (lock->running) {
    co_await lock->finished.async_wait(asio::as_tuple(asio::use_awaitable));
  }
  lock->connection.close();
}

}  // namespace

StartupHygiene::~StartupHygiene() {
  // Without a watch, the lock's connection (if any) closes with cluster_lock_ below.
  if (!watching_) return;
  auto lock = cluster_lock_;
  asio::dispatch(lock->strand, [lock] { stop_watching_on_strand(lock); });
}

void StartupHygiene::on_cluster_lock_lost(std::function<void(const std::string&)> handler) {
  on_cluster_lock_lost_ = std::move(handler);
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
    // (No guard: no unix socket can be made here, or another user's socket has its name.)
    const std::string guard = lock_->guard_name().empty()
                                  ? " (no guard: the lock file alone holds it)"
                                  : " (guard @" + lock_->guard_name() + ")";
    if (auto previous = lock_->took_over_from()) {
      spdlog::warn("pgrt: took over {}{} from pid {} (force)", lock_->path().string(), guard,
                   *previous);
    } else {
      spdlog::info("pgrt: holding the instance lock {}{}", lock_->path().string(), guard);
    }
  }
  if (options_.cluster_lock) {
    cluster_lock_ = std::make_shared<ClusterLock>(executor_, connect_options(),
                                                  connection_tag_prefix(application_, instance_),
                                                  tag_, options_.cluster_lock_check_interval);
    if (lock_) {
      cluster_lock_->earlier_incarnations = lock_->earlier_incarnations();
      cluster_lock_->instance_lock_path = lock_->path().string();
    }
    cluster_lock_->on_lost = on_cluster_lock_lost_;
    co_await cluster_lock_->take(options_.start_wait);
  }
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
  } else if (options_.cleanup && !lock_ && !cluster_lock_) {
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
    CleanupOptions cleanup{
        .application = application_,
        .instance = instance_,
        .idle_threshold = options_.idle_threshold,
        .earlier_incarnations = lock_ ? lock_->earlier_incarnations() : std::vector<std::string>()};
    if (cluster_lock_) {
      report_ = co_await cleanup_predecessors(cluster_lock_->connection, cleanup, tag_);
    } else {
      Connection connection = co_await connect();
      report_ = co_await cleanup_predecessors(connection, cleanup, tag_);
      connection.close();
    }
    if (!report_.running_duplicates.empty()) {
      throw Error(make_error_code(client_errc::instance_locked),
                  Diagnostics{.message = report_.warning,
                              .hint = "stop it first, or start both with the same "
                                      "PGRT_RUNTIME_DIR; this process's lock is " +
                                      (lock_ ? lock_->path().string() : std::string("not held"))});
    }
  }
  if (cluster_lock_) {
    // From here on the lock's connection is the watch's, on its strand.
    auto lock = cluster_lock_;
    asio::dispatch(lock->strand, [lock] {
      if (lock->running || lock->stopping) return;
      lock->running = true;
      asio::co_spawn(lock->strand, watch_cluster_lock(lock),
                     asio::bind_cancellation_slot(lock->stop_signal.slot(), asio::detached));
    });
    watching_ = true;
  }
}

asio::awaitable<void> StartupHygiene::stop() {
  if (cluster_lock_) {
    // Ends the watch, then the session: the server releases the advisory lock.
    co_await asio::co_spawn(cluster_lock_->strand, stop_watching(cluster_lock_),
                            asio::use_awaitable);
    cluster_lock_.reset();
    watching_ = false;
  }
  lock_.reset();
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
    // The pool gets one less: a pool valid as configured may not be with it (min_idle, the
    // budget's classes), which is the lock's doing, to be said so.
    bool valid_as_given = true;
    try {
      pool_config.validate();
    } catch (const Error&) {
      valid_as_given = false;  // (add_pool() says what is wrong with it as given)
    }
    --pool_config.max_size;
    if (valid_as_given) {
      try {
        pool_config.validate();
      } catch (const Error& error) {
        ++pool_config.max_size;
        invalid("the cluster-wide instance lock (PGRT_CLUSTER_LOCK) takes one of the pool's " +
                    std::to_string(pool_config.max_size) +
                    " connections (max_size, PGRT_POOL_MAX) for itself, and the pool left with " +
                    std::to_string(pool_config.max_size - 1) +
                    " is not valid: " + error.diagnostics().message,
                "raise PGRT_POOL_MAX (max_size) by one, to " +
                    std::to_string(pool_config.max_size + 1) +
                    ", or turn cluster_lock (PGRT_CLUSTER_LOCK) off");
      }
    }
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
  auto hygiene = std::make_shared<StartupHygiene>(app.executor(), pool_config, std::move(options));
  hygiene->on_cluster_lock_lost([&app](const std::string& reason) {
    app.request_stop(lifecycle::exit_code::failure, reason);
  });
  return app.add(std::move(hygiene), {}, limits);
}

}  // namespace pgrt
