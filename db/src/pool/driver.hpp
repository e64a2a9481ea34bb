#pragma once

// The pool's driver, the asio/libpq side of the pool: detail::PoolState holds the sans-I/O core
// (state_machine.hpp) under one mutex, feeds it events and carries out its actions. Private to the
// pool: the public types are in pgrt/db/pool.hpp. Built on it: pool.cpp (Pool), lease.cpp (Lease),
// shutdown.cpp (closing, in order) and process_pool.cpp (pgrt::configure(), pgrt::connection()).

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <ctime>
#include <fcntl.h>
#include <functional>
#include <initializer_list>
#include <libpq-fe.h>
#include <mutex>
#include <optional>
#include <random>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <tuple>
#include <unistd.h>

#include "../async/abandon_guard.hpp"
#include "../async/timer_condition.hpp"
#include "pgrt/db/pool.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/runtime/identity.hpp"
#include "state_machine.hpp"

namespace pgrt::detail {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

// The time for the pool's coarse decisions (lifetime, idle age, lease age) on the acquire and
// release paths: CLOCK_MONOTONIC_COARSE, the timeline of steady_clock (CLOCK_MONOTONIC in
// libstdc++ on Linux) as of the last kernel tick, a few milliseconds behind at most. It is a plain
// read from the vDSO, several times cheaper than steady_clock::now(), which the uncontended
// acquire would otherwise pay twice. Waits are measured with steady_clock.
inline Clock::time_point coarse_now() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return Clock::time_point(std::chrono::duration_cast<Clock::duration>(
      std::chrono::seconds(now.tv_sec) + std::chrono::nanoseconds(now.tv_nsec)));
}

inline constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);

inline std::string make_application_name(const PoolConfig& config) {
  return make_connection_tag(config.application, config.instance);
}

// The pool's connect options: the config's, with its conninfo and the session guards.
inline ConnectOptions connect_options(const PoolConfig& config) {
  ConnectOptions options = config.connect;
  options.conninfo = config.conninfo;
  return with_session_guards(std::move(options), config.guards);
}

inline std::string describe_site(const std::source_location& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line()) + " (" +
         site.function_name() + ")";
}

[[noreturn]] inline void throw_pool_error(client_errc code, std::string message,
                                          std::string hint = {}) {
  throw Error(make_error_code(code),
              Diagnostics{.message = std::move(message), .hint = std::move(hint)});
}

// Power-of-two buckets of microseconds: enough for p50/p99 of acquire waits.
class WaitHistogram {
 public:
  void record(std::chrono::microseconds wait) {
    const auto micros = static_cast<std::uint64_t>(std::max<std::int64_t>(wait.count(), 0));
    std::size_t bucket = 0;
    while (bucket + 1 < buckets_.size() && (std::uint64_t{1} << bucket) <= micros) ++bucket;
    ++buckets_[bucket];
    ++count_;
    max_ = std::max(max_, wait);
  }
  [[nodiscard]] std::chrono::microseconds percentile(double fraction) const {
    if (count_ == 0) return std::chrono::microseconds(0);
    const auto wanted = static_cast<std::uint64_t>(fraction * static_cast<double>(count_));
    std::uint64_t seen = 0;
    for (std::size_t bucket = 0; bucket < buckets_.size(); ++bucket) {
      seen += buckets_[bucket];
      if (seen > wanted) {
        return std::min(std::chrono::microseconds(std::int64_t{1} << bucket), max_);
      }
    }
    return max_;
  }
  [[nodiscard]] std::chrono::microseconds max() const { return max_; }

 private:
  std::array<std::uint64_t, 40> buckets_{};
  std::uint64_t count_ = 0;
  std::chrono::microseconds max_{0};
};

// Every event goes out through here: a subscriber that throws is logged, and the pool's
// accounting (already complete when an event is emitted) cannot be disturbed by it.
template <typename Signal, typename... Args>
void emit(Signal& signal, const Args&... args) noexcept {
  if (!signal.ever_connected()) return;  // the common case: no lock, no call
  try {
    signal(args...);
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool: an event subscriber threw: {}", error.what());
  } catch (...) {
    spdlog::error("pgrt pool: an event subscriber threw");
  }
}

// Event emissions collected under the pool's lock and run after it is released.
class Deferred {
 public:
  Deferred() = default;
  Deferred(const Deferred&) = delete;
  Deferred& operator=(const Deferred&) = delete;
  Deferred(Deferred&&) = delete;
  Deferred& operator=(Deferred&&) = delete;
  ~Deferred() {
    for (auto& call : calls_) {
      try {
        call();
      } catch (...) {  // NOLINT(bugprone-empty-catch): each call is an emit(), which logs
      }
    }
  }
  void add(std::function<void()> call) { calls_.push_back(std::move(call)); }

 private:
  std::vector<std::function<void()>> calls_;
};

// A pooled connection: what the driver hangs on a core node.
// Watches an idle connection's socket, through a descriptor of its own (a dup() of libpq's), for
// the server ending the backend (pg_terminate_backend, a restart, a proxy's idle timeout). Used
// under the pool's lock only; the pending wait's handler holds it.
struct IdleWatch {
  explicit IdleWatch(const asio::any_io_executor& executor) : descriptor(executor) {}
  asio::posix::stream_descriptor descriptor;
  pool::Node* node = nullptr;  // null once unwatched: a late handler does nothing
};

struct PooledConnection : pool::NodeAttachment {
  explicit PooledConnection(const asio::any_io_executor& executor) : strand(executor) {}
  Connection connection;
  // Its connect runs on this strand, so that the pool's close can cancel it from any thread.
  asio::strand<asio::any_io_executor> strand;
  // The connect's cancellation, shared with the connect's coroutine: a cancel posted by close()
  // may run after the connect has ended (and the node is gone): it then finds `finished` set, on
  // the strand, and does nothing.
  struct ConnectCancel {
    asio::cancellation_signal signal;
    bool cancelled = false;  // on the strand only: a cancel that came before the connect began
    bool finished = false;   // on the strand only
  };
  std::shared_ptr<ConnectCancel> connect_cancel = std::make_shared<ConnectCancel>();
  std::shared_ptr<IdleWatch> watch;  // while the core has it watched
};

inline Connection& connection_of(pool::Node& node) {
  return static_cast<PooledConnection&>(*node.attachment).connection;
}

// A caller waiting for a connection: the core's Waiter plus the timer it sleeps on. The core's
// decision (handed a node, or failed) is made under the pool's lock, and the timer is cancelled
// under it too, so the waiter is woken exactly once and never after its frame is gone.
struct PoolWaiter : pool::Waiter {
  PoolWaiter(const asio::any_io_executor& executor, Priority priority_in,
             std::source_location site_in)
      : Waiter(priority_in, site_in), timer(executor) {}
  asio::steady_timer timer;
};

// A discarded connection keeps its capacity until the server has closed its end of the socket; a
// warning is logged when that takes longer than this.
constexpr std::chrono::milliseconds server_close_warning{2000};
// How long close_now() waits for each cancel request to go out.
constexpr std::chrono::milliseconds exit_cancel_wait{1000};

inline pool::CoreConfig core_config(const PoolConfig& config) {
  return pool::CoreConfig{
      .max_size = config.max_size,
      .min_idle = config.min_idle,
      .reserved_for_priority = config.reserved_for_priority,
      .max_waiters = config.max_waiters,
      .acquire_timeout = config.acquire_timeout,
      .connect_timeout = config.connect.connect_timeout,
      .max_lifetime = config.max_lifetime,
      .lifetime_jitter = config.lifetime_jitter,
      .idle_timeout = config.idle_timeout,
      .keepalive_interval = config.keepalive_interval,
      .validate_after_idle = config.validate_after_idle,
      .leak_threshold = config.leak_threshold,
      .watch_idle_after = config.watch_idle_after,
      .backoff_initial = config.connect_backoff_initial,
      .backoff_max = config.connect_backoff_max,
      .backoff_jitter = config.connect_backoff_jitter,
      .reset_discard_all = config.reset == ResetPolicy::discard_all,
  };
}

// How a lease came back, read off its connection.
inline pool::ReturnKind classify(const Connection& connection) {
  if (!connection.is_open() || connection.is_broken()) return pool::ReturnKind::broken;
  switch (connection.transaction_status()) {
    case TransactionStatus::idle:
      return pool::ReturnKind::clean;
    case TransactionStatus::in_transaction:
    case TransactionStatus::in_error:
      return pool::ReturnKind::needs_reset;
    case TransactionStatus::active:
      return pool::ReturnKind::mid_query;  // its coroutine was destroyed mid-operation
    case TransactionStatus::unknown:
      return pool::ReturnKind::broken;
  }
  return pool::ReturnKind::broken;
}

// Runs `operation` on `connection`, and cuts the connection (Connection::interrupt(), which is
// thread-safe) if it has not finished by `deadline`: the operation then fails with
// connection_lost. Every wait the pool makes on the server goes through here, so none is
// unbounded, whatever the network does (a blackholed path never answers and never fails).
template <typename T>
asio::awaitable<T> cut_at(Connection& connection, Clock::time_point deadline,
                          asio::awaitable<T> operation) {
  struct Cutter {
    std::mutex mutex;
    bool done = false;
    Connection* connection = nullptr;
  };
  auto cutter = std::make_shared<Cutter>();
  cutter->connection = &connection;
  asio::steady_timer timer(co_await asio::this_coro::executor, deadline);
  timer.async_wait([cutter](error_code error) {
    if (error) return;
    std::lock_guard lock(cutter->mutex);
    if (!cutter->done) cutter->connection->interrupt();
  });
  struct Disarm {
    Cutter& cutter;
    asio::steady_timer& timer;
    Disarm(Cutter& cutter_in, asio::steady_timer& timer_in) : cutter(cutter_in), timer(timer_in) {}
    Disarm(const Disarm&) = delete;
    Disarm& operator=(const Disarm&) = delete;
    Disarm(Disarm&&) = delete;
    Disarm& operator=(Disarm&&) = delete;
    ~Disarm() {
      {
        std::lock_guard lock(cutter.mutex);
        cutter.done = true;
      }
      timer.cancel();
    }
  } disarm(*cutter, timer);
  co_return co_await std::move(operation);
}

// The asio/libpq driver: it holds the core under one mutex, feeds it events and carries out its
// actions. One acquire: Pool::acquire() -> PoolState::acquire() -> Core::try_acquire() (an idle
// connection: leased at once) or Core::enqueue() + a wait on the PoolWaiter's timer, until the
// core hands it a node (a Lease returned: release() -> Core::lease_returned() -> offer) or fails
// it.
struct PoolState : std::enable_shared_from_this<PoolState> {
  explicit PoolState(PoolConfig config_in)
      : config(std::move(config_in)),
        application_name(make_application_name(config)),
        backend_end_bound(pgrt::backend_end_bound(connect_options(config))),
        core(core_config(config), std::random_device{}()) {}

  mutable std::mutex mutex;
  const PoolConfig config;
  const std::string application_name;
  // A closed connection's capacity comes back when the server has ended its backend, or at this
  // bound (session_guards.hpp), by which the session guards have made the server end it.
  const std::chrono::milliseconds backend_end_bound;
  PoolEvents events;
  std::optional<asio::any_io_executor> executor;
  // The upkeep timer, armed by the core (Action::arm_timer); used under `mutex` only.
  std::shared_ptr<asio::steady_timer> upkeep_timer;
  pool::Core core;
  WaitHistogram waits;
  std::string last_connect_error;
  // close() calls waiting for every connection to be gone; notified once none is left.
  async::TimerCondition drained;

  // --- carrying out the core's actions (under `mutex`) ------------------------------------------

  // Starts background work later, never inline: co_spawn dispatches, so from the io_context's
  // own thread it would run the coroutine at once, under the pool's lock.
  void spawn_later(asio::awaitable<void> operation) {
    asio::post(*executor, [executor = *executor, operation = std::move(operation)]() mutable {
      asio::co_spawn(executor, std::move(operation), [](const std::exception_ptr& error) {
        if (!error) return;
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& exception) {
          spdlog::error("pgrt pool: background work failed: {}", exception.what());
        } catch (...) {
          spdlog::error("pgrt pool: background work failed");
        }
      });
    });
  }

  // The scratch list of the core's actions: one per pool, used under `mutex` only, so that no
  // acquire's coroutine frame carries one (a frame too large for asio's recycling allocator
  // would cost a malloc per acquire).
  pool::Actions actions_scratch;
  pool::Actions& fresh_actions_locked() noexcept {
    actions_scratch.clear();
    return actions_scratch;
  }

  void execute_locked(const pool::Actions& actions, Deferred& deferred) {
    for (const pool::Action& action : actions) {
      switch (action.kind) {
        case pool::Action::Kind::wake:
          static_cast<PoolWaiter*>(action.waiter)->timer.cancel();
          break;
        case pool::Action::Kind::open:
          start_connect(*action.node);
          break;
        case pool::Action::Kind::reset:
          spawn_later(reset(shared_from_this(), action.node));
          break;
        case pool::Action::Kind::ping:
          spawn_later(ping(shared_from_this(), action.node));
          break;
        case pool::Action::Kind::close:
          if (events.discarded.ever_connected()) {
            deferred.add([this, reason = action.reason] { emit(events.discarded, reason); });
          }
          start_close(*action.node);
          break;
        case pool::Action::Kind::cancel_connect: {
          auto& pooled = static_cast<PooledConnection&>(*action.node->attachment);
          asio::post(pooled.strand, [cancel = pooled.connect_cancel] {
            cancel->cancelled = true;
            if (!cancel->finished) cancel->signal.emit(asio::cancellation_type::terminal);
          });
          break;
        }
        case pool::Action::Kind::arm_timer:
          upkeep_timer->expires_at(action.at);  // cancels the wait: upkeep() waits again
          break;
        case pool::Action::Kind::watch:
          start_watch(*action.node);
          break;
        case pool::Action::Kind::unwatch:
          stop_watch(*action.node);
          break;
        case pool::Action::Kind::report_leak: {
          const auto site = action.node->lease_site;
          spdlog::warn(
              "pgrt pool {}: a connection acquired at {} has been held for {} ms (leak_threshold "
              "{} ms); is a Lease kept alive by mistake?",
              application_name, describe_site(site), action.age.count(),
              config.leak_threshold.count());
          deferred.add([this, site, age = action.age] { emit(events.leak_suspected, site, age); });
          break;
        }
      }
    }
    if (core.drained()) {
      drained.notify_all_locked();
    }
  }

  // --- watching idle sockets (under `mutex`) ----------------------------------------------------

  void start_watch(pool::Node& node) {
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    auto watch = std::make_shared<IdleWatch>(*executor);
    watch->node = &node;
    pooled.watch = watch;
    PGconn* handle = pooled.connection.native_handle();
    const int socket = handle != nullptr ? PQsocket(handle) : -1;
    const int own = socket >= 0 ? ::fcntl(socket, F_DUPFD_CLOEXEC, 0) : -1;
    error_code error;
    if (own >= 0) watch->descriptor.assign(own, error);
    if (own < 0 || error) {
      if (own >= 0 && error) ::close(own);
      // No socket to watch: look at it once, later, as if it had become readable.
      asio::post(*executor, [self = shared_from_this(), watch] { self->on_readable(watch, {}); });
      return;
    }
    watch->descriptor.async_wait(asio::posix::stream_descriptor::wait_read,
                                 [self = shared_from_this(), watch](error_code wait_error) {
                                   self->on_readable(watch, wait_error);
                                 });
  }

  static void stop_watch(pool::Node& node) {
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    if (!pooled.watch) return;
    pooled.watch->node = nullptr;
    error_code ignored;
    pooled.watch->descriptor.close(ignored);  // cancels the wait; closes our descriptor only
    pooled.watch.reset();
  }

  // An idle connection's socket became readable: the server closed it (end of file, or its
  // goodbye message first), or sent something harmless (a notice, a parameter status), which
  // libpq then reads. Closed: the core discards the connection; otherwise the watch goes on.
  void on_readable(const std::shared_ptr<IdleWatch>& watch, error_code wait_error) noexcept {
    try {
      Deferred deferred;
      std::lock_guard lock(mutex);
      pool::Node* node = watch->node;
      if (node == nullptr) return;  // unwatched meanwhile: the connection is someone's now
      PGconn* handle = connection_of(*node).native_handle();
      bool alive = handle != nullptr && !wait_error && watch->descriptor.is_open();
      if (alive) {
        char byte = 0;
        const ssize_t peeked =
            ::recv(watch->descriptor.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        if (peeked == 0) {
          alive = false;  // end of file
        } else if (peeked < 0) {
          alive = errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        } else {
          alive = PQconsumeInput(handle) == 1 && PQstatus(handle) == CONNECTION_OK;
        }
      }
      if (alive) {
        watch->descriptor.async_wait(asio::posix::stream_descriptor::wait_read,
                                     [self = shared_from_this(), watch](error_code error) {
                                       self->on_readable(watch, error);
                                     });
        return;
      }
      auto& actions = fresh_actions_locked();
      core.connection_lost(*node, actions);
      execute_locked(actions, deferred);
    } catch (const std::exception& error) {
      spdlog::error("pgrt pool {}: watching an idle connection failed: {}", application_name,
                    error.what());
    }
  }

  void bind_executor_locked(const asio::any_io_executor& candidate) {
    if (executor) return;
    executor = candidate;
    upkeep_timer = std::make_shared<asio::steady_timer>(*executor, Clock::time_point::max());
    spawn_later(upkeep(shared_from_this()));
    Deferred nothing;
    auto& actions = fresh_actions_locked();
    core.tick(Clock::now(), actions);  // min_idle
    execute_locked(actions, nothing);
  }

  // --- background work ----------------------------------------------------------------------

  void start_connect(pool::Node& node) {
    auto attachment = std::make_unique<PooledConnection>(*executor);
    auto& pooled = *attachment;
    node.attachment = std::move(attachment);
    asio::post(*executor, [self = shared_from_this(), &node, &pooled] {
      asio::co_spawn(
          pooled.strand, open_connection(self, &node, pooled.connect_cancel),
          asio::bind_cancellation_slot(pooled.connect_cancel->signal.slot(), asio::detached));
    });
  }

  static asio::awaitable<void> open_connection(
      std::shared_ptr<PoolState> self, pool::Node* node,
      std::shared_ptr<PooledConnection::ConnectCancel> cancel) {
    ConnectOptions options = connect_options(self->config);
    options.application_name = self->application_name;
    error_code error;
    Connection connection;
    if (cancel->cancelled) {  // the pool closed before this connect began
      error = make_error_code(client_errc::cancelled);
    } else {
      std::tie(error, connection) =
          co_await Connection::async_connect(co_await asio::this_coro::executor, std::move(options),
                                             asio::as_tuple(asio::use_awaitable));
    }
    std::string failure;
    if (error && cancel->cancelled) {
      failure = "the pool closed while connecting";
    } else if (error) {
      failure = connection.last_error().message;
      if (!connection.last_error().hint.empty()) {
        failure += " (" + connection.last_error().hint + ")";
      }
    } else if (self->config.on_connect) {
      try {
        co_await cut_at(connection, Clock::now() + self->config.connect.connect_timeout,
                        self->config.on_connect(connection));
      } catch (const std::exception& hook_error) {
        error = make_error_code(client_errc::connect_failed);
        failure = std::string("PoolConfig::on_connect failed: ") + hook_error.what();
        spdlog::warn("pgrt pool {}: {}", self->application_name, failure);
      }
      // Its backend exists: the capacity comes back only once it has ended.
      if (error) co_await close_until_backend_ends(self, connection);
    }
    cancel->finished = true;  // on the strand: a cancel that comes later does nothing
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    auto& actions = self->fresh_actions_locked();
    if (error) {
      self->last_connect_error = failure;
      deferred.add(
          [self, error = error, failure] { emit(self->events.connect_failed, error, failure); });
      self->core.connect_failed(*node, Clock::now(), actions);  // destroys the node
    } else {
      connection_of(*node) = std::move(connection);
      const int pid = connection_of(*node).backend_pid();
      deferred.add([self, pid] { emit(self->events.connected, pid); });
      self->core.connect_succeeded(*node, Clock::now(), actions);
    }
    self->execute_locked(actions, deferred);
  }

  static asio::awaitable<void> reset(std::shared_ptr<PoolState> self, pool::Node* node) {
    Connection& connection = connection_of(*node);
    bool ok = true;
    // Bounded like a connect: a server that answers neither in connect_timeout is not one to
    // hand a connection of to anybody.
    const auto deadline = Clock::now() + self->config.connect.connect_timeout;
    try {
      if (connection.transaction_status() != TransactionStatus::idle) {
        co_await cut_at(connection, deadline, connection.rollback());
      }
      if (self->config.reset == ResetPolicy::discard_all) {
        co_await cut_at(connection, deadline, connection.discard_all());
      }
    } catch (const std::exception& error) {
      ok = false;
      spdlog::warn("pgrt pool: resetting a returned connection ({}) failed: {}",
                   to_string(self->config.reset), error.what());
    }
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    auto& actions = self->fresh_actions_locked();
    self->core.reset_done(*node, ok, Clock::now(), actions);
    self->execute_locked(actions, deferred);
  }

  static asio::awaitable<void> ping(std::shared_ptr<PoolState> self, pool::Node* node) {
    bool ok = true;
    try {
      Connection& connection = connection_of(*node);
      (void)co_await cut_at(connection, Clock::now() + self->config.connect.connect_timeout,
                            connection.query(""));
    } catch (...) {  // NOLINT(bugprone-empty-catch): the core closes a connection that failed
      ok = false;
    }
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    auto& actions = self->fresh_actions_locked();
    self->core.ping_done(*node, ok, Clock::now(), actions);
    self->execute_locked(actions, deferred);
  }

  void start_close(pool::Node& node) {
    // On a strand: close_and_wait() races the socket against a timer.
    asio::post(*executor, [self = shared_from_this(), &node] {
      asio::co_spawn(asio::make_strand(*self->executor), finish_close(self, &node), asio::detached);
    });
  }

  // The capacity is given back only once the server has closed its end of the socket, which it
  // does after the backend has left pg_stat_activity: the strict max holds on the server's side
  // at every instant. A statement still running is cancelled first (close_and_wait() does), so
  // that the backend ends now. A backend that outlives server_close_warning keeps its slot
  // counted (with a warning) until it ends or its socket fails.
  static asio::awaitable<void> finish_close(std::shared_ptr<PoolState> self, pool::Node* node) {
    co_await close_until_backend_ends(self, connection_of(*node));
    // The connection goes outside the lock; the node (and its capacity) under it.
    std::unique_ptr<pool::NodeAttachment> attachment;
    {
      std::lock_guard lock(self->mutex);
      attachment = std::move(node->attachment);
    }
    attachment.reset();
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    auto& actions = self->fresh_actions_locked();
    self->core.backend_ended(*node, Clock::now(), actions);
    self->execute_locked(actions, deferred);
  }

  // Closes `connection` and waits until the server has ended its backend, or backend_end_bound.
  // On a strand (close_and_wait() races the socket against a timer).
  static asio::awaitable<void> close_until_backend_ends(const std::shared_ptr<PoolState>& self,
                                                        Connection& connection) {
    const int pid = connection.backend_pid();
    const auto closed_at = Clock::now();
    (void)co_await connection.close_and_wait(server_close_warning, [&] {
      const auto waited =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - closed_at);
      if (self->backend_end_bound.count() > 0 && waited >= self->backend_end_bound) {
        spdlog::warn(
            "pgrt pool {}: backend {} was not seen to end {} ms after it was closed; its slot is "
            "given back now: by this bound the session guards (keepalives, tcp_user_timeout, "
            "client_connection_check_interval) have made the server end it",
            self->application_name, pid, waited.count());
        return false;
      }
      if (waited < 2 * server_close_warning) {
        spdlog::warn(
            "pgrt pool {}: the server has not ended backend {} {} ms after it was closed; its "
            "slot stays counted against max_size until it does{}",
            self->application_name, pid, waited.count(),
            self->backend_end_bound.count() > 0
                ? " (at most " + std::to_string(self->backend_end_bound.count()) + " ms)"
                : std::string(" (keepalives are off: there is no bound)"));
      }
      return true;
    });
  }

  // Calls the core's tick() when the timer it armed expires, until the pool closes.
  static asio::awaitable<void> upkeep(std::shared_ptr<PoolState> self) {
    for (;;) {
      std::unique_lock lock(self->mutex);
      if (self->core.closed()) co_return;
      (void)co_await async::wait_locked(lock, *self->upkeep_timer);
      Deferred deferred;  // its events run after the lock is released below
      if (self->core.closed()) co_return;
      const auto now = Clock::now();
      if (self->upkeep_timer->expiry() > now) continue;  // re-armed meanwhile
      auto& actions = self->fresh_actions_locked();
      self->upkeep_timer->expires_at(Clock::time_point::max());
      self->core.tick(now, actions);
      self->execute_locked(actions, deferred);
      lock.unlock();
    }
  }

  // --- acquire and release --------------------------------------------------------------------

  std::string describe_load_locked() const {
    const auto stats = core.stats();
    return std::to_string(stats.count(pool::NodeState::leased)) + " of max " +
           std::to_string(config.max_size) + " connections in use, " +
           std::to_string(stats.count(pool::NodeState::connecting)) + " connecting, " +
           std::to_string(stats.waiting_normal + stats.waiting_high) + " callers waiting";
  }

  // `self` is this state, held by the coroutine frame so that the state outlives the acquire even
  // if the Pool object goes away meanwhile (and handed to the Lease).
  // `deadline`: when the caller's acquire_timeout ends, for an acquire started over after a
  // failed check before handout (none: from now).
  asio::awaitable<Lease> acquire(std::shared_ptr<PoolState> self, Priority priority,
                                 std::source_location site,
                                 std::optional<Clock::time_point> deadline = std::nullopt) {
    // A caller already cancelled: reported as client_errc::cancelled and counted. (Under asio's
    // default this_coro::throw_if_cancelled(true), asio itself throws operation_aborted at the
    // caller's co_await before the pool is reached; see pool.hpp.)
    if ((co_await asio::this_coro::cancellation_state).cancelled() !=
        asio::cancellation_type::none) {
      std::lock_guard lock(mutex);
      fail_cancelled_locked(priority, site);
    }
    const auto now = coarse_now();
    Deferred deferred;  // declared before the lock: its events run after it is released
    std::unique_lock lock(mutex);
    if (!executor && !core.closed()) {
      // co_await this_coro::executor never suspends: it is safe under the lock.
      bind_executor_locked(co_await asio::this_coro::executor);
    }
    auto& actions = fresh_actions_locked();
    const auto result = core.try_acquire(priority, site, now, actions);
    execute_locked(actions, deferred);
    switch (result.kind) {
      case pool::AcquireResult::Kind::leased: {
        waits.record(std::chrono::microseconds(0));
        lock.unlock();
        // The Lease owns the connection before any event runs: nothing can leak its slot.
        const bool check = result.validate || config.before_handout;
        Lease lease(check ? self : std::move(self), result.node);
        emit(events.acquired, site);
        if (!check) co_return lease;
        co_return co_await checked(std::move(lease), std::move(self), priority, site,
                                   deadline.value_or(Clock::now() + checkout_limit()),
                                   result.validate);
      }
      case pool::AcquireResult::Kind::closed:
      case pool::AcquireResult::Kind::queue_full:
      case pool::AcquireResult::Kind::no_wait:
        fail_admission_locked(result.kind);
      case pool::AcquireResult::Kind::wait:
        break;
    }
    if ((co_await asio::this_coro::cancellation_state).cancelled() !=
        asio::cancellation_type::none) {
      fail_cancelled_locked(priority, site);
    }
    const auto started = Clock::now();
    auto wait_limit = result.wait_limit;
    if (deadline) {
      wait_limit =
          std::max(std::chrono::milliseconds(0),
                   std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - started));
    }
    PoolWaiter waiter(co_await asio::this_coro::executor, priority, site);
    // If this coroutine is destroyed while it waits (its io_context shut down), the waiter must
    // leave the queue, and a connection already handed to it must go back.
    auto& enqueued = fresh_actions_locked();
    core.enqueue(waiter, now, enqueued);
    execute_locked(enqueued, deferred);
    async::AbandonGuard abandon([this, &waiter, &lock] {
      pool::Node* handed = nullptr;
      {
        std::unique_lock relock(mutex, std::defer_lock);
        if (!lock.owns_lock()) relock.lock();
        pool::Actions ignored;
        core.withdraw(waiter, pool::FailReason::cancelled, ignored);
        if (waiter.outcome == pool::Waiter::Outcome::handed) handed = waiter.handed;
      }
      if (handed != nullptr && !lock.owns_lock()) release(*handed, false);
    });
    waiter.timer.expires_after(wait_limit);
    // The wait starts under the lock, so a handoff cannot slip in before it.
    // (The wait as a plain asynchronous operation: no coroutine frame of its own on this path.)
    const auto [error] = co_await async::wait_then_unlock(lock, waiter.timer);
    lock = std::unique_lock(mutex);
    abandon.disarm();
    if (waiter.outcome == pool::Waiter::Outcome::handed) {
      waits.record(std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - started));
      lock.unlock();
      const bool check = static_cast<bool>(config.before_handout);
      Lease lease(check ? self : std::move(self), waiter.handed);
      emit(events.acquired, site);
      if (!check) co_return lease;
      co_return co_await checked(std::move(lease), std::move(self), priority, site,
                                 started + wait_limit, false);
    }
    fail_wait(lock, waiter, error, wait_limit);
  }

  // The failures of an acquire, apart from its coroutine, so that their strings are not part of
  // its frame: a frame too large for asio's recycling allocator would cost a malloc per acquire.
  [[noreturn]] void fail_cancelled_locked(Priority priority, std::source_location site) {
    pool::Waiter gone(priority, site);
    core.withdraw(gone, pool::FailReason::cancelled, fresh_actions_locked());  // counted
    throw_pool_error(client_errc::cancelled, "waiting for a pooled connection was cancelled");
  }

  [[noreturn]] void fail_admission_locked(pool::AcquireResult::Kind kind) {
    if (kind == pool::AcquireResult::Kind::closed) {
      throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " is closed");
    }
    if (kind == pool::AcquireResult::Kind::queue_full) {
      throw_pool_error(client_errc::pool_queue_full,
                       "the pool " + application_name + " already has " +
                           std::to_string(config.max_waiters) + " callers waiting (" +
                           describe_load_locked() + ")",
                       "raise PoolConfig::max_waiters, or shed load earlier");
    }
    throw_pool_error(
        client_errc::pool_timeout,
        "no connection free in the pool " + application_name + " (" + describe_load_locked() +
            ") and acquire_timeout is 0" +
            (last_connect_error.empty() ? std::string()
                                        : "; last connect error: " + last_connect_error));
  }

  // A waiter woken without a connection: the pool closed, it was cancelled, or its time ran out.
  [[noreturn]] void fail_wait(std::unique_lock<std::mutex>& lock, pool::Waiter& waiter,
                              error_code error, std::chrono::milliseconds wait_limit) {
    const std::string load = describe_load_locked();  // counting this caller among the waiting
    if (waiter.outcome == pool::Waiter::Outcome::none) {
      core.withdraw(waiter, error ? pool::FailReason::cancelled : pool::FailReason::timeout,
                    fresh_actions_locked());
    }
    switch (waiter.failed) {
      case pool::FailReason::pool_closed:
        throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " was closed");
      case pool::FailReason::cancelled:
        throw_pool_error(client_errc::cancelled, "waiting for a pooled connection was cancelled");
      case pool::FailReason::timeout:
        break;
    }
    std::string message = "timed out after " + std::to_string(wait_limit.count()) +
                          " ms waiting for a connection from the pool " + application_name + " (" +
                          load + ")";
    if (!last_connect_error.empty()) message += "; last connect error: " + last_connect_error;
    lock.unlock();
    emit(events.acquire_timeout, message);
    throw_pool_error(client_errc::pool_timeout, message,
                     "hold leases for shorter, raise max_size, or check the server");
  }

  // How long an acquire may take in all, checks before handout included.
  [[nodiscard]] std::chrono::milliseconds checkout_limit() const {
    return config.acquire_timeout.count() > 0 ? config.acquire_timeout
                                              : config.connect.connect_timeout;
  }

  // The checks before handout, cut at the acquire's deadline: the validate_after_idle ping (for
  // a connection that sat idle), then PoolConfig::before_handout. A connection that fails one is
  // closed and the acquire starts over, with what is left of its time.
  static asio::awaitable<Lease> checked(Lease lease, std::shared_ptr<PoolState> self,
                                        Priority priority, std::source_location site,
                                        Clock::time_point deadline, bool validate) {
    bool usable = true;
    DiscardReason reason = DiscardReason::broken;
    try {
      Connection& connection = *lease;
      if (validate) (void)co_await cut_at(connection, deadline, connection.query(""));
      if (self->config.before_handout) {
        reason = DiscardReason::rejected;
        usable = co_await cut_at(connection, deadline, self->config.before_handout(connection));
      }
    } catch (const Error& error) {
      if (error.code() == client_errc::cancelled) throw;  // the caller gave up: so do we
      usable = false;
    } catch (const std::exception& error) {
      spdlog::warn("pgrt pool {}: PoolConfig::before_handout threw: {}", self->application_name,
                   error.what());
      usable = false;
    }
    if (usable) co_return lease;
    self->refuse(std::move(lease), reason);
    co_return co_await self->acquire(self, priority, site, deadline);
  }

  // A leased connection that a check before handout refused: closed.
  void refuse(Lease lease, DiscardReason reason) noexcept {
    pool::Node* node = std::exchange(lease.node_, nullptr);
    lease.pool_.reset();
    try {
      Deferred deferred;
      std::lock_guard lock(mutex);
      auto& actions = fresh_actions_locked();
      core.checkout_failed(*node, reason, coarse_now(), actions);
      execute_locked(actions, deferred);
    } catch (const std::exception& error) {
      spdlog::error("pgrt pool: closing a refused connection failed: {}", error.what());
    }
  }

  void release(pool::Node& node, bool discard) noexcept {
    try {
      const auto kind = discard ? pool::ReturnKind::discard : classify(connection_of(node));
      const auto now = coarse_now();
      Deferred deferred;
      std::lock_guard lock(mutex);
      auto& actions = fresh_actions_locked();
      if (events.released.ever_connected()) deferred.add([this] { emit(events.released); });
      core.lease_returned(node, kind, now, actions);
      execute_locked(actions, deferred);
    } catch (const std::exception& error) {
      spdlog::error("pgrt pool: returning a connection failed: {}", error.what());
    }
  }

  PoolStats stats() const {
    std::lock_guard lock(mutex);
    const pool::CoreStats counts = core.stats();
    PoolStats snapshot;
    snapshot.max = counts.max;
    snapshot.size = counts.live;
    snapshot.idle = counts.count(pool::NodeState::idle);
    snapshot.in_use = counts.count(pool::NodeState::leased);
    snapshot.connecting = counts.count(pool::NodeState::connecting);
    snapshot.closing = counts.count(pool::NodeState::closing);
    snapshot.resetting = counts.count(pool::NodeState::resetting);
    snapshot.pinging = counts.count(pool::NodeState::pinging);
    snapshot.waiting_normal = counts.waiting_normal;
    snapshot.waiting_high = counts.waiting_high;
    snapshot.acquired = counts.acquired;
    snapshot.timeouts = counts.timeouts;
    snapshot.cancellations = counts.cancellations;
    snapshot.connect_attempts = counts.connect_attempts;
    snapshot.connect_errors = counts.connect_errors;
    snapshot.discarded = counts.discarded;
    snapshot.leaks_suspected = counts.leaks_suspected;
    snapshot.wait_p50 = waits.percentile(0.5);
    snapshot.wait_p99 = waits.percentile(0.99);
    snapshot.wait_max = waits.max();
    snapshot.last_connect_error = last_connect_error;
    snapshot.consecutive_connect_failures = counts.consecutive_connect_failures;
    snapshot.connect_backoff = counts.connect_backoff;
    return snapshot;
  }

  // Every connection in one of these states, under the lock.
  template <typename Visit>
  void for_each_locked(std::initializer_list<pool::NodeState> states, Visit&& visit) const {
    for (pool::NodeState state : states) {
      core.nodes(state).for_each([&](const pool::Node& node) { visit(node); });
    }
  }

  // The shutdown, in order (shutdown.cpp).
  void close_now() noexcept;
  void begin_close();
  static asio::awaitable<std::vector<std::string>> close(std::shared_ptr<PoolState> self,
                                                         std::chrono::milliseconds grace);
};

// When `pool` is the process-wide pool, forgets it (a closed pool is no longer pgrt::pool(), and
// configure() may run again) and returns it, so that the caller keeps it alive to its end
// (process_pool.cpp).
std::shared_ptr<Pool> forget_if_process_pool(const Pool* pool);

}  // namespace pgrt::detail
