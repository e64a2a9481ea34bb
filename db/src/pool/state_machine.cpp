#include "state_machine.hpp"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

namespace pgrt::detail::pool {

namespace {
std::atomic<std::uint64_t> illegal_transitions{0};
}  // namespace

std::uint64_t illegal_node_transitions() noexcept {
  return illegal_transitions.load(std::memory_order_relaxed);
}

std::size_t connections_to_open(const SizingInput& input) noexcept {
  if (input.backing_off) return 0;
  const std::size_t ready = input.idle + input.connecting;
  std::size_t wanted = input.servable_waiters;
  const std::size_t alive = input.live - input.closing;
  if (alive < input.min_idle) wanted = std::max(wanted, ready + (input.min_idle - alive));
  if (wanted <= ready) return 0;
  const std::size_t room = input.max_size > input.live ? input.max_size - input.live : 0;
  std::size_t count = std::min(wanted - ready, room);
  if (input.failing) count = input.connecting > 0 ? 0 : std::min<std::size_t>(count, 1);
  return count;
}

namespace {
std::vector<ConsumerLimits> with_default_consumer(const CoreConfig& config) {
  std::vector<ConsumerLimits> limits{{.min = 0, .max = config.max_size}};
  limits.insert(limits.end(), config.consumers.begin(), config.consumers.end());
  return limits;
}
}  // namespace

std::vector<std::size_t> fair_shares(const std::vector<ConsumerLimits>& limits,
                                     const std::vector<bool>& active, std::size_t capacity) {
  std::vector<std::size_t> shares(limits.size(), 0);
  std::size_t left = capacity;
  for (std::size_t i = 0; i < limits.size(); ++i) {
    if (!active[i]) continue;
    shares[i] = std::min({limits[i].min, limits[i].max, left});
    left -= shares[i];
  }
  while (left > 0) {
    std::size_t best = limits.size();
    for (std::size_t i = 0; i < limits.size(); ++i) {
      if (!active[i] || shares[i] >= limits[i].max) continue;
      const auto beyond = [&](std::size_t at) {
        return static_cast<std::ptrdiff_t>(shares[at]) -
               static_cast<std::ptrdiff_t>(limits[at].min);
      };
      if (best == limits.size() || beyond(i) < beyond(best)) best = i;
    }
    if (best == limits.size()) break;
    ++shares[best];
    --left;
  }
  return shares;
}

Core::Core(CoreConfig config, std::uint64_t seed)
    : config_(std::move(config)),
      limits_(with_default_consumer(config_)),
      cap_(config_.max_size),
      in_use_(limits_.size(), 0),
      capacity_(config_.max_size),
      waiters_(limits_.size()),
      random_(seed) {}

Core::~Core() {
  for (auto& nodes : by_state_) {
    nodes.for_each([&](Node& node) {
      nodes.remove(node);
      delete &node;  // NOLINT(cppcoreguidelines-owning-memory): the lists own the nodes
    });
  }
}

// --- node states -------------------------------------------------------------------------------

namespace {
// allowed_transition() as a table, for the hot path.
constexpr auto transition_table = [] {
  std::array<std::array<bool, node_state_count>, node_state_count> table{};
  for (NodeState from : all_node_states) {
    for (NodeState to : all_node_states) {
      table[static_cast<std::size_t>(from)][static_cast<std::size_t>(to)] =
          allowed_transition(from, to);
    }
  }
  return table;
}();

[[noreturn]] void refuse_transition(NodeState from, NodeState to) {
  illegal_transitions.fetch_add(1, std::memory_order_relaxed);
  throw std::logic_error("pgrt pool core: a connection cannot go from " +
                         std::string(to_string(from)) + " to " + std::string(to_string(to)));
}
}  // namespace

void Core::move(Node& node, NodeState to) {
  if (!transition_table[static_cast<std::size_t>(node.state)][static_cast<std::size_t>(to)]) {
    refuse_transition(node.state, to);
  }
  if (node.state == NodeState::leased) {
    if (node.priority == Priority::normal) --leased_normal_;
    --in_use_[node.consumer];
  }
  list(node.state).remove(node);
  node.state = to;
  list(to).push_back(node);
  if (to == NodeState::resetting) ++node.resets;
  if (to == NodeState::leased) {
    if (node.priority == Priority::normal) ++leased_normal_;
    ++in_use_[node.consumer];
  }
}

void Core::destroy(Node& node) {
  if (node.state == NodeState::leased) {
    if (node.priority == Priority::normal) --leased_normal_;
    --in_use_[node.consumer];
  }
  list(node.state).remove(node);
  delete &node;  // NOLINT(cppcoreguidelines-owning-memory): the lists own the nodes
}

void Core::stop_watching(Node& node, Actions& actions) {
  if (!node.watched) return;
  node.watched = false;
  actions.push_back({.kind = Action::Kind::unwatch, .node = &node});
}

void Core::lease(Node& node, Priority priority, ConsumerIndex consumer, std::source_location site,
                 Time now, Actions& actions) {
  stop_watching(node, actions);
  node.priority = priority;
  node.consumer = consumer;
  move(node, NodeState::leased);
  node.leased_at = now;
  node.lease_site = site;
  node.leak_reported = false;
  node.session_used = true;
  ++acquired_;
}

Waiter* Core::next_waiter(Priority priority) const noexcept {
  Waiter* best = nullptr;
  std::ptrdiff_t best_excess = 0;  // leases held beyond the consumer's min (negative: below it)
  for (ConsumerIndex consumer = 0; consumer < limits_.size(); ++consumer) {
    const auto& queue = waiters_.of(priority, consumer);
    if (queue.empty() || in_use_[consumer] >= limits_[consumer].max) continue;
    const auto excess = static_cast<std::ptrdiff_t>(in_use_[consumer]) -
                        static_cast<std::ptrdiff_t>(limits_[consumer].min);
    Waiter* first = queue.front();
    if (best == nullptr || excess < best_excess ||
        (excess == best_excess && first->ticket < best->ticket)) {
      best = first;
      best_excess = excess;
    }
  }
  return best;
}

Waiter* Core::next_waiter() const noexcept {
  if (waiters_.size() == 0) return nullptr;
  for (Priority priority : {Priority::high, Priority::normal}) {
    if (waiters_.size(priority) == 0 || !can_lease(priority)) continue;
    if (Waiter* waiter = next_waiter(priority)) return waiter;
  }
  return nullptr;
}

void Core::hand(Node& node, Waiter& waiter, Time now, Actions& actions) {
  waiters_.remove(waiter);
  waiter.queued = false;
  // A node that sat idle (one kept from the waiters by reserved_for_priority or a consumer's max,
  // handed on when a lease came back) is pinged first, as try_acquire() does: a return, a reset
  // or a connect set idle_since to now.
  waiter.validate = needs_validation(node, now);
  if (node.state != NodeState::idle) move(node, NodeState::idle);
  lease(node, waiter.priority, waiter.consumer, waiter.site, now, actions);
  if (config_.leak_threshold.count() > 0) want_tick(now + config_.leak_threshold, actions);
  waiter.outcome = Waiter::Outcome::handed;
  waiter.handed = &node;
  actions.push_back({.kind = Action::Kind::wake, .node = &node, .waiter = &waiter});
}

// A node nobody uses: to the waiter next_waiter() names, else to the idle list. `used`: it comes
// back from a lease, a reset or a connect (idle time starts again), not from a keepalive ping.
void Core::offer(Node& node, Time now, bool used, Actions& actions) {
  // Idle first, so that a returning lease no longer counts against its consumer (or the reserve)
  // when the next waiter is chosen.
  const bool was_idle = node.state == NodeState::idle;
  if (!was_idle) {
    if (used) node.idle_since = now;
    move(node, NodeState::idle);
  }
  if (Waiter* waiter = next_waiter()) {
    hand(node, *waiter, now, actions);
    return;
  }
  if (!was_idle) want_tick(std::max(deadline_of(node), now), actions);  // a keepalive may be due
}

// Idle nodes to waiters that may now take them (a lease came back, so a waiter kept out by
// reserved_for_priority or by its consumer's max may go).
void Core::serve_idle(Time now, Actions& actions) {
  if (refusing_) return;  // (close_now() has closed the idle connections already)
  auto& idle = list(NodeState::idle);
  while (!idle.empty()) {
    Waiter* waiter = next_waiter();
    if (waiter == nullptr) break;
    hand(*idle.back(), *waiter, now, actions);
  }
}

void Core::close_node(Node& node, DiscardReason reason, Actions& actions) {
  stop_watching(node, actions);
  node.close_reason = reason;
  move(node, NodeState::closing);
  ++discarded_;
  ++discarded_by_reason_[static_cast<std::size_t>(reason)];
  actions.push_back({.kind = Action::Kind::close, .node = &node, .reason = reason});
}

std::size_t Core::servable_waiters() const noexcept {
  const std::size_t normal_limit = config_.max_size - config_.reserved_for_priority;
  const std::size_t normal_room = normal_limit > leased_normal_ ? normal_limit - leased_normal_ : 0;
  std::size_t high = 0;
  std::size_t normal = 0;
  for (ConsumerIndex consumer = 0; consumer < limits_.size(); ++consumer) {
    // A consumer at its max is served by nothing a connect brings.
    const std::size_t room =
        limits_[consumer].max > in_use_[consumer] ? limits_[consumer].max - in_use_[consumer] : 0;
    const std::size_t its_high = std::min(waiters_.of(Priority::high, consumer).size(), room);
    high += its_high;
    normal += std::min(waiters_.of(Priority::normal, consumer).size(), room - its_high);
  }
  return high + std::min(normal, normal_room);
}

void Core::maybe_open(Time now, Actions& actions) {
  if (closed_ || refusing_) return;
  // The common case, cheaply: nobody waits and min_idle is met, so nothing is wanted.
  if (waiters_.size() == 0 &&
      capacity_.taken() - list(NodeState::closing).size() >= config_.min_idle) {
    return;
  }
  // Every connection the max allows is open, opening or closing (callers wait for a lease to come
  // back, the contended case): nothing could be opened, whatever is wanted.
  if (capacity_.available() == 0) return;
  const SizingInput input{
      .max_size = cap_,
      .live = capacity_.taken(),
      .closing = list(NodeState::closing).size(),
      .connecting = list(NodeState::connecting).size(),
      .idle = list(NodeState::idle).size(),
      .servable_waiters = servable_waiters(),
      .min_idle = config_.min_idle,
      .backing_off =
          consecutive_failures_ > 0 && now<retry_at_, .failing = consecutive_failures_> 0,
  };
  for (std::size_t count = connections_to_open(input); count > 0; --count) {
    auto token = capacity_.try_take();
    if (!token) break;
    auto* node = new Node(next_node_id_++, std::move(*token));  // NOLINT: owned by the lists
    list(NodeState::connecting).push_back(*node);
    ++connect_attempts_;
    actions.push_back({.kind = Action::Kind::open, .node = node});
  }
}

void Core::want_tick(Time at, Actions& actions) {
  if (at >= timer_at_) return;
  timer_at_ = at;
  actions.push_back({.kind = Action::Kind::arm_timer, .at = at});
}

Time Core::deadline_of(const Node& node) const noexcept {
  Time deadline = node.expires;
  if (config_.idle_timeout.count() > 0) {
    deadline = std::min(deadline, node.idle_since + config_.idle_timeout);
  }
  if (config_.keepalive_interval.count() > 0) {
    deadline = std::min(deadline, node.last_ping + config_.keepalive_interval);
  }
  if (config_.watch_idle_after.count() > 0 && !node.watched) {
    deadline = std::min(deadline, node.idle_since + config_.watch_idle_after);
  }
  return deadline;
}

Time Core::lifetime_deadline(Time now) {
  if (config_.max_lifetime.count() == 0) return Time::max();
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double shortened = 1.0 - config_.lifetime_jitter * unit(random_);
  return now + std::chrono::duration_cast<Clock::duration>(config_.max_lifetime * shortened);
}

milliseconds Core::next_backoff() {
  const auto exponent = std::min<std::uint32_t>(consecutive_failures_ - 1, 20);
  auto delay = config_.backoff_initial * (std::int64_t{1} << exponent);
  delay = std::min(delay, config_.backoff_max);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  return std::chrono::duration_cast<milliseconds>(delay *
                                                  (1.0 - config_.backoff_jitter * unit(random_)));
}

// --- events ------------------------------------------------------------------------------------

AcquireResult Core::try_acquire(Priority priority, std::source_location site, Time now,
                                Actions& actions, ConsumerIndex consumer) {
  if (closed_ || refusing_) return {.kind = AcquireResult::Kind::closed};
  auto& idle = list(NodeState::idle);
  // Nobody who could take an idle connection waits at this priority or above. (A waiter that
  // could is served as soon as a connection is idle, so this holds whenever one is; the check
  // keeps it true by construction.)
  const bool nobody_ahead = [&] {
    if (idle.empty() || waiters_.size() == 0) return true;
    const Waiter* first = next_waiter();
    return first == nullptr || (priority == Priority::high && first->priority == Priority::normal);
  }();
  while (nobody_ahead && !idle.empty() && can_lease(priority, consumer)) {
    Node& node = *idle.back();  // the most recently returned: its socket and caches are warm
    if (expired(node, now)) {
      close_node(node, expiry_reason(node), actions);
      maybe_open(now, actions);  // (min_idle: its replacement)
      continue;
    }
    const bool validate = needs_validation(node, now);
    lease(node, priority, consumer, site, now, actions);
    if (config_.leak_threshold.count() > 0) want_tick(now + config_.leak_threshold, actions);
    return {.kind = AcquireResult::Kind::leased, .node = &node, .validate = validate};
  }
  if (waiters_.size() >= config_.max_waiters) return {.kind = AcquireResult::Kind::queue_full};
  if (config_.acquire_timeout.count() > 0) {
    return {.kind = AcquireResult::Kind::wait, .wait_limit = config_.acquire_timeout};
  }
  // acquire_timeout 0: never wait for a lease to come back; wait (at most connect_timeout) for a
  // connection being opened, or that can be opened under the max (and the consumer's) once the
  // closing ones have ended: fail at once only when every connection is in use (leased, or coming
  // back through a reset) or spoken for by the callers already waiting.
  if (list(NodeState::leased).size() + list(NodeState::resetting).size() + waiters_.size() < cap_ &&
      can_lease(priority, consumer)) {
    return {.kind = AcquireResult::Kind::wait, .wait_limit = config_.connect_timeout};
  }
  ++timeouts_;
  return {.kind = AcquireResult::Kind::no_wait};
}

void Core::enqueue(Waiter& waiter, Time now, Actions& actions) {
  waiter.ticket = next_ticket_++;
  waiters_.push_back(waiter);
  waiter.queued = true;
  waiter.enqueued_at = now;
  serve_idle(now, actions);
  maybe_open(now, actions);
  if (config_.fail_fast_after.count() > 0 && consecutive_failures_ > 0) fail_fast(now, actions);
  if (waiter.queued && waiter.deadline != Time::max()) want_tick(waiter.deadline, actions);
}

void Core::fail_queued(Waiter& waiter, FailReason why, Actions& actions) {
  waiters_.remove(waiter);
  waiter.queued = false;
  waiter.outcome = Waiter::Outcome::failed;
  waiter.failed = why;
  if (why == FailReason::timeout || why == FailReason::server_down || why == FailReason::refused) {
    ++timeouts_;
  }
  actions.push_back({.kind = Action::Kind::wake, .waiter = &waiter});
}

void Core::fail_waiting(Actions& actions) {
  // A connection alive may come back to them: a pool that cannot grow still serves its waiters.
  if (live_connections() > 0) return;
  for (Priority priority : {Priority::high, Priority::normal}) {
    waiters_.for_each(priority,
                      [&](Waiter& waiter) { fail_queued(waiter, FailReason::refused, actions); });
  }
}

void Core::time_out_waiters(Time now, Time& next, Actions& actions) {
  for (Priority priority : {Priority::high, Priority::normal}) {
    next = std::min(next, waiters_.expire(priority, now, [&](Waiter& waiter) {
      fail_queued(waiter, FailReason::timeout, actions);
    }));
  }
}

void Core::fail_fast(Time now, Actions& actions) {
  if (config_.fail_fast_after.count() == 0 || consecutive_failures_ == 0 || closed_) return;
  if (live_connections() > 0) return;
  // While the pool backs off between failed connects, no connect is in flight: the last failure
  // is the latest word on the server, for a caller that came since too.
  const bool backing_off = list(NodeState::connecting).empty();
  Time next = Time::max();
  for (Priority priority : {Priority::high, Priority::normal}) {
    waiters_.for_each(priority, [&](Waiter& waiter) {
      // Otherwise only a connect that failed after the caller came proves the server is down for
      // it (an old failure, its waiter long gone, proves nothing about a connect now in flight).
      if (!backing_off && waiter.enqueued_at > last_failure_at_) return;
      const Time due = waiter.enqueued_at + config_.fail_fast_after;
      if (due > now) {
        next = std::min(next, due);
        return;
      }
      fail_queued(waiter, FailReason::server_down, actions);
    });
  }
  if (next != Time::max()) want_tick(next, actions);
}

bool Core::withdraw(Waiter& waiter, FailReason why, Actions& actions) {
  (void)actions;
  if (waiter.outcome != Waiter::Outcome::none) return false;
  if (waiter.queued) waiters_.remove(waiter);
  waiter.queued = false;
  waiter.outcome = Waiter::Outcome::failed;
  waiter.failed = why;
  if (why == FailReason::timeout) ++timeouts_;
  if (why == FailReason::cancelled) ++cancellations_;
  return true;
}

void Core::lease_returned(Node& node, ReturnKind kind, Time now, Actions& actions) {
  if (node.state != NodeState::leased) {
    throw std::logic_error("pgrt pool core: a connection came back that was not leased (" +
                           std::string(to_string(node.state)) + ")");
  }
  // The common case first: a clean return, nobody waiting, nothing due. The node just becomes
  // idle (what offer() would do, with nothing for serve_idle() or maybe_open() to act on).
  // (With no connect failing, every event that could leave min_idle short already called
  // maybe_open(), so a clean return has nothing for it.)
  if (kind == ReturnKind::clean && !closed_ && !refusing_ && waiters_.size() == 0 &&
      consecutive_failures_ == 0 && !(config_.reset_discard_all && node.session_used) &&
      !expired(node, now) && !slot_check_due(now)) {
    node.idle_since = now;
    move(node, NodeState::idle);
    const Time deadline = deadline_of(node);
    if (deadline < timer_at_) want_tick(std::max(deadline, now), actions);
    return;
  }
  // Refusing (close_now() from a thread that does not run the io_context, before the core's
  // close runs there): the pool is closing, and nothing is handed out or made any more.
  if (closed_ || refusing_) {
    close_node(node, DiscardReason::closing, actions);
  } else if (kind == ReturnKind::broken) {
    close_node(node, DiscardReason::broken, actions);
  } else if (kind == ReturnKind::mid_query) {
    close_node(node, DiscardReason::mid_query, actions);
  } else if (kind == ReturnKind::discard) {
    close_node(node, DiscardReason::by_user, actions);
  } else if (kind == ReturnKind::wrong_role) {
    close_node(node, DiscardReason::server_role, actions);
  } else if (kind == ReturnKind::needs_reset || (config_.reset_discard_all && node.session_used) ||
             (slot_check_due(now) && !expired(node, now))) {
    // A slot check due while no connection is idle runs on the way back of one.
    const bool check_slots = slot_check_due(now);
    if (check_slots) {
      next_slot_check_ = now + config_.slot_check_interval;
      want_tick(next_slot_check_, actions);
    }
    move(node, NodeState::resetting);  // capacity stays held while it runs
    actions.push_back({.kind = Action::Kind::reset, .node = &node, .check_slots = check_slots});
  } else if (expired(node, now)) {
    close_node(node, expiry_reason(node), actions);
  } else {
    offer(node, now, true, actions);
  }
  serve_idle(now, actions);
  maybe_open(now, actions);
}

void Core::closed_in_lease(Node& node, Time now, Actions& actions) {
  if (node.state != NodeState::leased) {
    throw std::logic_error("pgrt pool core: a connection was closed in a lease while " +
                           std::string(to_string(node.state)));
  }
  node.lease_out = true;
  close_node(node, DiscardReason::by_user, actions);
  serve_idle(now, actions);
  maybe_open(now, actions);
}

void Core::lease_dropped_after_close(Node& node) {
  if (!node.lease_out) {
    throw std::logic_error("pgrt pool core: a lease was dropped after a close it did not make");
  }
  node.lease_out = false;
  if (node.state == NodeState::detached) destroy(node);
}

void Core::checkout_failed(Node& node, DiscardReason reason, Time now, Actions& actions) {
  close_node(node, reason, actions);
  serve_idle(now, actions);
  maybe_open(now, actions);
}

void Core::connect_succeeded(Node& node, Time now, Actions& actions) {
  if (next_slot_check_ == Time::max() && config_.slot_check_interval.count() > 0) {
    next_slot_check_ = now + config_.slot_check_interval;
    want_tick(next_slot_check_, actions);
  }
  consecutive_failures_ = 0;
  backoff_ = milliseconds(0);
  node.expires = lifetime_deadline(now);
  node.last_ping = now;
  if (closed_) {
    close_node(node, DiscardReason::closing, actions);
  } else if (node.evicted) {
    close_node(node, node.evict_reason, actions);
  } else {
    offer(node, now, true, actions);
  }
  maybe_open(now, actions);
}

void Core::connect_failed(Node& node, Time now, Actions& actions, bool backpressure,
                          bool backend_may_live) {
  if (backend_may_live) {
    node.close_reason = DiscardReason::broken;
    move(node, NodeState::closing);
    actions.push_back({.kind = Action::Kind::close,
                       .node = &node,
                       .reason = DiscardReason::broken,
                       .discarded = false});
  } else {
    destroy(node);
  }
  ++connect_errors_;
  ++consecutive_failures_;
  last_failure_at_ = now;
  backoff_ = next_backoff();
  if (backpressure) backoff_ = std::min(backoff_, max_backpressure_backoff);
  retry_at_ = now + backoff_;
  if (closed_) return;
  want_tick(retry_at_, actions);
  maybe_open(now, actions);
  fail_fast(now, actions);
}

void Core::connect_abandoned(Node& node, Time now, Actions& actions) {
  if (node.state != NodeState::connecting) {
    throw std::logic_error("pgrt pool core: a connect was abandoned for a connection that was " +
                           std::string(to_string(node.state)));
  }
  destroy(node);
  maybe_open(now, actions);
}

void Core::reset_done(Node& node, bool ok, Time now, Actions& actions, DiscardReason failure) {
  if (!ok) {
    close_node(node, failure, actions);
  } else {
    if (config_.reset_discard_all) node.session_used = false;
    if (closed_) {
      close_node(node, DiscardReason::closing, actions);
    } else if (expired(node, now)) {
      close_node(node, expiry_reason(node), actions);
    } else {
      offer(node, now, true, actions);
    }
  }
  maybe_open(now, actions);
}

void Core::ping_done(Node& node, bool ok, Time now, Actions& actions, DiscardReason failure) {
  if (!ok) {
    close_node(node, failure, actions);
  } else {
    node.last_ping = now;
    if (closed_) {
      close_node(node, DiscardReason::closing, actions);
    } else if (expired(node, now)) {  // evicted, or past its lifetime while it was pinged
      close_node(node, expiry_reason(node), actions);
    } else {
      offer(node, now, false, actions);  // a ping is not use: idle_timeout still counts
    }
  }
  maybe_open(now, actions);
}

void Core::evict_all(Time now, Actions& actions) {
  if (closed_) return;
  for (NodeState state :
       {NodeState::connecting, NodeState::leased, NodeState::resetting, NodeState::pinging}) {
    list(state).for_each([](Node& node) { retire(node, DiscardReason::evicted); });
  }
  list(NodeState::idle).for_each([&](Node& node) {
    retire(node, DiscardReason::evicted);
    close_node(node, node.evict_reason, actions);
  });
  maybe_open(now, actions);
}

void Core::limit_connections(std::size_t cap, Time now, Actions& actions, milliseconds valid_for,
                             const RetireFirst& retire_first) {
  const std::size_t before = cap_;
  cap_ = std::min(std::max<std::size_t>(cap, 1), config_.max_size);
  if (closed_) return;
  if (cap_ == config_.max_size) {
    cap_until_ = Time::max();
    if (before < cap_) {  // lifted: what was retired for the limit alone stays
      for (NodeState state : {NodeState::connecting, NodeState::idle, NodeState::leased,
                              NodeState::resetting, NodeState::pinging}) {
        list(state).for_each([](Node& node) {
          if (node.evicted && node.evict_reason == DiscardReason::budget_share) {
            node.evicted = false;
            node.evict_reason = DiscardReason::evicted;
          }
        });
      }
    }
    maybe_open(now, actions);
    return;
  }
  cap_until_ = now + valid_for;
  want_tick(cap_until_, actions);
  // The connections past their connect that stay (every one but those closing or already
  // retired): they hold a slot each. Beyond the cap, those `retire_first` picks go first, then
  // the idle ones (now), then those in use (when they come back).
  std::size_t holding = connections_holding_slots();
  for (const bool preferred_only : {true, false}) {
    if (preferred_only && !retire_first) continue;
    for (NodeState state :
         {NodeState::idle, NodeState::pinging, NodeState::resetting, NodeState::leased}) {
      std::vector<Node*> candidates;
      list(state).for_each([&](Node& node) {
        if (!preferred_only || retire_first(node)) candidates.push_back(&node);
      });
      for (Node* node : candidates) {
        if (holding <= cap_ || node->evicted) continue;
        retire(*node, DiscardReason::budget_share);
        --holding;
        if (state == NodeState::idle) close_node(*node, node->evict_reason, actions);
      }
    }
  }
  // Connects hold no slot yet, and take none while the pool is at its cap (at_connection_cap()).
  // The oldest may go on beyond the cap: it waits for a slot holding the budget's waiting marker,
  // so the other processes keep to their shares while this one still asks for more (retiring it
  // would lift their caps at their next check, and the shares would swing back and forth). The
  // others beyond the room left retire, newest first.
  std::vector<Node*> connects;
  list(NodeState::connecting).for_each([&](Node& node) {
    if (!node.evicted) connects.push_back(&node);
  });
  const std::size_t room = std::max<std::size_t>(1, cap_ > holding ? cap_ - holding : 0);
  while (connects.size() > room) {
    retire(*connects.back(), DiscardReason::budget_share);
    connects.pop_back();
  }
  maybe_open(now, actions);
}

std::size_t Core::connections_holding_slots() const noexcept {
  std::size_t holding = 0;
  for (NodeState state :
       {NodeState::idle, NodeState::leased, NodeState::resetting, NodeState::pinging}) {
    nodes(state).for_each([&](const Node& node) { holding += node.evicted ? 0 : 1; });
  }
  return holding;
}

bool Core::at_connection_cap() const noexcept {
  return connections_holding_slots() >= cap_;
}

void Core::slot_lost(Node& node, Time now, Actions& actions) {
  if (node.state == NodeState::closing || node.state == NodeState::detached) return;
  retire(node, DiscardReason::slot_lost);
  if (node.state == NodeState::idle) close_node(node, node.evict_reason, actions);
  maybe_open(now, actions);
}

void Core::connection_lost(Node& node, Actions& actions) {
  if (node.state == NodeState::idle) close_node(node, DiscardReason::broken, actions);
}

void Core::backend_ended(Node& node, Time now, Actions& actions) {
  if (node.state != NodeState::closing) {
    throw std::logic_error("pgrt pool core: a backend ended for a connection that was " +
                           std::string(to_string(node.state)) + ", not closing");
  }
  if (node.lease_out) {
    node.capacity.release();
    move(node, NodeState::detached);
  } else {
    destroy(node);  // its capacity token goes with it
  }
  maybe_open(now, actions);
}

void Core::tick(Time now, Actions& actions) {
  timer_at_ = Time::max();
  if (closed_) return;
  std::size_t alive = capacity_.taken() - list(NodeState::closing).size();
  list(NodeState::idle).for_each([&](Node& node) {
    if (expired(node, now)) {
      close_node(node, expiry_reason(node), actions);
      --alive;
    } else if (config_.idle_timeout.count() > 0 && now - node.idle_since >= config_.idle_timeout &&
               alive > config_.min_idle) {
      close_node(node, DiscardReason::idle_timeout, actions);
      --alive;
    } else if (config_.keepalive_interval.count() > 0 &&
               now - node.last_ping >= config_.keepalive_interval) {
      stop_watching(node, actions);
      move(node, NodeState::pinging);
      actions.push_back({.kind = Action::Kind::ping, .node = &node});
    } else if (config_.watch_idle_after.count() > 0 && !node.watched &&
               now - node.idle_since >= config_.watch_idle_after) {
      node.watched = true;
      actions.push_back({.kind = Action::Kind::watch, .node = &node});
    }
  });
  if (cap_ < config_.max_size && now >= cap_until_) {
    limit_connections(config_.max_size, now, actions);  // not confirmed in time: it lapses
  }
  if (slot_check_due(now) && !list(NodeState::idle).empty()) {
    Node& node = *list(NodeState::idle).front();  // the longest idle: the least likely wanted
    stop_watching(node, actions);
    move(node, NodeState::pinging);
    actions.push_back({.kind = Action::Kind::ping, .node = &node, .check_slots = true});
    next_slot_check_ = now + config_.slot_check_interval;
  }
  Time next = Time::max();
  if (config_.slot_check_interval.count() > 0 && next_slot_check_ > now) {
    next = next_slot_check_;
  }
  if (cap_until_ != Time::max() && cap_until_ > now) next = std::min(next, cap_until_);
  if (config_.leak_threshold.count() > 0) {
    list(NodeState::leased).for_each([&](Node& node) {
      if (node.leak_reported) return;
      const auto age = std::chrono::duration_cast<milliseconds>(now - node.leased_at);
      if (age < config_.leak_threshold) {
        next = std::min(next, node.leased_at + config_.leak_threshold);
        return;
      }
      node.leak_reported = true;
      ++leaks_suspected_;
      actions.push_back({.kind = Action::Kind::report_leak, .node = &node, .age = age});
    });
  }
  time_out_waiters(now, next, actions);
  maybe_open(now, actions);
  // The next wake-up: the earliest deadline still ahead. An idle timeout that passed while the
  // node was needed for min_idle is looked at again one idle_timeout later.
  list(NodeState::idle).for_each([&](const Node& node) {
    const Time deadline = deadline_of(node);
    if (deadline > now) next = std::min(next, deadline);
  });
  if (!list(NodeState::idle).empty() && config_.idle_timeout.count() > 0) {
    next = std::min(next, now + config_.idle_timeout);
  }
  if (consecutive_failures_ > 0 && retry_at_ > now) next = std::min(next, retry_at_);
  fail_fast(now, actions);
  if (next != Time::max()) want_tick(next, actions);
}

void Core::close(Actions& actions) {
  if (closed_) return;
  closed_ = true;
  for (Priority priority : {Priority::high, Priority::normal}) {
    waiters_.for_each(
        priority, [&](Waiter& waiter) { fail_queued(waiter, FailReason::pool_closed, actions); });
  }
  list(NodeState::idle).for_each([&](Node& node) {
    close_node(node, DiscardReason::closing, actions);
  });
  list(NodeState::connecting).for_each([&](Node& node) {
    actions.push_back({.kind = Action::Kind::cancel_connect, .node = &node});
  });
}

// --- reading -----------------------------------------------------------------------------------

CoreStats Core::stats() const {
  CoreStats stats;
  stats.max = config_.max_size;
  stats.live = capacity_.taken();
  for (NodeState state : all_node_states) {
    stats.nodes[static_cast<std::size_t>(state)] = nodes(state).size();
  }
  stats.leased_normal = leased_normal_;
  stats.waiting_normal = waiters_.size(Priority::normal);
  stats.waiting_high = waiters_.size(Priority::high);
  stats.consumers.resize(limits_.size());
  for (ConsumerIndex consumer = 0; consumer < limits_.size(); ++consumer) {
    stats.consumers[consumer] = {.in_use = in_use_[consumer],
                                 .waiting = waiters_.of(Priority::normal, consumer).size() +
                                            waiters_.of(Priority::high, consumer).size()};
  }
  stats.acquired = acquired_;
  stats.timeouts = timeouts_;
  stats.cancellations = cancellations_;
  stats.connect_attempts = connect_attempts_;
  stats.connect_errors = connect_errors_;
  stats.discarded = discarded_;
  stats.discarded_by_reason = discarded_by_reason_;
  stats.leaks_suspected = leaks_suspected_;
  for (Priority priority : {Priority::high, Priority::normal}) {
    for (ConsumerIndex consumer = 0; consumer < limits_.size(); ++consumer) {
      const auto& queue = waiters_.of(priority, consumer);
      if (!queue.empty()) {
        stats.oldest_waiter_since = std::min(stats.oldest_waiter_since, queue.front()->enqueued_at);
      }
    }
  }
  nodes(NodeState::leased).for_each([&](const Node& node) {
    if (node.leak_reported) ++stats.leases_past_leak_threshold;
  });
  stats.consecutive_connect_failures = consecutive_failures_;
  stats.connect_backoff = consecutive_failures_ > 0 ? backoff_ : milliseconds(0);
  return stats;
}

}  // namespace pgrt::detail::pool
