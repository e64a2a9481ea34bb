#include "pgrt/db/pool.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <ctime>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <spdlog/spdlog.h>
#include <unordered_map>
#include <unordered_set>

#include "connection_node.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/runtime/identity.hpp"

namespace pgrt {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

// The time for the pool's coarse decisions (lifetime, idle age, lease age) on the acquire and
// release paths: CLOCK_MONOTONIC_COARSE, the timeline of steady_clock (CLOCK_MONOTONIC in
// libstdc++ on Linux) as of the last kernel tick, a few milliseconds behind at most. It is a plain
// read from the vDSO, several times cheaper than steady_clock::now(), which the uncontended
// acquire would otherwise pay twice. Waits are measured with steady_clock.
namespace {
Clock::time_point coarse_now() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return Clock::time_point(std::chrono::duration_cast<Clock::duration>(
      std::chrono::seconds(now.tv_sec) + std::chrono::nanoseconds(now.tv_nsec)));
}
}  // namespace
using boost::system::error_code;

namespace {

constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);

std::string make_application_name(const PoolConfig& config) {
  return make_connection_tag(config.application, config.instance);
}

// The pool's connect options: the config's, with its conninfo and the session guards.
ConnectOptions connect_options(const PoolConfig& config) {
  ConnectOptions options = config.connect;
  options.conninfo = config.conninfo;
  return with_session_guards(std::move(options), config.guards);
}

std::string describe_site(const std::source_location& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line()) + " (" +
         site.function_name() + ")";
}

[[noreturn]] void throw_pool_error(client_errc code, std::string message, std::string hint = {}) {
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

}  // namespace

std::string_view to_string(DiscardReason reason) noexcept {
  switch (reason) {
    case DiscardReason::broken:
      return "broken";
    case DiscardReason::lifetime:
      return "lifetime";
    case DiscardReason::idle_timeout:
      return "idle_timeout";
    case DiscardReason::failed_reset:
      return "failed_reset";
    case DiscardReason::mid_query:
      return "mid_query";
    case DiscardReason::closing:
      return "closing";
  }
  return "unknown";
}

std::string_view to_string(ResetPolicy policy) noexcept {
  switch (policy) {
    case ResetPolicy::rollback:
      return "rollback";
    case ResetPolicy::discard_all:
      return "discard_all";
  }
  return "unknown";
}

std::string PoolStats::to_json() const {
  std::string escaped;
  for (char c : last_connect_error) {
    if (c == '"' || c == '\\') {
      escaped += '\\';
      escaped += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      escaped += ' ';
    } else {
      escaped += c;
    }
  }
  auto field = [](const char* name, auto value) {
    return std::string("\"") + name + "\":" + std::to_string(value);
  };
  return "{" + field("max", max) + "," + field("size", size) + "," + field("idle", idle) + "," +
         field("in_use", in_use) + "," + field("connecting", connecting) + "," +
         field("closing", closing) + "," + field("waiting_normal", waiting_normal) + "," +
         field("waiting_high", waiting_high) + "," + field("acquired", acquired) + "," +
         field("timeouts", timeouts) + "," + field("cancellations", cancellations) + "," +
         field("connect_attempts", connect_attempts) + "," +
         field("connect_errors", connect_errors) + "," + field("discarded", discarded) + "," +
         field("leaks_suspected", leaks_suspected) + "," + field("wait_p50_us", wait_p50.count()) +
         "," + field("wait_p99_us", wait_p99.count()) + "," +
         field("wait_max_us", wait_max.count()) + "," +
         field("consecutive_connect_failures", consecutive_connect_failures) + "," +
         field("connect_backoff_ms", connect_backoff.count()) + ",\"last_connect_error\":\"" +
         escaped + "\"}";
}

namespace detail {

namespace {
std::atomic<std::uint64_t> illegal_transitions{0};
}  // namespace

std::uint64_t illegal_node_transitions() noexcept {
  return illegal_transitions.load(std::memory_order_relaxed);
}

struct PooledConnection {
  Connection connection;
  Clock::time_point expires = Clock::time_point::max();
  Clock::time_point idle_since{};
  Clock::time_point last_ping{};
  Priority priority = Priority::normal;
  // While leased: where and when, for leak reports and close(); its place in PoolState::leased.
  std::source_location lease_site;
  Clock::time_point leased_at{};
  bool leak_reported = false;
  std::size_t leased_index = 0;
  bool refresh_idle_since = true;  // false when it comes back from a keepalive ping
  bool session_used = false;       // leased since its last DISCARD ALL (ResetPolicy::discard_all)
  NodeState state = NodeState::connecting;

  // Moves through the connection's state machine; a transition it does not allow is a pool bug,
  // logged loudly (the state is left as it was).
  void advance(NodeEvent event) noexcept {
    if (auto next = node_transition(state, event)) {
      state = *next;
      return;
    }
    illegal_transitions.fetch_add(1, std::memory_order_relaxed);
    spdlog::error("pgrt pool: illegal connection state transition from {} (event {})",
                  to_string(state), static_cast<int>(event));
  }
};

// A discarded connection keeps its capacity until the server has closed its end of the socket.
// It is checked every `server_close_poll` whether the pool is closing (then the wait ends) and,
// once `server_close_limit` has passed, a warning is logged: the slot stays counted while the
// server keeps the backend (or until the socket fails: tcp_user_timeout, keepalives).
constexpr std::chrono::milliseconds server_close_poll{250};
constexpr std::chrono::milliseconds server_close_limit{2000};
// How long close_now() waits for each cancel request to go out.
constexpr std::chrono::milliseconds exit_cancel_wait{1000};

struct Waiter {
  Waiter(const asio::any_io_executor& executor, Priority priority_in, std::source_location site_in)
      : timer(executor), priority(priority_in), site(site_in) {}
  asio::steady_timer timer;
  Priority priority;
  std::source_location site;
  std::unique_ptr<PooledConnection> handed;  // set by a direct handoff
  bool pool_closed = false;
};

struct PoolState : std::enable_shared_from_this<PoolState> {
  explicit PoolState(PoolConfig config_in)
      : config(std::move(config_in)),
        application_name(make_application_name(config)),
        random(std::random_device{}()) {
    leased.reserve(std::min<std::size_t>(config.max_size, 1024));  // beyond, push_back may grow
  }

  mutable std::mutex mutex;
  const PoolConfig config;
  const std::string application_name;
  PoolEvents events;
  std::optional<asio::any_io_executor> executor;
  // Used only on the executor; close() cancels them through it, so that a closed pool does not
  // keep its io_context running.
  std::shared_ptr<asio::steady_timer> maintenance_timer;
  std::shared_ptr<asio::steady_timer> retry_timer;

  std::size_t open = 0;  // every connection counted against max_size, in any state
  std::size_t connecting = 0;
  std::size_t in_use = 0;
  std::size_t in_use_normal = 0;
  std::size_t background = 0;  // connections in a ROLLBACK or ping, out of every other set
  std::size_t closing = 0;     // closed, waiting for the server to end the backend; in `open`
  std::unordered_set<Connection*> in_background;        // those connections, for close()
  std::vector<std::unique_ptr<PooledConnection>> idle;  // back: most recently returned
  std::array<std::deque<Waiter*>, 2> waiters;           // [normal, high], FIFO
  bool pool_closing = false;

  std::uint32_t consecutive_failures = 0;
  Clock::time_point retry_at{};
  std::chrono::milliseconds current_backoff{0};  // the wait before the next connect attempt
  bool retry_scheduled = false;
  std::string last_connect_error;

  // The leased connections (their Leases own them), for leak checks and close(). Reserved to
  // max_size, so leasing never allocates.
  std::vector<PooledConnection*> leased;

  std::uint64_t acquired = 0, timeouts = 0, cancellations = 0, connect_attempts = 0,
                connect_errors = 0, discarded = 0, leaks_suspected = 0;
  WaitHistogram waits;
  std::mt19937_64 random;

  static std::size_t index(Priority priority) { return priority == Priority::high ? 1 : 0; }

  // --- bookkeeping (all *_locked functions need `mutex` held) --------------------------------

  // Starts background work later, never inline: co_spawn dispatches, so from the io_context's
  // own thread it would run the coroutine at once, under the pool's lock.
  void spawn_later(asio::awaitable<void> operation) {
    asio::post(*executor, [executor = *executor, operation = std::move(operation)]() mutable {
      asio::co_spawn(executor, std::move(operation), asio::detached);
    });
  }

  void bind_executor_locked(const asio::any_io_executor& candidate) {
    if (executor) return;
    executor = candidate;
    maintenance_timer = std::make_shared<asio::steady_timer>(*executor);
    retry_timer = std::make_shared<asio::steady_timer>(*executor);
    spawn_later(maintain(shared_from_this()));
    Deferred nothing;
    maybe_open_locked(nothing);
  }

  [[nodiscard]] bool can_lease_locked(Priority priority) const {
    return priority == Priority::high ||
           in_use_normal < config.max_size - config.reserved_for_priority;
  }

  [[nodiscard]] bool expired(const PooledConnection& pooled, Clock::time_point now) const {
    return now >= pooled.expires;
  }

  Clock::time_point lifetime_deadline() {
    if (config.max_lifetime.count() == 0) return Clock::time_point::max();
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    const double shortened = 1.0 - config.lifetime_jitter * unit(random);
    return Clock::now() +
           std::chrono::duration_cast<Clock::duration>(config.max_lifetime * shortened);
  }

  void lease_locked(PooledConnection& pooled, Priority priority, std::source_location site,
                    Clock::time_point now) {
    pooled.leased_index = leased.size();
    leased.push_back(&pooled);  // first: if it throws, nothing is counted yet
    ++in_use;
    if (priority == Priority::normal) ++in_use_normal;
    pooled.priority = priority;
    pooled.session_used = true;
    pooled.lease_site = site;
    pooled.leased_at = now;
    pooled.leak_reported = false;
    ++acquired;
  }

  void unlease_locked(PooledConnection& pooled) {
    --in_use;
    if (pooled.priority == Priority::normal) --in_use_normal;
    PooledConnection* last = leased.back();
    leased[pooled.leased_index] = last;
    last->leased_index = pooled.leased_index;
    leased.pop_back();
  }

  // Gives a free connection to the oldest waiter that may take it, or to the idle set.
  void hand_off_locked(std::unique_ptr<PooledConnection> pooled, Deferred& deferred,
                       Clock::time_point now = coarse_now()) {
    for (Priority priority : {Priority::high, Priority::normal}) {
      auto& queue = waiters[index(priority)];
      if (queue.empty() || !can_lease_locked(priority)) continue;
      Waiter* waiter = queue.front();
      queue.pop_front();
      pooled->advance(NodeEvent::lease);
      lease_locked(*pooled, priority, waiter->site, now);
      waiter->handed = std::move(pooled);
      waiter->timer.cancel();  // wakes it: it finds `handed` set
      return;
    }
    if (pooled->refresh_idle_since) pooled->idle_since = now;
    pooled->refresh_idle_since = true;
    idle.push_back(std::move(pooled));
    (void)deferred;
  }

  // Hands idle connections to waiters that may now take them (a normal lease came back, so a
  // normal waiter may use an idle connection it was kept from by reserved_for_priority).
  void serve_idle_locked(Deferred& deferred) {
    while (!idle.empty() &&
           ((!waiters[1].empty()) || (!waiters[0].empty() && can_lease_locked(Priority::normal)))) {
      auto pooled = std::move(idle.back());
      idle.pop_back();
      hand_off_locked(std::move(pooled), deferred);
    }
  }

  void discard_locked(std::unique_ptr<PooledConnection> pooled, DiscardReason reason,
                      Deferred& deferred) {
    pooled->advance(NodeEvent::discard);
    ++discarded;
    deferred.add([this, reason] { emit(events.discarded, reason); });
    ++closing;
    // On a strand: close_and_wait() races the socket against a timer.
    asio::post(*executor, [self = shared_from_this(), pooled = std::move(pooled)]() mutable {
      asio::co_spawn(asio::make_strand(*self->executor), finish_close(self, std::move(pooled)),
                     asio::detached);
    });
  }

  // The capacity is given back only once the server has closed its end of the socket, which it
  // does after the backend has left pg_stat_activity: the strict max holds on the server's side
  // at every instant. A statement still running is cancelled first (close_and_wait() does), so
  // that the backend ends now. A backend that outlives server_close_limit keeps its slot counted
  // (with a warning) until it ends, its socket fails, or the pool closes.
  static asio::awaitable<void> finish_close(std::shared_ptr<PoolState> self,
                                            std::unique_ptr<PooledConnection> pooled) {
    const int pid = pooled->connection.backend_pid();
    const auto started = Clock::now();
    bool warned = false;
    (void)co_await pooled->connection.close_and_wait(server_close_poll, [&] {
      std::lock_guard lock(self->mutex);
      if (self->pool_closing) return false;
      if (!warned && Clock::now() - started >= server_close_limit) {
        warned = true;
        spdlog::warn(
            "pgrt pool {}: the server has not ended backend {} {} ms after it was closed; its "
            "slot stays counted against max_size until it does",
            self->application_name, pid, server_close_limit.count());
      }
      return true;
    });
    pooled.reset();
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    --self->closing;
    --self->open;
    self->maybe_open_locked(deferred);
  }

  // Returns a connection that nobody holds: reset it if needed, else keep or discard it.
  void return_locked(std::unique_ptr<PooledConnection> pooled, Deferred& deferred) {
    if (pooled->state == NodeState::leased) pooled->advance(NodeEvent::returned);
    Connection& connection = pooled->connection;
    if (pool_closing) return discard_locked(std::move(pooled), DiscardReason::closing, deferred);
    if (!connection.is_open() || connection.is_broken()) {
      return discard_locked(std::move(pooled), DiscardReason::broken, deferred);
    }
    const auto status = connection.transaction_status();
    if (status != TransactionStatus::idle && status != TransactionStatus::in_transaction &&
        status != TransactionStatus::in_error) {
      // A statement still running: its coroutine was destroyed mid-operation.
      return discard_locked(std::move(pooled), DiscardReason::mid_query, deferred);
    }
    if (status != TransactionStatus::idle ||
        (config.reset == ResetPolicy::discard_all && pooled->session_used)) {
      // Capacity stays held while the ROLLBACK (or DISCARD ALL) runs.
      pooled->advance(NodeEvent::needs_reset);
      ++background;
      in_background.insert(&pooled->connection);
      spawn_later(reset(shared_from_this(), std::move(pooled)));
      return;
    }
    const auto now = coarse_now();
    if (expired(*pooled, now)) {
      return discard_locked(std::move(pooled), DiscardReason::lifetime, deferred);
    }
    hand_off_locked(std::move(pooled), deferred, now);
  }

  [[nodiscard]] std::size_t servable_waiters_locked() const {
    const std::size_t normal_room =
        config.max_size - config.reserved_for_priority > in_use_normal
            ? config.max_size - config.reserved_for_priority - in_use_normal
            : 0;
    return waiters[1].size() + std::min(waiters[0].size(), normal_room);
  }

  // Opens connections while there are waiters (or min_idle) to serve and room under max_size.
  // After a failed connect, waits out the backoff, then probes with one connect at a time.
  void maybe_open_locked(Deferred& deferred) {
    if (pool_closing || !executor) return;
    const std::size_t ready = idle.size() + connecting;
    std::size_t wanted = servable_waiters_locked();
    // Every live connection counts towards min_idle: idle, leased, connecting, and those in a
    // background ROLLBACK or keepalive ping (they come back); not those being closed.
    const std::size_t alive = open - closing;
    if (alive < config.min_idle) wanted = std::max(wanted, ready + (config.min_idle - alive));
    if (wanted <= ready) return;
    if (consecutive_failures > 0 && Clock::now() < retry_at) {
      schedule_retry_locked();
      return;
    }
    std::size_t to_open = wanted - ready;
    while (to_open-- > 0 && open < config.max_size) {
      if (consecutive_failures > 0 && connecting > 0) break;  // one probe at a time
      ++open;
      ++connecting;
      ++connect_attempts;
      spawn_later(open_connection(shared_from_this()));
    }
    (void)deferred;
  }

  void schedule_retry_locked() {
    if (retry_scheduled) return;
    retry_scheduled = true;
    spawn_later(retry_later(shared_from_this()));
  }

  std::chrono::milliseconds backoff_locked() {
    const auto exponent = std::min<std::uint32_t>(consecutive_failures - 1, 20);
    auto delay = config.connect_backoff_initial * (std::int64_t{1} << exponent);
    delay = std::min(delay, config.connect_backoff_max);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    return std::chrono::duration_cast<std::chrono::milliseconds>(
        delay * (1.0 - config.connect_backoff_jitter * unit(random)));
  }

  std::string describe_load_locked() const {
    return std::to_string(in_use) + " of max " + std::to_string(config.max_size) +
           " connections in use, " + std::to_string(connecting) + " connecting, " +
           std::to_string(waiters[0].size() + waiters[1].size()) + " callers waiting";
  }

  // --- background work -------------------------------------------------------------------------

  static asio::awaitable<void> open_connection(std::shared_ptr<PoolState> self) {
    ConnectOptions options = connect_options(self->config);
    options.application_name = self->application_name;
    auto [error, connection] = co_await Connection::async_connect(
        *self->executor, std::move(options), asio::as_tuple(asio::use_awaitable));
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    --self->connecting;
    if (error) {
      --self->open;
      ++self->consecutive_failures;
      ++self->connect_errors;
      self->last_connect_error = connection.last_error().message;
      if (!connection.last_error().hint.empty()) {
        self->last_connect_error += " (" + connection.last_error().hint + ")";
      }
      self->current_backoff = self->backoff_locked();
      self->retry_at = Clock::now() + self->current_backoff;
      deferred.add([self, error = error, message = self->last_connect_error] {
        emit(self->events.connect_failed, error, message);
      });
      self->maybe_open_locked(deferred);
      co_return;
    }
    self->consecutive_failures = 0;
    self->current_backoff = std::chrono::milliseconds(0);
    auto pooled = std::make_unique<PooledConnection>();
    pooled->advance(NodeEvent::connected);
    pooled->connection = std::move(connection);
    pooled->expires = self->lifetime_deadline();
    pooled->last_ping = Clock::now();
    const int pid = pooled->connection.backend_pid();
    deferred.add([self, pid] { emit(self->events.connected, pid); });
    if (self->pool_closing) {
      self->discard_locked(std::move(pooled), DiscardReason::closing, deferred);
    } else {
      self->hand_off_locked(std::move(pooled), deferred);
    }
    self->maybe_open_locked(deferred);
  }

  // Starts `timer` under the mutex (begin_close() cancels it under the mutex too, so the two never
  // race) and waits. False if the pool was already closing.
  static asio::awaitable<bool> wait_under_lock(const std::shared_ptr<PoolState>& self,
                                               asio::steady_timer& timer, Clock::time_point until) {
    std::unique_lock lock(self->mutex);
    if (self->pool_closing) co_return false;
    timer.expires_at(until);
    co_await asio::async_initiate<decltype(no_throw), void(error_code)>(
        [&](auto handler) {
          std::mutex* held = lock.release();
          timer.async_wait(std::move(handler));
          held->unlock();
        },
        no_throw);
    co_return true;
  }

  static asio::awaitable<void> retry_later(std::shared_ptr<PoolState> self) {
    co_await wait_under_lock(self, *self->retry_timer, self->retry_at);
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    self->retry_scheduled = false;
    self->maybe_open_locked(deferred);
  }

  static asio::awaitable<void> reset(std::shared_ptr<PoolState> self,
                                     std::unique_ptr<PooledConnection> pooled) {
    bool ok = true;
    try {
      if (pooled->connection.transaction_status() != TransactionStatus::idle) {
        co_await pooled->connection.rollback();
      }
      if (self->config.reset == ResetPolicy::discard_all) {
        co_await pooled->connection.discard_all();
        pooled->session_used = false;
      }
    } catch (const std::exception& error) {
      ok = false;
      spdlog::warn("pgrt pool: resetting a returned connection ({}) failed: {}",
                   to_string(self->config.reset), error.what());
    }
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    --self->background;
    self->in_background.erase(&pooled->connection);
    if (ok) pooled->advance(NodeEvent::reset_done);
    if (!ok) {
      self->discard_locked(std::move(pooled), DiscardReason::failed_reset, deferred);
    } else {
      self->return_locked(std::move(pooled), deferred);
    }
  }

  static asio::awaitable<void> ping(std::shared_ptr<PoolState> self,
                                    std::unique_ptr<PooledConnection> pooled) {
    try {
      co_await pooled->connection.query("");
      pooled->last_ping = Clock::now();
      pooled->refresh_idle_since = false;  // a ping is not use: idle_timeout still counts
    } catch (...) {  // NOLINT(bugprone-empty-catch): return_locked() discards a dead connection
      pooled->connection.close(CloseMode::immediate);
    }
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    --self->background;
    self->in_background.erase(&pooled->connection);
    pooled->advance(NodeEvent::ping_done);
    self->return_locked(std::move(pooled), deferred);
  }

  // Idle upkeep, keepalive pings and leak detection, until the pool closes.
  static asio::awaitable<void> maintain(std::shared_ptr<PoolState> self) {
    auto period = std::chrono::milliseconds(1000);
    if (self->config.leak_threshold.count() > 0) {
      period = std::clamp(self->config.leak_threshold / 4, std::chrono::milliseconds(10), period);
    }
    for (;;) {
      if (!co_await wait_under_lock(self, *self->maintenance_timer, Clock::now() + period)) {
        co_return;
      }
      Deferred deferred;
      std::lock_guard lock(self->mutex);
      if (self->pool_closing) co_return;
      self->upkeep_locked(deferred);
    }
  }

  void upkeep_locked(Deferred& deferred) {
    const auto now = Clock::now();
    std::vector<std::unique_ptr<PooledConnection>> keep;
    std::vector<std::unique_ptr<PooledConnection>> to_ping;
    std::vector<std::pair<std::unique_ptr<PooledConnection>, DiscardReason>> to_discard;
    for (auto& pooled : idle) {
      if (expired(*pooled, now)) {
        to_discard.emplace_back(std::move(pooled), DiscardReason::lifetime);
      } else if (config.idle_timeout.count() > 0 &&
                 now - pooled->idle_since > config.idle_timeout &&
                 open - closing - to_discard.size() > config.min_idle) {
        to_discard.emplace_back(std::move(pooled), DiscardReason::idle_timeout);
      } else if (config.keepalive_interval.count() > 0 &&
                 now - pooled->last_ping > config.keepalive_interval) {
        to_ping.push_back(std::move(pooled));
      } else {
        keep.push_back(std::move(pooled));
      }
    }
    idle = std::move(keep);
    for (auto& [pooled, reason] : to_discard) discard_locked(std::move(pooled), reason, deferred);
    for (auto& pooled : to_ping) {
      pooled->advance(NodeEvent::ping);
      ++background;
      in_background.insert(&pooled->connection);
      spawn_later(ping(shared_from_this(), std::move(pooled)));
    }
    if (config.leak_threshold.count() > 0) {
      for (PooledConnection* record : leased) {
        const auto age =
            std::chrono::duration_cast<std::chrono::milliseconds>(now - record->leased_at);
        if (record->leak_reported || age < config.leak_threshold) continue;
        record->leak_reported = true;
        ++leaks_suspected;
        spdlog::warn(
            "pgrt pool {}: a connection acquired at {} has been held for {} ms (leak_threshold "
            "{} ms); is a Lease kept alive by mistake?",
            application_name, describe_site(record->lease_site), age.count(),
            config.leak_threshold.count());
        deferred.add(
            [this, site = record->lease_site, age] { emit(events.leak_suspected, site, age); });
      }
    }
    maybe_open_locked(deferred);
  }

  // --- acquire and release --------------------------------------------------------------------

  // `self` is this state, held by the coroutine frame so that the state outlives the acquire even
  // if the Pool object goes away meanwhile (and handed to the Lease).
  asio::awaitable<Lease> acquire(std::shared_ptr<PoolState> self, Priority priority,
                                 std::source_location site) {
    const auto now = coarse_now();
    Deferred deferred;  // declared before the lock: its events run after it is released
    std::unique_lock lock(mutex);
    if (pool_closing) {
      throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " is closed");
    }
    if (!executor) {
      // co_await this_coro::executor never suspends: it is safe under the lock.
      const auto caller_executor = co_await asio::this_coro::executor;
      bind_executor_locked(caller_executor);
    }
    const auto me = index(priority);
    // Fast path: nobody of this priority (or higher) is waiting and an idle connection is free.
    const bool nobody_ahead = waiters[1].empty() && (me == 1 || waiters[0].empty());
    while (nobody_ahead && !idle.empty() && can_lease_locked(priority)) {
      auto pooled = std::move(idle.back());
      idle.pop_back();
      if (expired(*pooled, now)) {
        discard_locked(std::move(pooled), DiscardReason::lifetime, deferred);
        continue;
      }
      const bool validate = config.validate_after_idle.count() > 0 &&
                            now - pooled->idle_since > config.validate_after_idle;
      pooled->advance(NodeEvent::lease);
      lease_locked(*pooled, priority, site, now);
      waits.record(std::chrono::microseconds(0));
      lock.unlock();
      // The Lease owns the connection before any event runs: nothing can leak its slot.
      Lease lease(validate ? self : std::move(self), std::move(pooled));
      emit(events.acquired, site);
      if (!validate) co_return lease;
      try {
        co_await lease->query("");
        co_return lease;
      } catch (const Error& error) {
        if (error.code() == client_errc::cancelled) throw;  // the caller gave up: so do we
      }
      lease.release();  // dead: discarded on return; start over
      co_return co_await acquire(std::move(self), priority, site);
    }

    if (waiters[0].size() + waiters[1].size() >= config.max_waiters) {
      throw_pool_error(client_errc::pool_queue_full,
                       "the pool " + application_name + " already has " +
                           std::to_string(config.max_waiters) + " callers waiting (" +
                           describe_load_locked() + ")",
                       "raise PoolConfig::max_waiters, or shed load earlier");
    }
    // acquire_timeout 0 means: never wait for a lease to come back. A connection that can still be
    // opened under the max is waited for (at most its connect timeout).
    const bool can_open = open < config.max_size && can_lease_locked(priority);
    const auto wait_limit = config.acquire_timeout.count() > 0 ? config.acquire_timeout
                            : can_open                         ? config.connect.connect_timeout
                                                               : std::chrono::milliseconds(0);
    if (wait_limit.count() == 0) {
      ++timeouts;
      throw_pool_error(
          client_errc::pool_timeout,
          "no connection free in the pool " + application_name + " (" + describe_load_locked() +
              ") and acquire_timeout is 0" +
              (last_connect_error.empty() ? std::string()
                                          : "; last connect error: " + last_connect_error));
    }
    if ((co_await asio::this_coro::cancellation_state).cancelled() !=
        asio::cancellation_type::none) {
      ++cancellations;
      throw_pool_error(client_errc::cancelled, "waiting for a pooled connection was cancelled");
    }
    const auto caller_executor = co_await asio::this_coro::executor;  // never suspends
    const auto started = Clock::now();
    Waiter waiter(caller_executor, priority, site);
    waiters[me].push_back(&waiter);
    // If this coroutine is destroyed while it waits (its io_context shut down), the waiter must
    // leave the queue, and a connection already handed to it must go back.
    struct Abandon {
      Abandon(PoolState& pool_in, Waiter& waiter_in, std::unique_lock<std::mutex>& lock_in)
          : pool(pool_in), waiter(waiter_in), lock(lock_in) {}
      PoolState& pool;
      Waiter& waiter;
      std::unique_lock<std::mutex>& lock;  // may still hold the mutex if the prefix threw
      bool armed = true;
      Abandon(const Abandon&) = delete;
      Abandon& operator=(const Abandon&) = delete;
      Abandon(Abandon&&) = delete;
      Abandon& operator=(Abandon&&) = delete;
      ~Abandon() {
        if (!armed) return;
        std::unique_ptr<PooledConnection> handed;
        {
          std::unique_lock guard(pool.mutex, std::defer_lock);
          if (!lock.owns_lock()) guard.lock();
          auto& queue = pool.waiters[index(waiter.priority)];
          queue.erase(std::remove(queue.begin(), queue.end(), &waiter), queue.end());
          handed = std::move(waiter.handed);
        }
        if (handed) pool.release(std::move(handed));
      }
    } abandon(*this, waiter, lock);
    maybe_open_locked(deferred);
    waiter.timer.expires_after(wait_limit);
    // The wait starts under the lock, so a handoff cannot slip in before it.
    auto [error] = co_await asio::async_initiate<decltype(no_throw), void(error_code)>(
        [&](auto handler) {
          // Once the wait is started another thread may complete it and resume (and end) this
          // coroutine: nothing in its frame may be touched after async_wait.
          std::mutex* held = lock.release();
          waiter.timer.async_wait(std::move(handler));
          held->unlock();
        },
        no_throw);
    lock = std::unique_lock(mutex);
    abandon.armed = false;
    if (waiter.handed) {
      waits.record(std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - started));
      lock.unlock();
      Lease lease(std::move(self), std::move(waiter.handed));
      emit(events.acquired, site);
      co_return lease;
    }
    const std::string load = describe_load_locked();  // counting this caller among the waiting
    auto& queue = waiters[me];
    queue.erase(std::remove(queue.begin(), queue.end(), &waiter), queue.end());
    if (waiter.pool_closed) {
      throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " was closed");
    }
    if (!error) {
      ++timeouts;
      std::string message = "timed out after " + std::to_string(wait_limit.count()) +
                            " ms waiting for a connection from the pool " + application_name +
                            " (" + load + ")";
      if (!last_connect_error.empty()) message += "; last connect error: " + last_connect_error;
      lock.unlock();
      emit(events.acquire_timeout, message);
      throw_pool_error(client_errc::pool_timeout, message,
                       "hold leases for shorter, raise max_size, or check the server");
    }
    ++cancellations;
    throw_pool_error(client_errc::cancelled, "waiting for a pooled connection was cancelled");
  }

  void release(std::unique_ptr<PooledConnection> pooled) noexcept {
    try {
      Deferred deferred;
      std::lock_guard lock(mutex);
      unlease_locked(*pooled);
      if (events.released.ever_connected()) deferred.add([this] { emit(events.released); });
      return_locked(std::move(pooled), deferred);
      serve_idle_locked(deferred);
    } catch (const std::exception& error) {
      spdlog::error("pgrt pool: returning a connection failed: {}", error.what());
    }
  }

  PoolStats stats() const {
    std::lock_guard lock(mutex);
    PoolStats snapshot;
    snapshot.max = config.max_size;
    snapshot.size = open;
    snapshot.idle = idle.size();
    snapshot.in_use = in_use;
    snapshot.connecting = connecting;
    snapshot.closing = closing;
    snapshot.waiting_normal = waiters[0].size();
    snapshot.waiting_high = waiters[1].size();
    snapshot.acquired = acquired;
    snapshot.timeouts = timeouts;
    snapshot.cancellations = cancellations;
    snapshot.connect_attempts = connect_attempts;
    snapshot.connect_errors = connect_errors;
    snapshot.discarded = discarded;
    snapshot.leaks_suspected = leaks_suspected;
    snapshot.wait_p50 = waits.percentile(0.5);
    snapshot.wait_p99 = waits.percentile(0.99);
    snapshot.wait_max = waits.max();
    snapshot.last_connect_error = last_connect_error;
    snapshot.consecutive_connect_failures = consecutive_failures;
    snapshot.connect_backoff = current_backoff;
    return snapshot;
  }

  // Wakes every waiter with pool_closed.
  void fail_waiters_locked() {
    for (auto& queue : waiters) {
      for (Waiter* waiter : queue) {
        waiter->pool_closed = true;
        waiter->timer.cancel();
      }
      queue.clear();
    }
  }

  // The synchronous, best-effort close for a process that exits without a graceful stop: runs no
  // coroutine and posts nothing. Idle connections are closed here (Terminate, then the socket);
  // leased and background ones are interrupted; their capacity is left counted.
  void close_now() noexcept {
    try {
      std::optional<asio::any_io_executor> pool_executor;
      {
        std::lock_guard lock(mutex);
        pool_closing = true;
        pool_executor = executor;
        const std::size_t closed = idle.size();
        for (auto& pooled : idle) {
          pooled->advance(NodeEvent::discard);
          pooled->connection.close(CloseMode::graceful);
          ++discarded;
        }
        open -= idle.size();
        idle.clear();
        for (PooledConnection* record : leased) record->connection.interrupt(exit_cancel_wait);
        for (Connection* connection : in_background) connection->interrupt(exit_cancel_wait);
        spdlog::warn(
            "pgrt pool {}: closed at exit: {} idle connection(s) closed, {} in use or "
            "being reset interrupted",
            application_name, closed, leased.size() + in_background.size());
      }
      if (!pool_executor) return;  // no timer and no waiter was ever made
      // The timers (the pool's and the waiters') belong to the io threads, which may still be
      // running (std::exit called from one of them): cancel them there. dispatch() runs this at
      // once when the calling thread runs the io_context; when no thread does, it never runs,
      // and nothing waits on those timers any more.
      asio::dispatch(*pool_executor, [self = shared_from_this()] {
        std::lock_guard lock(self->mutex);
        self->fail_waiters_locked();
        self->maintenance_timer->cancel();
        self->retry_timer->cancel();
      });
    } catch (const std::exception& error) {
      spdlog::error("pgrt pool {}: closing at exit failed: {}", application_name, error.what());
    }
  }

  // Refuses new acquires, fails the waiters and closes the idle connections.
  void begin_close() {
    Deferred deferred;
    std::lock_guard lock(mutex);
    if (pool_closing) return;
    pool_closing = true;
    fail_waiters_locked();
    auto idle_now = std::move(idle);
    idle.clear();
    for (auto& pooled : idle_now)
      discard_locked(std::move(pooled), DiscardReason::closing, deferred);
    if (executor) {
      maintenance_timer->cancel();
      retry_timer->cancel();
    }
  }
};

}  // namespace detail

// --- Lease
// ----------------------------------------------------------------------------------------

Lease::Lease() noexcept = default;
Lease::Lease(std::shared_ptr<detail::PoolState> pool,
             std::unique_ptr<detail::PooledConnection> connection) noexcept
    : pool_(std::move(pool)), connection_(std::move(connection)) {}
Lease::Lease(Lease&& other) noexcept = default;
Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    pool_ = std::move(other.pool_);
    connection_ = std::move(other.connection_);
  }
  return *this;
}
Lease::~Lease() {
  release();
}

Connection& Lease::operator*() const noexcept {
  return connection_->connection;
}
Connection* Lease::operator->() const noexcept {
  return &connection_->connection;
}

void Lease::release() noexcept {
  if (connection_) pool_->release(std::move(connection_));
  pool_.reset();
}

// --- Pool
// -----------------------------------------------------------------------------------------

Pool::Pool(boost::asio::any_io_executor executor, PoolConfig config) : Pool(std::move(config)) {
  std::lock_guard lock(state_->mutex);
  state_->bind_executor_locked(executor);
}

Pool::Pool(PoolConfig config) {
  config.validate();
  state_ = std::make_shared<detail::PoolState>(std::move(config));
}

Pool::~Pool() {
  try {
    state_->begin_close();
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool {}: closing failed: {}", state_->application_name, error.what());
  }
}

void Pool::close_now() noexcept {
  state_->close_now();
}

asio::awaitable<Lease> Pool::acquire(Priority priority, std::source_location site) {
  // Not a coroutine itself: the state's acquire is the one frame, and it keeps the state alive.
  return state_->acquire(state_, priority, site);
}

PoolStats Pool::stats() const {
  return state_->stats();
}
PoolEvents& Pool::events() noexcept {
  return state_->events;
}
const PoolConfig& Pool::config() const noexcept {
  return state_->config;
}
const std::string& Pool::application_name() const noexcept {
  return state_->application_name;
}

asio::awaitable<std::vector<std::string>> Pool::close(std::chrono::milliseconds grace) {
  state_->begin_close();
  const auto deadline = Clock::now() + grace;
  asio::steady_timer timer(co_await asio::this_coro::executor);
  for (;;) {
    {
      std::lock_guard lock(state_->mutex);
      if ((state_->in_use == 0 && state_->connecting == 0 && state_->background == 0 &&
           state_->closing == 0) ||
          Clock::now() >= deadline) {
        break;
      }
    }
    timer.expires_after(std::chrono::milliseconds(10));
    co_await timer.async_wait(no_throw);
  }
  std::vector<std::string> outstanding;
  std::lock_guard lock(state_->mutex);
  const auto now = Clock::now();
  // What is still out after the grace period is cut: a running statement is cancelled and the
  // socket shut down, so the server ends those backends now and their holders get
  // connection_lost. The descriptors are freed when the leases come back.
  for (detail::PooledConnection* record : state_->leased) {
    record->connection.interrupt();
    outstanding.push_back(describe_site(record->lease_site) + ", held for " +
                          std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                             now - record->leased_at)
                                             .count()) +
                          " ms");
  }
  for (Connection* connection : state_->in_background) connection->interrupt();
  if (!outstanding.empty()) {
    std::string sites;
    for (const auto& site : outstanding) sites += (sites.empty() ? "" : "; ") + site;
    spdlog::warn(
        "pgrt pool {}: {} lease(s) still out after the {} ms grace period were interrupted "
        "(their statements cancelled, their connections cut): {}",
        state_->application_name, outstanding.size(), grace.count(), sites);
  }
  co_return outstanding;
}

// --- the process-wide pool
// ------------------------------------------------------------------------

namespace {
std::mutex global_mutex;
std::shared_ptr<Pool> global_pool;  // NOLINT(cppcoreguidelines-avoid-non-const-global-variables)
}  // namespace

void configure(PoolConfig config) {
  std::lock_guard lock(global_mutex);
  if (global_pool) {
    throw_pool_error(client_errc::already_configured,
                     "pgrt::configure() was called twice; the process-wide pool is configured "
                     "once",
                     "configure it once at start-up; use pgrt::Pool objects for more pools");
  }
  global_pool = std::make_shared<Pool>(std::move(config));
}

void configure(PoolConfig config, asio::any_io_executor executor) {
  std::lock_guard lock(global_mutex);
  if (global_pool) {
    throw_pool_error(client_errc::already_configured,
                     "pgrt::configure() was called twice; the process-wide pool is configured "
                     "once",
                     "configure it once at start-up; use pgrt::Pool objects for more pools");
  }
  global_pool = std::make_shared<Pool>(std::move(executor), std::move(config));
}

void close_pool_now() noexcept {
  std::shared_ptr<Pool> closing;
  {
    std::lock_guard lock(global_mutex);
    closing = std::move(global_pool);
    global_pool.reset();
  }
  if (closing) closing->close_now();
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

namespace {
asio::awaitable<Lease> fail_not_configured() {
  throw_not_configured();
  co_return Lease{};
}
}  // namespace

asio::awaitable<Lease> connection(Priority priority, std::source_location site) {
  // One look at the global, kept for the whole acquire: a configure() or shutdown_pool() on
  // another thread meanwhile cannot leave this with a null or dangling pool.
  std::shared_ptr<Pool> current;
  {
    std::lock_guard lock(global_mutex);
    current = global_pool;
  }
  // Not a coroutine itself (one frame, the acquire's, which holds the pool's state, so it runs
  // to its end even if the process-wide pool is shut down meanwhile); errors still come out of
  // the co_await, never out of the call.
  if (!current) return fail_not_configured();
  return current->acquire(priority, site);
}

asio::awaitable<std::vector<std::string>> shutdown_pool(std::chrono::milliseconds grace) {
  std::shared_ptr<Pool> closing;
  {
    std::lock_guard lock(global_mutex);
    closing = std::move(global_pool);
    global_pool.reset();
  }
  if (!closing) co_return std::vector<std::string>{};
  co_return co_await closing->close(grace);
}

}  // namespace pgrt
