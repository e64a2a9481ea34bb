// The pool's sans-I/O core (db/src/pool/state_machine.hpp) against a reference model: both are
// driven by the same random events, and after every event their actions and counts must agree and
// the pool's invariants must hold. A failure prints its seed and the shortest event sequence that
// still fails (shrunk by removing events).
//
// The model keeps everything in plain maps and vectors and recomputes every decision from scratch
// at each event; it is meant to be read and believed.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <gtest/gtest.h>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "pool/state_machine.hpp"

namespace pgrt::detail::pool {
namespace {

using std::chrono::milliseconds;

// --- what both sides are compared on -----------------------------------------------------------

// An action with its pointers turned into ids: (kind, node id, waiter id, reason).
using Out = std::tuple<int, std::uint64_t, std::uint64_t, int>;

Out out(Action::Kind kind, std::uint64_t node, std::uint64_t waiter = 0,
        DiscardReason reason = DiscardReason::closing) {
  const bool has_reason = kind == Action::Kind::close;
  return {static_cast<int>(kind), node, waiter, has_reason ? static_cast<int>(reason) : -1};
}

std::string describe(const std::vector<Out>& outs) {
  static const char* const names[] = {"wake",  "open",           "reset",     "ping",
                                      "close", "cancel_connect", "arm_timer", "report_leak"};
  std::ostringstream text;
  for (const auto& [kind, node, waiter, reason] : outs) {
    text << names[kind] << "(node " << node << ", waiter " << waiter;
    if (reason >= 0) text << ", reason " << to_string(static_cast<DiscardReason>(reason));
    text << ") ";
  }
  return text.str();
}

// --- the reference model -----------------------------------------------------------------------

struct Model {
  struct N {
    NodeState state = NodeState::connecting;
    Time expires = Time::max();
    Time idle_since{}, last_ping{}, leased_at{};
    Priority priority = Priority::normal;
    ConsumerIndex consumer = default_consumer;
    bool leak_reported = false, session_used = false;
    bool lease_out = false;  // closed by its user in a lease that is still out
    std::uint64_t idle_stamp = 0, leased_stamp = 0;  // when it entered idle / leased
  };
  struct W {
    std::uint64_t id;
    Priority priority;
    ConsumerIndex consumer;
  };

  CoreConfig config;
  std::map<std::uint64_t, N> nodes;
  std::uint64_t next_node = 1, stamp = 0;
  std::vector<W> queue;  // arrival order, both priorities
  bool closed = false;
  std::uint32_t failures = 0;
  Time retry_at{};
  milliseconds backoff{0};
  std::uint64_t acquired = 0, timeouts = 0, cancellations = 0, attempts = 0, errors = 0,
                discarded = 0, leaks = 0;
  std::vector<Out> outs;

  std::size_t count(NodeState state) const {
    return static_cast<std::size_t>(
        std::count_if(nodes.begin(), nodes.end(),
                      [&](const auto& entry) { return entry.second.state == state; }));
  }
  // Nodes holding capacity: all but the detached ones.
  std::size_t live() const { return nodes.size() - count(NodeState::detached); }
  std::size_t leased_normal() const {
    return static_cast<std::size_t>(std::count_if(nodes.begin(), nodes.end(), [](const auto& e) {
      return e.second.state == NodeState::leased && e.second.priority == Priority::normal;
    }));
  }
  std::size_t waiting(Priority priority) const {
    return static_cast<std::size_t>(std::count_if(
        queue.begin(), queue.end(), [&](const W& waiter) { return waiter.priority == priority; }));
  }
  bool can_lease(Priority priority) const {
    return priority == Priority::high ||
           leased_normal() < config.max_size - config.reserved_for_priority;
  }
  // Consumer 0 is the default one (min 0, max max_size); named consumer i is index i + 1.
  std::size_t consumers() const { return config.consumers.size() + 1; }
  std::size_t min_of(ConsumerIndex consumer) const {
    return consumer == 0 ? 0 : config.consumers[consumer - 1].min;
  }
  std::size_t max_of(ConsumerIndex consumer) const {
    return consumer == 0 ? config.max_size : config.consumers[consumer - 1].max;
  }
  std::size_t in_use(ConsumerIndex consumer) const {
    return static_cast<std::size_t>(std::count_if(nodes.begin(), nodes.end(), [&](const auto& e) {
      return e.second.state == NodeState::leased && e.second.consumer == consumer;
    }));
  }
  std::size_t waiting_of(ConsumerIndex consumer) const {
    return static_cast<std::size_t>(std::count_if(
        queue.begin(), queue.end(), [&](const W& waiter) { return waiter.consumer == consumer; }));
  }
  bool can_lease(Priority priority, ConsumerIndex consumer) const {
    return can_lease(priority) && in_use(consumer) < max_of(consumer);
  }
  // The waiter a free node goes to: the high priority first (normal only outside the reserve);
  // within it, the waiter whose consumer (below its max) holds the fewest leases beyond its min,
  // then the one that came first. queue.end() if none.
  std::vector<W>::iterator next_waiter() {
    for (Priority priority : {Priority::high, Priority::normal}) {
      if (!can_lease(priority)) continue;
      auto best = queue.end();
      long best_excess = 0;
      for (auto it = queue.begin(); it != queue.end(); ++it) {
        if (it->priority != priority || in_use(it->consumer) >= max_of(it->consumer)) continue;
        const long excess =
            static_cast<long>(in_use(it->consumer)) - static_cast<long>(min_of(it->consumer));
        if (best == queue.end() || excess < best_excess) {
          best = it;
          best_excess = excess;
        }
      }
      if (best != queue.end()) return best;
    }
    return queue.end();
  }
  // The idle node that became idle last, or 0.
  std::uint64_t newest_idle() const {
    std::uint64_t best = 0, best_stamp = 0;
    for (const auto& [id, node] : nodes) {
      if (node.state == NodeState::idle && node.idle_stamp >= best_stamp) {
        best = id;
        best_stamp = node.idle_stamp;
      }
    }
    return best;
  }
  std::vector<std::uint64_t> in_state_by(NodeState state, std::uint64_t N::*stamp_field) const {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> found;
    for (const auto& [id, node] : nodes) {
      if (node.state == state) found.emplace_back(node.*stamp_field, id);
    }
    std::sort(found.begin(), found.end());
    std::vector<std::uint64_t> ids;
    for (const auto& entry : found) ids.push_back(entry.second);
    return ids;
  }

  void lease(std::uint64_t id, Priority priority, ConsumerIndex consumer, Time now) {
    N& node = nodes.at(id);
    node.state = NodeState::leased;
    node.priority = priority;
    node.consumer = consumer;
    node.leased_at = now;
    node.leak_reported = false;
    node.session_used = true;
    node.leased_stamp = ++stamp;
    ++acquired;
  }
  void become_idle(std::uint64_t id, Time now, bool used) {
    N& node = nodes.at(id);
    if (used) node.idle_since = now;
    node.state = NodeState::idle;
    node.idle_stamp = ++stamp;
  }
  // A free node goes to next_waiter() (the node no longer counted as leased), else becomes idle.
  void offer(std::uint64_t id, Time now, bool used) {
    if (nodes.at(id).state != NodeState::idle) become_idle(id, now, used);
    auto it = next_waiter();
    if (it != queue.end()) {
      const W waiter = *it;
      queue.erase(it);
      lease(id, waiter.priority, waiter.consumer, now);
      outs.push_back(out(Action::Kind::wake, id, waiter.id));
    }
  }
  void serve_idle(Time now) {
    while (newest_idle() != 0 && next_waiter() != queue.end()) offer(newest_idle(), now, false);
  }
  void close(std::uint64_t id, DiscardReason reason) {
    nodes.at(id).state = NodeState::closing;
    ++discarded;
    outs.push_back(out(Action::Kind::close, id, 0, reason));
  }
  void maybe_open(Time now) {
    if (closed || (failures > 0 && now < retry_at)) return;
    const std::size_t normal_limit = config.max_size - config.reserved_for_priority;
    const std::size_t normal_room =
        normal_limit > leased_normal() ? normal_limit - leased_normal() : 0;
    // Waiters a new node could serve: none of a consumer beyond its max.
    std::size_t high = 0, normal = 0;
    for (ConsumerIndex consumer = 0; consumer < consumers(); ++consumer) {
      std::size_t room = max_of(consumer) - in_use(consumer);
      for (Priority priority : {Priority::high, Priority::normal}) {
        const std::size_t count = static_cast<std::size_t>(
            std::count_if(queue.begin(), queue.end(), [&](const W& waiter) {
              return waiter.consumer == consumer && waiter.priority == priority;
            }));
        const std::size_t served = std::min(count, room);
        room -= served;
        (priority == Priority::high ? high : normal) += served;
      }
    }
    const std::size_t servable = high + std::min(normal, normal_room);
    const std::size_t alive = live() - count(NodeState::closing);
    std::size_t target = servable;
    const std::size_t ready = count(NodeState::idle) + count(NodeState::connecting);
    if (alive < config.min_idle) target = std::max(target, ready + config.min_idle - alive);
    // One at a time, while more are wanted, there is room, and (after a failure) none is open yet.
    while (count(NodeState::idle) + count(NodeState::connecting) < target &&
           live() < config.max_size && !(failures > 0 && count(NodeState::connecting) > 0)) {
      nodes[next_node] = N{};
      outs.push_back(out(Action::Kind::open, next_node));
      ++next_node;
      ++attempts;
    }
  }
  bool expired(std::uint64_t id, Time now) const { return now >= nodes.at(id).expires; }

  // Returns {kind, node}; kind as AcquireResult::Kind.
  std::pair<AcquireResult::Kind, std::uint64_t> try_acquire(Priority priority,
                                                            ConsumerIndex consumer, Time now) {
    if (closed) return {AcquireResult::Kind::closed, 0};
    // Nobody who could take a node waits at this priority or above.
    auto first = next_waiter();
    const bool nobody_ahead =
        first == queue.end() || (priority == Priority::high && first->priority == Priority::normal);
    while (nobody_ahead && newest_idle() != 0 && can_lease(priority, consumer)) {
      const std::uint64_t id = newest_idle();
      if (expired(id, now)) {
        close(id, DiscardReason::lifetime);
        maybe_open(now);  // (min_idle: its replacement)
        continue;
      }
      lease(id, priority, consumer, now);
      return {AcquireResult::Kind::leased, id};
    }
    if (queue.size() >= config.max_waiters) return {AcquireResult::Kind::queue_full, 0};
    if (config.acquire_timeout.count() > 0) return {AcquireResult::Kind::wait, 0};
    // acquire_timeout 0: fails at once only when every connection is in use (leased, or coming
    // back through a reset) or spoken for by the callers already waiting; one being opened, or
    // capacity a closing one gives back, is waited for.
    if (count(NodeState::leased) + count(NodeState::resetting) + queue.size() < config.max_size &&
        can_lease(priority, consumer)) {
      return {AcquireResult::Kind::wait, 0};
    }
    ++timeouts;
    return {AcquireResult::Kind::no_wait, 0};
  }
  void enqueue(std::uint64_t waiter, Priority priority, ConsumerIndex consumer, Time now) {
    queue.push_back({waiter, priority, consumer});
    serve_idle(now);
    maybe_open(now);
  }
  bool withdraw(std::uint64_t waiter, FailReason why) {
    auto it = std::find_if(queue.begin(), queue.end(), [&](const W& w) { return w.id == waiter; });
    if (it == queue.end()) return false;
    queue.erase(it);
    if (why == FailReason::timeout) ++timeouts;
    if (why == FailReason::cancelled) ++cancellations;
    return true;
  }
  void returned(std::uint64_t id, ReturnKind kind, Time now) {
    if (closed) {
      close(id, DiscardReason::closing);
    } else if (kind == ReturnKind::broken) {
      close(id, DiscardReason::broken);
    } else if (kind == ReturnKind::mid_query) {
      close(id, DiscardReason::mid_query);
    } else if (kind == ReturnKind::discard) {
      close(id, DiscardReason::by_user);
    } else if (kind == ReturnKind::wrong_role) {
      close(id, DiscardReason::server_role);
    } else if (kind == ReturnKind::needs_reset ||
               (config.reset_discard_all && nodes.at(id).session_used)) {
      nodes.at(id).state = NodeState::resetting;
      outs.push_back(out(Action::Kind::reset, id));
    } else if (expired(id, now)) {
      close(id, DiscardReason::lifetime);
    } else {
      offer(id, now, true);
    }
    serve_idle(now);
    maybe_open(now);
  }
  void closed_in_lease(std::uint64_t id, Time now) {
    nodes.at(id).lease_out = true;
    close(id, DiscardReason::by_user);
    serve_idle(now);
    maybe_open(now);
  }
  void lease_dropped(std::uint64_t id) {
    nodes.at(id).lease_out = false;
    if (nodes.at(id).state == NodeState::detached) nodes.erase(id);
  }
  void checkout_failed(std::uint64_t id, Time now) {
    close(id, DiscardReason::failed_reset);
    serve_idle(now);
    maybe_open(now);
  }
  void connected(std::uint64_t id, Time now) {
    failures = 0;
    backoff = milliseconds(0);
    N& node = nodes.at(id);
    node.expires = config.max_lifetime.count() == 0 ? Time::max() : now + config.max_lifetime;
    node.last_ping = now;
    if (closed) {
      close(id, DiscardReason::closing);
    } else {
      offer(id, now, true);
    }
    maybe_open(now);
  }
  void connect_failed(std::uint64_t id, Time now) {
    nodes.erase(id);
    ++errors;
    ++failures;
    milliseconds delay = config.backoff_initial;
    for (std::uint32_t i = 1; i < failures && delay < config.backoff_max; ++i) delay *= 2;
    backoff = std::min(delay, config.backoff_max);
    retry_at = now + backoff;
    maybe_open(now);
  }
  void reset_done(std::uint64_t id, bool ok, Time now) {
    if (!ok) {
      close(id, DiscardReason::failed_reset);
    } else {
      if (config.reset_discard_all) nodes.at(id).session_used = false;
      if (closed) {
        close(id, DiscardReason::closing);
      } else if (expired(id, now)) {
        close(id, DiscardReason::lifetime);
      } else {
        offer(id, now, true);
      }
    }
    maybe_open(now);
  }
  void ping_done(std::uint64_t id, bool ok, Time now) {
    if (!ok) {
      close(id, DiscardReason::broken);
    } else {
      nodes.at(id).last_ping = now;
      if (closed) {
        close(id, DiscardReason::closing);
      } else if (expired(id, now)) {  // past its lifetime while it was pinged: never handed out
        close(id, DiscardReason::lifetime);
      } else {
        offer(id, now, false);
      }
    }
    maybe_open(now);
  }
  void lost(std::uint64_t id) {
    if (nodes.at(id).state == NodeState::idle) close(id, DiscardReason::broken);
  }
  void ended(std::uint64_t id, Time now) {
    if (nodes.at(id).lease_out) {
      nodes.at(id).state = NodeState::detached;
    } else {
      nodes.erase(id);
    }
    maybe_open(now);
  }
  void tick(Time now) {
    if (closed) return;
    std::size_t alive = live() - count(NodeState::closing);
    for (std::uint64_t id : in_state_by(NodeState::idle, &N::idle_stamp)) {
      N& node = nodes.at(id);
      if (expired(id, now)) {
        close(id, DiscardReason::lifetime);
        --alive;
      } else if (config.idle_timeout.count() > 0 && now - node.idle_since >= config.idle_timeout &&
                 alive > config.min_idle) {
        close(id, DiscardReason::idle_timeout);
        --alive;
      } else if (config.keepalive_interval.count() > 0 &&
                 now - node.last_ping >= config.keepalive_interval) {
        node.state = NodeState::pinging;
        outs.push_back(out(Action::Kind::ping, id));
      }
    }
    if (config.leak_threshold.count() > 0) {
      for (std::uint64_t id : in_state_by(NodeState::leased, &N::leased_stamp)) {
        N& node = nodes.at(id);
        if (!node.leak_reported && now - node.leased_at >= config.leak_threshold) {
          node.leak_reported = true;
          ++leaks;
          outs.push_back(out(Action::Kind::report_leak, id));
        }
      }
    }
    maybe_open(now);
  }
  void close_pool() {
    if (closed) return;
    closed = true;
    for (Priority priority : {Priority::high, Priority::normal}) {
      for (const W& waiter : queue) {
        if (waiter.priority == priority) outs.push_back(out(Action::Kind::wake, 0, waiter.id));
      }
    }
    queue.clear();
    for (std::uint64_t id : in_state_by(NodeState::idle, &N::idle_stamp)) {
      close(id, DiscardReason::closing);
    }
    for (auto& [id, node] : nodes) {
      if (node.state == NodeState::connecting)
        outs.push_back(out(Action::Kind::cancel_connect, id));
    }
  }
};

// --- events ------------------------------------------------------------------------------------

// Abstract events: `pick` chooses among the candidates when the event runs (modulo their number),
// so that any subsequence of a failing run is still a valid run (for shrinking).
// How many ReturnKind values there are (wrong_role the last).
constexpr int return_kinds = static_cast<int>(ReturnKind::wrong_role) + 1;

struct Event {
  enum class Kind : std::uint8_t {
    acquire,
    cancel,
    deadline,
    give_back,
    checkout_failed,
    connect_ok,
    connect_fail,
    reset_ok,
    reset_fail,
    ping_ok,
    ping_fail,
    backend_ended,
    connection_lost,
    tick,
    close,
    close_in_lease,
    drop_closed_lease,
  };
  Kind kind;
  std::uint32_t pick = 0;
  std::uint8_t variant = 0;  // priority for acquire; ReturnKind for give_back (of return_kinds)
  std::uint16_t advance_ms = 0;
};

const char* name(Event::Kind kind) {
  static const char* const names[] = {
      "acquire",        "cancel",           "deadline",        "give_back",  "checkout_failed",
      "connect_ok",     "connect_fail",     "reset_ok",        "reset_fail", "ping_ok",
      "ping_fail",      "backend_ended",    "connection_lost", "tick",       "close",
      "close_in_lease", "drop_closed_lease"};
  return names[static_cast<int>(kind)];
}

std::string describe(const Event& event) {
  std::ostringstream text;
  text << "+" << event.advance_ms << "ms " << name(event.kind) << "(pick " << event.pick
       << ", variant " << int(event.variant) << ")";
  return text.str();
}

CoreConfig random_config(std::mt19937_64& random) {
  auto pick = [&](std::uint64_t below) { return random() % below; };
  CoreConfig config;
  config.max_size = 1 + pick(5);
  config.min_idle = pick(config.max_size + 1) / 2;
  config.reserved_for_priority =
      config.max_size > 1 ? pick(std::min<std::size_t>(config.max_size, 3)) : 0;
  config.max_waiters = 2 + pick(12);
  config.acquire_timeout = pick(4) == 0 ? milliseconds(0) : milliseconds(100);
  config.connect_timeout = milliseconds(100);
  config.max_lifetime = pick(2) == 0 ? milliseconds(0) : milliseconds(200 + pick(800));
  config.lifetime_jitter = 0.0;
  config.idle_timeout = pick(2) == 0 ? milliseconds(0) : milliseconds(50 + pick(300));
  config.keepalive_interval = pick(2) == 0 ? milliseconds(0) : milliseconds(20 + pick(200));
  config.validate_after_idle = milliseconds(0);
  config.leak_threshold = pick(2) == 0 ? milliseconds(0) : milliseconds(50 + pick(200));
  config.watch_idle_after = pick(2) == 0 ? milliseconds(0) : milliseconds(10 + pick(100));
  config.backoff_initial = milliseconds(10);
  config.backoff_max = milliseconds(80);
  config.backoff_jitter = 0.0;
  config.reset_discard_all = pick(3) == 0;
  // Half the runs with named consumers (their minimums within what the reserve leaves).
  if (pick(2) == 0) {
    std::size_t room = config.max_size - config.reserved_for_priority;
    for (std::uint64_t count = 1 + pick(3); count > 0; --count) {
      const std::size_t min = room > 0 ? pick(std::min<std::size_t>(room, 2) + 1) : 0;
      room -= min;
      const std::size_t max = std::max<std::size_t>({min, 1, 1 + pick(config.max_size)});
      config.consumers.push_back({.min = min, .max = std::min(max, config.max_size)});
    }
  }
  return config;
}

std::vector<Event> random_events(std::mt19937_64& random, std::size_t count) {
  std::vector<Event> events;
  events.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    Event event{};
    const auto roll = random() % 100;
    using K = Event::Kind;
    event.kind = roll < 22   ? K::acquire
                 : roll < 27 ? K::cancel
                 : roll < 31 ? K::deadline
                 : roll < 52 ? K::give_back
                 : roll < 54 ? K::checkout_failed
                 : roll < 64 ? K::connect_ok
                 : roll < 67 ? K::connect_fail
                 : roll < 72 ? K::reset_ok
                 : roll < 73 ? K::reset_fail
                 : roll < 76 ? K::ping_ok
                 : roll < 77 ? K::ping_fail
                 : roll < 88 ? K::backend_ended
                 : roll < 90 ? K::connection_lost
                 : roll < 97 ? K::tick
                 : roll < 98 ? K::close_in_lease
                 : roll < 99 ? K::drop_closed_lease
                             : K::close;
    event.pick = static_cast<std::uint32_t>(random());
    event.variant = static_cast<std::uint8_t>(random() % return_kinds);
    event.advance_ms = static_cast<std::uint16_t>(random() % 4 == 0 ? random() % 60 : 0);
    events.push_back(event);
  }
  return events;
}

// --- one run -----------------------------------------------------------------------------------

class Run {
 public:
  explicit Run(const CoreConfig& config) : core_(config, 1) { model_.config = config; }

  // Runs every event; the first failure (with the index of its event), or nothing.
  std::optional<std::pair<std::size_t, std::string>> play(const std::vector<Event>& events,
                                                          bool close_at_end) {
    for (std::size_t i = 0; i < events.size(); ++i) {
      if (auto failure = step(events[i])) return std::make_pair(i, *failure);
    }
    if (close_at_end) {
      Event close{Event::Kind::close};
      if (auto failure = step(close)) return std::make_pair(events.size(), *failure);
      for (const auto& [id, waiter] : waiters_) {
        if (ends_[id] != 1) {
          return std::make_pair(events.size(), "waiter " + std::to_string(id) + " ended " +
                                                   std::to_string(ends_[id]) + " times");
        }
      }
    }
    return std::nullopt;
  }

 private:
  std::optional<std::string> step(const Event& event) {
    now_ += milliseconds(event.advance_ms);
    last_was_tick_ = event.kind == Event::Kind::tick;
    Actions actions;
    model_.outs.clear();
    std::vector<Out> core_extra;  // outcomes of direct calls, for comparison
    std::vector<Out> model_extra;
    try {
      if (auto failure = apply(event, actions, core_extra, model_extra)) return failure;
    } catch (const std::exception& error) {
      return std::string("the core threw: ") + error.what();
    }
    // Compare the actions, without timer armings (when to wake is the core's own business) and
    // socket watches (checked below against the node states).
    std::vector<Out> core_outs = core_extra;
    for (const Action& action : actions) {
      if (action.kind == Action::Kind::arm_timer) {
        if (action.at < now_) return std::string("the timer was armed in the past");
        continue;
      }
      if (action.kind == Action::Kind::watch || action.kind == Action::Kind::unwatch) {
        if (action.kind == Action::Kind::watch && action.node->state != NodeState::idle) {
          return std::string("a node that is not idle was watched");
        }
        continue;
      }
      if (auto failure = take(action)) return failure;
      core_outs.push_back(out(action.kind, action.node ? node_ids_.at(action.node) : 0,
                              action.waiter ? waiter_ids_.at(action.waiter) : 0, action.reason));
    }
    std::vector<Out> model_outs = model_extra;
    model_outs.insert(model_outs.end(), model_.outs.begin(), model_.outs.end());
    std::sort(core_outs.begin(), core_outs.end());
    std::sort(model_outs.begin(), model_outs.end());
    if (core_outs != model_outs) {
      return "after " + describe(event) + ": the core did " + describe(core_outs) +
             "; the model did " + describe(model_outs);
    }
    return check_invariants();
  }

  Node* nth(NodeState state, std::uint32_t pick) {
    std::vector<std::uint64_t> ids;
    core_.nodes(state).for_each([&](const Node& node) { ids.push_back(node.id); });
    if (ids.empty()) return nullptr;
    std::sort(ids.begin(), ids.end());
    return nodes_.at(ids[pick % ids.size()]);
  }

  std::optional<std::string> apply(const Event& event, Actions& actions,
                                   std::vector<Out>& core_extra, std::vector<Out>& model_extra) {
    using K = Event::Kind;
    switch (event.kind) {
      case K::acquire: {
        const Priority priority = event.variant % 3 == 0 ? Priority::high : Priority::normal;
        const auto consumer = static_cast<ConsumerIndex>(event.pick % model_.consumers());
        const std::uint64_t id = next_waiter_++;
        auto result =
            core_.try_acquire(priority, std::source_location::current(), now_, actions, consumer);
        auto [model_kind, model_node] = model_.try_acquire(priority, consumer, now_);
        if (result.kind != model_kind) {
          return "acquire " + std::to_string(id) + ": the core said " +
                 std::to_string(int(result.kind)) + ", the model " +
                 std::to_string(int(model_kind));
        }
        if (result.kind == AcquireResult::Kind::leased) {
          if (result.node->id != model_node) {
            return "acquire " + std::to_string(id) + " got node " +
                   std::to_string(result.node->id) + ", the model's node " +
                   std::to_string(model_node);
          }
          waiters_[id] = nullptr;
          ++ends_[id];
        } else if (result.kind == AcquireResult::Kind::wait) {
          auto waiter =
              std::make_unique<Waiter>(priority, std::source_location::current(), consumer);
          waiter_ids_[waiter.get()] = id;
          core_.enqueue(*waiter, now_, actions);
          model_.enqueue(id, priority, consumer, now_);
          waiters_[id] = std::move(waiter);
          queued_order_.push_back(id);
        } else {
          waiters_[id] = nullptr;
          ++ends_[id];
        }
        return std::nullopt;
      }
      case K::cancel:
      case K::deadline: {
        std::vector<std::uint64_t> queued;
        for (std::uint64_t id : queued_order_) {
          if (waiters_[id] && waiters_[id]->outcome == Waiter::Outcome::none) queued.push_back(id);
        }
        if (queued.empty()) return std::nullopt;
        const std::uint64_t id = queued[event.pick % queued.size()];
        const FailReason why =
            event.kind == K::cancel ? FailReason::cancelled : FailReason::timeout;
        const bool core_ended = core_.withdraw(*waiters_[id], why, actions);
        const bool model_ended = model_.withdraw(id, why);
        if (core_ended != model_ended) return "withdraw disagrees for waiter " + std::to_string(id);
        if (core_ended) ++ends_[id];
        return std::nullopt;
      }
      case K::give_back:
      case K::checkout_failed: {
        Node* node = nth(NodeState::leased, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        if (event.kind == K::checkout_failed) {
          core_.checkout_failed(*node, DiscardReason::failed_reset, now_, actions);
          model_.checkout_failed(id, now_);
        } else {
          const auto kind = static_cast<ReturnKind>(event.variant % return_kinds);
          core_.lease_returned(*node, kind, now_, actions);
          model_.returned(id, kind, now_);
        }
        return std::nullopt;
      }
      case K::connect_ok:
      case K::connect_fail: {
        Node* node = nth(NodeState::connecting, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        if (event.kind == K::connect_ok) {
          core_.connect_succeeded(*node, now_, actions);
          model_.connected(id, now_);
        } else {
          nodes_.erase(id);
          node_ids_.erase(node);
          core_.connect_failed(*node, now_, actions);
          model_.connect_failed(id, now_);
        }
        return std::nullopt;
      }
      case K::reset_ok:
      case K::reset_fail: {
        Node* node = nth(NodeState::resetting, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        core_.reset_done(*node, event.kind == K::reset_ok, now_, actions);
        model_.reset_done(id, event.kind == K::reset_ok, now_);
        return std::nullopt;
      }
      case K::ping_ok:
      case K::ping_fail: {
        Node* node = nth(NodeState::pinging, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        core_.ping_done(*node, event.kind == K::ping_ok, now_, actions);
        model_.ping_done(id, event.kind == K::ping_ok, now_);
        return std::nullopt;
      }
      case K::backend_ended: {
        Node* node = nth(NodeState::closing, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        if (!node->lease_out) {  // destroyed; a node whose lease is out is only detached
          nodes_.erase(id);
          node_ids_.erase(node);
        }
        core_.backend_ended(*node, now_, actions);
        model_.ended(id, now_);
        return std::nullopt;
      }
      case K::close_in_lease: {
        Node* node = nth(NodeState::leased, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        core_.closed_in_lease(*node, now_, actions);
        model_.closed_in_lease(id, now_);
        return std::nullopt;
      }
      case K::drop_closed_lease: {
        std::vector<Node*> out;
        for (NodeState state : {NodeState::closing, NodeState::detached}) {
          core_.nodes(state).for_each([&](const Node& node) {
            if (node.lease_out) out.push_back(const_cast<Node*>(&node));
          });
        }
        if (out.empty()) return std::nullopt;
        Node* node = out[event.pick % out.size()];
        const std::uint64_t id = node->id;
        if (node->state == NodeState::detached) {
          nodes_.erase(id);
          node_ids_.erase(node);
        }
        core_.lease_dropped_after_close(*node);
        model_.lease_dropped(id);
        return std::nullopt;
      }
      case K::connection_lost: {
        Node* node = nth(NodeState::idle, event.pick);
        if (node == nullptr) return std::nullopt;
        const std::uint64_t id = node->id;
        core_.connection_lost(*node, actions);
        model_.lost(id);
        return std::nullopt;
      }
      case K::tick:
        core_.tick(now_, actions);
        model_.tick(now_);
        return std::nullopt;
      case K::close:
        core_.close(actions);
        model_.close_pool();
        return std::nullopt;
    }
    (void)core_extra;
    (void)model_extra;
    return std::nullopt;
  }

  // Bookkeeping of the test's own side of an action (which node is which, who was woken).
  std::optional<std::string> take(const Action& action) {
    if (action.kind == Action::Kind::open) {
      if (node_ids_.contains(action.node)) return std::string("a node was opened twice");
      node_ids_[action.node] = action.node->id;
      nodes_[action.node->id] = action.node;
    }
    if (action.kind == Action::Kind::wake) {
      Waiter& waiter = *action.waiter;
      const std::uint64_t id = waiter_ids_.at(&waiter);
      ++ends_[id];
      if (waiter.outcome == Waiter::Outcome::handed) {
        if (waiter.handed != action.node) return std::string("a waiter woke with another node");
        // FIFO within a priority and consumer: nobody of both who came earlier still waits.
        for (std::uint64_t other : queued_order_) {
          if (other >= id) break;
          const auto& earlier = waiters_[other];
          if (earlier && earlier->priority == waiter.priority &&
              earlier->consumer == waiter.consumer && earlier->outcome == Waiter::Outcome::none) {
            return "waiter " + std::to_string(id) + " was served before the earlier waiter " +
                   std::to_string(other) + " of its priority and consumer";
          }
        }
        // No consumer beyond its max, counting this lease.
        if (model_.in_use(waiter.consumer) > model_.max_of(waiter.consumer)) {
          return "consumer " + std::to_string(waiter.consumer) + " holds more than its max";
        }
      } else if (waiter.outcome != Waiter::Outcome::failed) {
        return std::string("a waiter woke without an outcome");
      }
    }
    return std::nullopt;
  }

  std::optional<std::string> check_invariants() const {
    const CoreStats stats = core_.stats();
    std::size_t by_states = 0;
    for (NodeState state : all_node_states) {
      by_states += stats.count(state);
      if (stats.count(state) != model_.count(state)) {
        return "there are " + std::to_string(stats.count(state)) + " " +
               std::string(to_string(state)) + " connections; the model has " +
               std::to_string(model_.count(state));
      }
    }
    if (stats.live > stats.max) return std::string("more connections than max");
    if (stats.live != by_states - stats.count(NodeState::detached)) {
      return std::string("the capacity out differs from the nodes");
    }
    if (stats.live != model_.live()) return std::string("live differs from the model");
    if (stats.leased_normal + core_.config().reserved_for_priority > core_.config().max_size &&
        stats.leased_normal > 0) {
      return std::string("normal leases use the reserved connections");
    }
    if (stats.count(NodeState::idle) > 0 && core_.next_waiter() != nullptr) {
      return std::string("a waiter waits while an idle connection could serve it");
    }
    for (ConsumerIndex consumer = 0; consumer < model_.consumers(); ++consumer) {
      if (stats.consumers.at(consumer).in_use != model_.in_use(consumer) ||
          stats.consumers.at(consumer).waiting != model_.waiting_of(consumer)) {
        return "consumer " + std::to_string(consumer) + "'s counts differ from the model";
      }
      if (stats.consumers[consumer].in_use > model_.max_of(consumer)) {
        return "consumer " + std::to_string(consumer) + " holds more than its max";
      }
    }
    if (stats.waiting_normal != model_.waiting(Priority::normal) ||
        stats.waiting_high != model_.waiting(Priority::high)) {
      return std::string("the waiting counts differ from the model");
    }
    const auto expect = [&](const char* what, std::uint64_t core_value,
                            std::uint64_t model_value) -> std::optional<std::string> {
      if (core_value == model_value) return std::nullopt;
      return std::string(what) + ": the core counts " + std::to_string(core_value) +
             ", the model " + std::to_string(model_value);
    };
    for (auto check : {expect("acquired", stats.acquired, model_.acquired),
                       expect("timeouts", stats.timeouts, model_.timeouts),
                       expect("cancellations", stats.cancellations, model_.cancellations),
                       expect("connect_attempts", stats.connect_attempts, model_.attempts),
                       expect("connect_errors", stats.connect_errors, model_.errors),
                       expect("discarded", stats.discarded, model_.discarded),
                       expect("leaks_suspected", stats.leaks_suspected, model_.leaks)}) {
      if (check) return check;
    }
    for (const auto& [id, count] : ends_) {
      if (count > 1) return "waiter " + std::to_string(id) + " ended twice";
    }
    // Only idle nodes are watched; after an upkeep tick, every node idle long enough is.
    std::optional<std::string> watch_error;
    for (NodeState state : all_node_states) {
      core_.nodes(state).for_each([&](const Node& node) {
        if (node.watched && state != NodeState::idle) {
          watch_error = "a " + std::string(to_string(state)) + " node is still watched";
        }
        if (last_was_tick_ && state == NodeState::idle && !node.watched &&
            core_.config().watch_idle_after.count() > 0 &&
            now_ - node.idle_since >= core_.config().watch_idle_after) {
          watch_error = "an idle node past watch_idle_after is not watched after a tick";
        }
      });
    }
    return watch_error;
  }

  Core core_;
  Model model_;
  Time now_ = Time{} + std::chrono::hours(1);
  bool last_was_tick_ = false;
  std::uint64_t next_waiter_ = 1;
  std::map<std::uint64_t, std::unique_ptr<Waiter>> waiters_;  // null: ended at once
  std::map<const Waiter*, std::uint64_t> waiter_ids_;
  std::vector<std::uint64_t> queued_order_;
  std::map<std::uint64_t, int> ends_;
  std::map<const Node*, std::uint64_t> node_ids_;
  std::map<std::uint64_t, Node*> nodes_;
};

std::optional<std::pair<std::size_t, std::string>> play(const CoreConfig& config,
                                                        const std::vector<Event>& events) {
  Run run(config);
  return run.play(events, true);
}

// The shortest failing sequence we can find by removing chunks, then single events.
std::vector<Event> shrink(const CoreConfig& config, std::vector<Event> events) {
  for (std::size_t chunk = events.size() / 2; chunk >= 1; chunk /= 2) {
    bool removed = true;
    while (removed) {
      removed = false;
      for (std::size_t start = 0; start + chunk <= events.size(); start += chunk) {
        std::vector<Event> candidate(events.begin(), events.begin() + static_cast<long>(start));
        candidate.insert(candidate.end(), events.begin() + static_cast<long>(start + chunk),
                         events.end());
        if (play(config, candidate)) {
          events = std::move(candidate);
          removed = true;
          break;
        }
      }
    }
    if (chunk == 1) break;
  }
  return events;
}

TEST(PoolCoreModel, AgreesWithTheModelOnOneMillionRandomEvents) {
  // One thread, no locks: ThreadSanitizer (the tsan preset) has nothing to find in it and runs it
  // about twice as slowly as the asan preset (44 s in CI): there it plays a tenth of the seeds.
  // The asan preset, like any build without ThreadSanitizer, plays the million events.
#if defined(__SANITIZE_THREAD__)
  constexpr std::uint64_t seeds = 100;
#else
  constexpr std::uint64_t seeds = 1000;
#endif
  constexpr std::size_t events_per_seed = 1000;
  std::uint64_t first_seed = 1;
  if (const char* from_env = std::getenv("PGRT_MODEL_SEED")) first_seed = std::stoull(from_env);
  std::size_t played = 0;
  for (std::uint64_t seed = first_seed; seed < first_seed + seeds; ++seed) {
    std::mt19937_64 random(seed);
    const CoreConfig config = random_config(random);
    const auto events = random_events(random, events_per_seed);
    auto failure = play(config, events);
    played += events.size();
    if (!failure) continue;
    const auto shortest = shrink(
        config, std::vector<Event>(events.begin(),
                                   events.begin() + static_cast<long>(std::min(failure->first + 1,
                                                                               events.size()))));
    std::ostringstream text;
    text << "seed " << seed << " (rerun with PGRT_MODEL_SEED=" << seed
         << "): " << play(config, shortest)->second << "\nconfig: max " << config.max_size
         << ", min_idle " << config.min_idle << ", reserved " << config.reserved_for_priority
         << ", max_waiters " << config.max_waiters << ", acquire_timeout "
         << config.acquire_timeout.count() << " ms, lifetime " << config.max_lifetime.count()
         << " ms, idle_timeout " << config.idle_timeout.count() << " ms, keepalive "
         << config.keepalive_interval.count() << " ms, leak " << config.leak_threshold.count()
         << " ms, discard_all " << config.reset_discard_all << ", consumers";
    for (const auto& consumer : config.consumers)
      text << " " << consumer.min << "-" << consumer.max;
    text << "\nshortest failing sequence (" << shortest.size() << " events):\n";
    for (const auto& event : shortest) text << "  " << describe(event) << "\n";
    FAIL() << text.str();
  }
  EXPECT_GE(played, seeds * events_per_seed);  // (one million, but under ThreadSanitizer)
}

// --- consumers' shares (PoolConfig::consumers), step by step ---------------------------------

// A core whose connects succeed at once, driven the way the driver would.
class SharedPool {
 public:
  explicit SharedPool(CoreConfig config) : core_(std::move(config), 7) {}

  // Leases a node at once for `consumer`, or queues a waiter (returned) for it.
  std::variant<Node*, Waiter*> acquire(ConsumerIndex consumer) {
    Actions actions;
    auto result = core_.try_acquire(Priority::normal, std::source_location::current(), now_,
                                    actions, consumer);
    run(actions);
    if (result.kind == AcquireResult::Kind::leased) return result.node;
    EXPECT_EQ(result.kind, AcquireResult::Kind::wait);
    waiters_.push_back(
        std::make_unique<Waiter>(Priority::normal, std::source_location::current(), consumer));
    Actions enqueued;
    core_.enqueue(*waiters_.back(), now_, enqueued);
    run(enqueued);
    return waiters_.back().get();
  }
  void give_back(Node& node) {
    Actions actions;
    core_.lease_returned(node, ReturnKind::clean, now_, actions);
    run(actions);
  }
  std::size_t in_use(ConsumerIndex consumer) const {
    return core_.stats().consumers.at(consumer).in_use;
  }
  // The nodes leased to `consumer`, oldest lease first.
  std::vector<Node*> leased_to(ConsumerIndex consumer) {
    std::vector<Node*> found;
    core_.nodes(NodeState::leased).for_each([&](const Node& node) {
      if (node.consumer == consumer) found.push_back(const_cast<Node*>(&node));
    });
    return found;
  }
  Core& core() { return core_; }

 private:
  void run(Actions& actions) {
    for (std::size_t i = 0; i < actions.size(); ++i) {  // connects may add actions
      if (actions[i].kind != Action::Kind::open) continue;
      Actions more;
      core_.connect_succeeded(*actions[i].node, now_, more);
      actions.insert(actions.end(), more.begin(), more.end());
    }
  }
  Core core_;
  Time now_ = Time{} + std::chrono::hours(1);
  std::vector<std::unique_ptr<Waiter>> waiters_;
};

CoreConfig two_consumers(std::size_t max_each) {
  return CoreConfig{.max_size = 3,
                    .consumers = {{.min = 1, .max = max_each}, {.min = 1, .max = max_each}}};
}
constexpr ConsumerIndex busy = 1;
constexpr ConsumerIndex quiet = 2;

// The waiters still waiting.
std::vector<Waiter*> still_waiting(const std::vector<Waiter*>& waiters) {
  std::vector<Waiter*> waiting;
  for (Waiter* waiter : waiters) {
    if (waiter->outcome == Waiter::Outcome::none) waiting.push_back(waiter);
  }
  return waiting;
}

// fail_waiting() (a connect refused for good, e.g. the budget's SQL refused with 42501) fails the
// waiters only while no connection is alive: a pool that cannot grow still serves its waiters
// with the leases that come back (it failed them all, every time a growth connect was refused).
TEST(PoolCoreRefusal, WaitersAreFailedOnlyWhenNoConnectionIsAlive) {
  SharedPool pool(CoreConfig{.max_size = 1});
  auto first = pool.acquire(0);  // (a waiter, handed the connection opened for it)
  Node* leased = std::holds_alternative<Node*>(first) ? std::get<Node*>(first)
                                                      : std::get<Waiter*>(first)->handed;
  ASSERT_NE(leased, nullptr);
  auto second = pool.acquire(0);
  ASSERT_TRUE(std::holds_alternative<Waiter*>(second));
  Waiter* waiter = std::get<Waiter*>(second);
  Actions actions;
  pool.core().fail_waiting(actions);
  EXPECT_EQ(waiter->outcome, Waiter::Outcome::none) << "failed while a lease may come back";
  pool.give_back(*leased);
  EXPECT_EQ(waiter->outcome, Waiter::Outcome::handed);

  Core empty(CoreConfig{.max_size = 1}, 7);
  const Time now = Time{} + std::chrono::hours(1);
  Actions opened;
  const auto result =
      empty.try_acquire(Priority::normal, std::source_location::current(), now, opened, 0);
  ASSERT_EQ(result.kind, AcquireResult::Kind::wait);
  Waiter alone(Priority::normal, std::source_location::current(), 0);
  empty.enqueue(alone, now, opened);
  Actions failed;
  empty.fail_waiting(failed);
  EXPECT_EQ(alone.outcome, Waiter::Outcome::failed);
  EXPECT_EQ(alone.failed, FailReason::refused);
}

TEST(PoolCoreConsumers, ABusyConsumerUsesAnIdleOnesShareButNeverItsMinimum) {
  SharedPool pool(two_consumers(2));
  std::vector<Waiter*> busy_waiting;
  for (int i = 0; i < 10; ++i) {
    auto got = pool.acquire(busy);
    if (auto* waiter = std::get_if<Waiter*>(&got)) busy_waiting.push_back(*waiter);
  }
  EXPECT_EQ(pool.in_use(busy), 2u);  // more than an even split of 3: the quiet one's part
  busy_waiting = still_waiting(busy_waiting);
  EXPECT_EQ(busy_waiting.size(), 8u);
  // The quiet consumer wakes: its minimum was never taken (the busy one is at its max), so it
  // gets it without any lease coming back (here through a connect made for it).
  (void)pool.acquire(quiet);
  EXPECT_EQ(pool.in_use(quiet), 1u);
  // Busy returns go to busy waiters; the quiet one keeps its lease throughout.
  for (int i = 0; i < 8; ++i) pool.give_back(*pool.leased_to(busy).front());
  EXPECT_EQ(pool.in_use(busy), 2u);
  EXPECT_EQ(pool.in_use(quiet), 1u);
  for (Waiter* waiter : busy_waiting) EXPECT_EQ(waiter->outcome, Waiter::Outcome::handed);
}

TEST(PoolCoreConsumers, AConsumerBelowItsMinimumGetsTheNextReturnBeforeEarlierWaiters) {
  SharedPool pool(two_consumers(3));  // the busy one may take the whole pool
  std::vector<Waiter*> busy_waiting;
  for (int i = 0; i < 8; ++i) {
    auto got = pool.acquire(busy);
    if (auto* waiter = std::get_if<Waiter*>(&got)) busy_waiting.push_back(*waiter);
  }
  EXPECT_EQ(pool.in_use(busy), 3u);  // all of it while the quiet one asks for nothing
  busy_waiting = still_waiting(busy_waiting);
  ASSERT_EQ(busy_waiting.size(), 5u);
  auto got = pool.acquire(quiet);
  ASSERT_TRUE(std::holds_alternative<Waiter*>(got));
  Waiter* quiet_waiter = std::get<Waiter*>(got);
  pool.give_back(*pool.leased_to(busy).front());  // one return
  EXPECT_EQ(quiet_waiter->outcome, Waiter::Outcome::handed);
  EXPECT_EQ(busy_waiting.front()->outcome, Waiter::Outcome::none);  // came earlier, waits on
  EXPECT_EQ(pool.in_use(quiet), 1u);
  EXPECT_EQ(pool.in_use(busy), 2u);
}

// The lease that comes back no longer counts against its consumer when the next waiter is
// chosen: a consumer at its max that returns one is below its minimum again and is served first.
TEST(PoolCoreConsumers, AReturnedLeaseCountsNoLongerWhenTheNextWaiterIsChosen) {
  SharedPool pool(CoreConfig{.max_size = 3, .consumers = {{.min = 2, .max = 2}}});
  constexpr ConsumerIndex named = 1;
  (void)pool.acquire(named);
  (void)pool.acquire(named);
  (void)pool.acquire(default_consumer);
  auto other_waiting = pool.acquire(default_consumer);  // came first
  auto named_waiting = pool.acquire(named);
  ASSERT_TRUE(std::holds_alternative<Waiter*>(other_waiting));
  ASSERT_TRUE(std::holds_alternative<Waiter*>(named_waiting));
  pool.give_back(*pool.leased_to(named).front());  // named drops to 1, below its min of 2
  EXPECT_EQ(std::get<Waiter*>(named_waiting)->outcome, Waiter::Outcome::handed);
  EXPECT_EQ(std::get<Waiter*>(other_waiting)->outcome, Waiter::Outcome::none);
}

TEST(PoolCoreConsumers, BusyConsumersGetTheirMinimumsAndSplitTheRestEvenly) {
  // Pool 7: minimums 1, 3 and 0, so 3 are left to split; every consumer keeps asking.
  SharedPool pool(
      CoreConfig{.max_size = 7,
                 .consumers = {{.min = 1, .max = 7}, {.min = 3, .max = 7}, {.min = 0, .max = 7}}});
  for (int i = 0; i < 20; ++i) {
    for (ConsumerIndex consumer : {ConsumerIndex{1}, ConsumerIndex{2}, ConsumerIndex{3}}) {
      (void)pool.acquire(consumer);
    }
  }
  std::mt19937_64 random(3);
  for (int round = 0; round < 40; ++round) {
    // Any lease comes back; its consumer asks again at once (a busy service).
    std::vector<Node*> leased;
    pool.core().nodes(NodeState::leased).for_each([&](const Node& node) {
      leased.push_back(const_cast<Node*>(&node));
    });
    Node* node = leased[random() % leased.size()];
    const ConsumerIndex owner = node->consumer;
    pool.give_back(*node);
    (void)pool.acquire(owner);
  }
  // Each at or above its minimum, and beyond it within one of the others.
  const std::array<std::size_t, 3> minimums{1, 3, 0};
  std::size_t least_beyond = 100, most_beyond = 0;
  for (ConsumerIndex consumer = 1; consumer <= 3; ++consumer) {
    const std::size_t held = pool.in_use(consumer);
    EXPECT_GE(held, minimums[consumer - 1]) << "consumer " << consumer;
    least_beyond = std::min(least_beyond, held - minimums[consumer - 1]);
    most_beyond = std::max(most_beyond, held - minimums[consumer - 1]);
  }
  EXPECT_LE(most_beyond - least_beyond, 1u);
  EXPECT_EQ(pool.in_use(1) + pool.in_use(2) + pool.in_use(3), 7u);
}

TEST(PoolCoreConsumers, FairSharesGiveMinimumsThenSplitEvenlyWithinEachMax) {
  const std::vector<ConsumerLimits> limits{{0, 10}, {1, 2}, {1, 2}, {2, 10}};
  EXPECT_EQ(fair_shares(limits, {false, true, true, false}, 3),
            (std::vector<std::size_t>{0, 2, 1, 0}));
  EXPECT_EQ(fair_shares(limits, {false, true, false, false}, 3),
            (std::vector<std::size_t>{0, 2, 0, 0}));  // its max, not the idle one's part
  EXPECT_EQ(fair_shares(limits, {true, true, true, true}, 10),
            (std::vector<std::size_t>{2, 2, 2, 4}));  // 6 beyond the minimums: 2 + 4
}

// --- the budget's slot check (CoreConfig::slot_check_interval) ---------------------------------

// A waiter handed a connection that sat idle (kept from it by reserved_for_priority until a
// normal lease ended) is told to ping it first, as an acquire that finds it idle is: a dead idle
// connection is never handed out unchecked. A connection handed on straight from a return is not.
TEST(PoolCoreValidation, AWaiterHandedALongIdleConnectionPingsItFirst) {
  Core core(
      CoreConfig{
          .max_size = 2, .reserved_for_priority = 1, .validate_after_idle = milliseconds(100)},
      1);
  Time now = Time{} + std::chrono::hours(1);
  Actions actions;
  const auto lease_one = [&](Priority priority) -> Node* {
    Waiter waiter(priority, std::source_location::current());
    actions.clear();
    auto result = core.try_acquire(priority, waiter.site, now, actions);
    if (result.kind == AcquireResult::Kind::leased) return result.node;
    core.enqueue(waiter, now, actions);
    for (const Action& action : Actions(actions)) {
      if (action.kind == Action::Kind::open) core.connect_succeeded(*action.node, now, actions);
    }
    EXPECT_EQ(waiter.outcome, Waiter::Outcome::handed);
    EXPECT_FALSE(waiter.validate) << "a fresh connection needs no ping";
    return waiter.handed;
  };
  Node* normal = lease_one(Priority::normal);
  Node* reserved = lease_one(Priority::high);
  actions.clear();
  core.lease_returned(*reserved, ReturnKind::clean, now, actions);
  ASSERT_EQ(reserved->state, NodeState::idle);
  // A normal caller waits: the idle connection is the reserve.
  Waiter waiting(Priority::normal, std::source_location::current());
  actions.clear();
  ASSERT_EQ(core.try_acquire(Priority::normal, waiting.site, now, actions).kind,
            AcquireResult::Kind::wait);
  core.enqueue(waiting, now, actions);
  ASSERT_EQ(waiting.outcome, Waiter::Outcome::none);
  // Long after, the normal lease ends broken: the waiter gets the reserve, which sat idle.
  now += milliseconds(200);
  actions.clear();
  core.lease_returned(*normal, ReturnKind::broken, now, actions);
  ASSERT_EQ(waiting.outcome, Waiter::Outcome::handed);
  EXPECT_EQ(waiting.handed, reserved);
  EXPECT_TRUE(waiting.validate);
  // Handed on straight from a return: no ping.
  Waiter next(Priority::normal, std::source_location::current());
  actions.clear();
  core.enqueue(next, now, actions);
  now += milliseconds(200);
  actions.clear();
  core.lease_returned(*reserved, ReturnKind::clean, now, actions);
  ASSERT_EQ(next.outcome, Waiter::Outcome::handed);
  EXPECT_FALSE(next.validate);
}

TEST(PoolCoreSlotCheck, RunsOnAnIdleConnectionOrOnOneComingBackAndClosesALostSlot) {
  Core core(CoreConfig{.max_size = 2, .slot_check_interval = milliseconds(100)}, 1);
  Time now = Time{} + std::chrono::hours(1);
  Actions actions;
  const auto lease_one = [&]() -> Node* {
    Waiter waiter(Priority::normal, std::source_location::current());
    actions.clear();
    auto result = core.try_acquire(Priority::normal, waiter.site, now, actions);
    if (result.kind == AcquireResult::Kind::leased) return result.node;
    core.enqueue(waiter, now, actions);
    for (const Action& action : Actions(actions)) {
      if (action.kind == Action::Kind::open) core.connect_succeeded(*action.node, now, actions);
    }
    EXPECT_EQ(waiter.outcome, Waiter::Outcome::handed);
    return waiter.handed;
  };
  const auto find = [&](Action::Kind kind) -> const Action* {
    for (const Action& action : actions) {
      if (action.kind == kind) return &action;
    }
    return nullptr;
  };
  Node* first = lease_one();
  Node* second = lease_one();
  // Not due yet: a clean return goes straight back.
  actions.clear();
  core.lease_returned(*second, ReturnKind::clean, now, actions);
  EXPECT_EQ(second->state, NodeState::idle);
  // Due: the upkeep runs it on the idle connection, as a ping.
  now += milliseconds(100);
  actions.clear();
  core.tick(now, actions);
  ASSERT_NE(find(Action::Kind::ping), nullptr);
  EXPECT_TRUE(find(Action::Kind::ping)->check_slots);
  EXPECT_EQ(find(Action::Kind::ping)->node, second);
  actions.clear();
  core.ping_done(*second, true, now, actions);
  // Due again while nothing is idle: it runs on the way back of a lease, as a reset.
  second = lease_one();
  now += milliseconds(150);
  actions.clear();
  core.lease_returned(*first, ReturnKind::clean, now, actions);
  ASSERT_NE(find(Action::Kind::reset), nullptr);
  EXPECT_TRUE(find(Action::Kind::reset)->check_slots);
  // The check found `second` (leased) without its slot: it closes when it comes back, not before.
  actions.clear();
  core.slot_lost(*second, now, actions);
  EXPECT_EQ(second->state, NodeState::leased);
  actions.clear();
  core.lease_returned(*second, ReturnKind::clean, now, actions);
  ASSERT_NE(find(Action::Kind::close), nullptr);
  EXPECT_EQ(find(Action::Kind::close)->reason, DiscardReason::slot_lost);
  // An idle connection without its slot closes at once.
  actions.clear();
  core.reset_done(*first, true, now, actions);
  ASSERT_EQ(first->state, NodeState::idle);
  actions.clear();
  core.slot_lost(*first, now, actions);
  ASSERT_NE(find(Action::Kind::close), nullptr);
  EXPECT_EQ(find(Action::Kind::close)->reason, DiscardReason::slot_lost);
}

TEST(PoolCoreBudgetShare, ACapClosesIdleConnectionsNowLeasedOnesOnReturnAndOpensNoneBeyond) {
  SharedPool pool(CoreConfig{.max_size = 4});
  std::vector<Node*> leased;
  for (int i = 0; i < 4; ++i) {
    auto got = pool.acquire(default_consumer);  // each through a connect made for it
    leased.push_back(std::holds_alternative<Node*>(got) ? std::get<Node*>(got)
                                                        : std::get<Waiter*>(got)->handed);
    ASSERT_NE(leased.back(), nullptr);
  }
  pool.give_back(*leased[3]);  // one idle, three leased
  Actions actions;
  const Time now = Time{} + std::chrono::hours(1);
  pool.core().limit_connections(2, now, actions);
  EXPECT_EQ(pool.core().connection_cap(), 2U);
  std::size_t closed_now = 0;
  for (const Action& action : actions) {
    if (action.kind != Action::Kind::close) continue;
    ++closed_now;
    EXPECT_EQ(action.reason, DiscardReason::budget_share);
    EXPECT_EQ(action.node, leased[3]);
  }
  EXPECT_EQ(closed_now, 1U) << "the idle one closes at once";
  // One of the three leased goes when it comes back; the other two stay.
  std::size_t retired = 0;
  for (Node* node : {leased[0], leased[1], leased[2]}) retired += node->evicted ? 1 : 0;
  EXPECT_EQ(retired, 1U);
  // More callers: they wait for the two kept, nothing is opened beyond the cap.
  for (int i = 0; i < 3; ++i) (void)pool.acquire(default_consumer);
  actions.clear();
  pool.core().backend_ended(*leased[3], now, actions);  // the closed one's capacity is back
  EXPECT_EQ(pool.core().nodes(NodeState::connecting).size(), 0U);
  // The cap lifted: the waiters get new connections.
  actions.clear();
  pool.core().limit_connections(4, now, actions);
  EXPECT_EQ(pool.core().connection_cap(), 4U);
  std::size_t opened = 0;
  for (const Action& action : actions) opened += action.kind == Action::Kind::open ? 1 : 0;
  EXPECT_GE(opened, 1U);
}

// Connects hold no slot yet: a cap retires none of the connections holding one for them. The
// oldest connect may stay beyond the cap (to wait for a slot with the waiting marker, taking none
// while the pool is at its cap: at_connection_cap()); newer ones beyond the room left retire.
TEST(PoolCoreBudgetShare, TheOldestConnectStaysBeyondTheCapAndNoConnectionHoldingASlotGoesForIt) {
  std::vector<std::unique_ptr<Waiter>> waiters;  // (outlive the core, which holds them)
  SharedPool pool(CoreConfig{.max_size = 5});
  Core& core = pool.core();
  std::vector<Node*> leased;
  for (int i = 0; i < 2; ++i) {
    auto got = pool.acquire(default_consumer);
    ASSERT_TRUE(std::holds_alternative<Node*>(got) || std::get<Waiter*>(got)->handed != nullptr);
    leased.push_back(std::holds_alternative<Node*>(got) ? std::get<Node*>(got)
                                                        : std::get<Waiter*>(got)->handed);
  }
  const Time now = Time{} + std::chrono::hours(1);
  Actions actions;
  for (int i = 0; i < 3; ++i) {  // three more callers: three connects, left in progress
    const auto result = core.try_acquire(Priority::normal, std::source_location::current(), now,
                                         actions, default_consumer);
    ASSERT_EQ(result.kind, AcquireResult::Kind::wait);
    waiters.push_back(std::make_unique<Waiter>(Priority::normal, std::source_location::current(),
                                               default_consumer));
    core.enqueue(*waiters.back(), now, actions);
  }
  std::vector<Node*> connects;
  for (const Action& action : actions) {
    if (action.kind == Action::Kind::open) connects.push_back(action.node);
  }
  ASSERT_EQ(connects.size(), 3U);
  EXPECT_FALSE(core.at_connection_cap());
  actions.clear();
  core.limit_connections(2, now, actions);
  EXPECT_TRUE(core.at_connection_cap()) << "two connections hold a slot, as the cap allows";
  EXPECT_FALSE(leased[0]->evicted);
  EXPECT_FALSE(leased[1]->evicted);
  for (const Action& action : actions) EXPECT_NE(action.kind, Action::Kind::close);
  EXPECT_FALSE(connects[0]->evicted) << "the oldest connect waits on, beyond the cap";
  EXPECT_TRUE(connects[1]->evicted);
  EXPECT_TRUE(connects[2]->evicted);
  EXPECT_EQ(connects[2]->evict_reason, DiscardReason::budget_share);
  // Lifted, then a cap two above the connections holding a slot: two connects go on.
  actions.clear();
  core.limit_connections(5, now, actions);
  EXPECT_FALSE(connects[2]->evicted);
  actions.clear();
  core.limit_connections(4, now, actions);
  EXPECT_FALSE(core.at_connection_cap());
  EXPECT_FALSE(connects[0]->evicted);
  EXPECT_FALSE(connects[1]->evicted);
  EXPECT_TRUE(connects[2]->evicted);
  // A connection holding a slot beyond the cap goes (the one in use, when it comes back).
  actions.clear();
  core.limit_connections(1, now, actions);
  EXPECT_EQ(static_cast<int>(leased[0]->evicted) + static_cast<int>(leased[1]->evicted), 1);
  EXPECT_TRUE(core.at_connection_cap());
  EXPECT_FALSE(connects[0]->evicted);
  EXPECT_TRUE(connects[1]->evicted);
}

// The nodes the driver picks (on a shared slot, which a waiter without a class can take) are
// retired before any other, a leased one before an idle one that is not picked.
TEST(PoolCoreBudgetShare, TheNodesPickedToRetireFirstGoBeforeIdleOnes) {
  SharedPool pool(CoreConfig{.max_size = 3});
  std::vector<Node*> leased;
  for (int i = 0; i < 3; ++i) {
    auto got = pool.acquire(default_consumer);
    leased.push_back(std::holds_alternative<Node*>(got) ? std::get<Node*>(got)
                                                        : std::get<Waiter*>(got)->handed);
    ASSERT_NE(leased.back(), nullptr);
  }
  pool.give_back(*leased[0]);  // idle, not picked
  pool.give_back(*leased[1]);  // idle, not picked
  Node* picked = leased[2];    // leased, picked
  Actions actions;
  const Time now = Time{} + std::chrono::hours(1);
  pool.core().limit_connections(2, now, actions, std::chrono::seconds(30),
                                [picked](const Node& node) { return &node == picked; });
  EXPECT_TRUE(picked->evicted);
  EXPECT_EQ(picked->evict_reason, DiscardReason::budget_share);
  EXPECT_FALSE(leased[0]->evicted);
  EXPECT_FALSE(leased[1]->evicted);
  for (const Action& action : actions) EXPECT_NE(action.kind, Action::Kind::close);
  // Not enough picked ones: the rest as before, idle first.
  actions.clear();
  pool.core().limit_connections(1, now, actions, std::chrono::seconds(30),
                                [picked](const Node& node) { return &node == picked; });
  EXPECT_EQ(static_cast<int>(leased[0]->evicted) + static_cast<int>(leased[1]->evicted), 1);
}

// evict_all() (or a lost slot) after the fair share retired a leased connection: that one must
// close when it comes back even once the cap has lifted, which keeps only what was retired for
// the cap alone.
TEST(PoolCoreBudgetShare, AnEvictionAfterTheCapRetiredALeaseIsNotUndoneWhenTheCapLifts) {
  for (const DiscardReason later : {DiscardReason::evicted, DiscardReason::slot_lost}) {
    SharedPool pool(CoreConfig{.max_size = 2});
    std::vector<Node*> leased;
    for (int i = 0; i < 2; ++i) {
      auto got = pool.acquire(default_consumer);
      leased.push_back(std::holds_alternative<Node*>(got) ? std::get<Node*>(got)
                                                          : std::get<Waiter*>(got)->handed);
      ASSERT_NE(leased.back(), nullptr);
    }
    Actions actions;
    const Time now = Time{} + std::chrono::hours(1);
    pool.core().limit_connections(1, now, actions);
    Node* retired = leased[0]->evicted ? leased[0] : leased[1];
    ASSERT_TRUE(retired->evicted);
    ASSERT_EQ(retired->evict_reason, DiscardReason::budget_share);
    actions.clear();
    if (later == DiscardReason::evicted) {
      pool.core().evict_all(now, actions);
    } else {
      pool.core().slot_lost(*retired, now, actions);
    }
    EXPECT_EQ(retired->evict_reason, later);
    actions.clear();
    pool.core().limit_connections(2, now, actions);  // lifted
    EXPECT_TRUE(retired->evicted) << "undone by the lifted cap";
    actions.clear();
    pool.core().lease_returned(*retired, ReturnKind::clean, now, actions);
    bool closed = false;
    for (const Action& action : actions) {
      closed = closed || (action.kind == Action::Kind::close && action.node == retired);
    }
    EXPECT_TRUE(closed) << "a connection from before the eviction went back to idle";
  }
}

TEST(PoolCoreSizing, OpensWhatWaitersAndMinIdleNeedWithinTheMax) {
  EXPECT_EQ(connections_to_open({.max_size = 3, .servable_waiters = 5}), 3u);
  EXPECT_EQ(connections_to_open({.max_size = 3, .live = 2, .connecting = 1, .servable_waiters = 5}),
            1u);
  EXPECT_EQ(connections_to_open({.max_size = 3, .live = 1, .idle = 1, .servable_waiters = 1}), 0u);
  EXPECT_EQ(connections_to_open({.max_size = 5, .min_idle = 2}), 2u);
  // Closing connections still count against the max, not towards min_idle.
  EXPECT_EQ(connections_to_open({.max_size = 3, .live = 2, .closing = 2, .min_idle = 2}), 1u);
  EXPECT_EQ(connections_to_open({.max_size = 3, .servable_waiters = 3, .backing_off = true}), 0u);
  EXPECT_EQ(connections_to_open({.max_size = 3, .servable_waiters = 3, .failing = true}), 1u);
  EXPECT_EQ(
      connections_to_open(
          {.max_size = 3, .live = 1, .connecting = 1, .servable_waiters = 3, .failing = true}),
      0u);
}

// A connect refused by a full budget (backpressure) backs off to at most 500 ms, however long
// backoff_max is; an ordinary failure keeps doubling up to backoff_max.
TEST(PoolCoreBackoff, AFullBudgetIsRetriedWithinHalfASecond) {
  for (const bool backpressure : {false, true}) {
    Core core(CoreConfig{.max_size = 1,
                         .backoff_initial = milliseconds(100),
                         .backoff_max = milliseconds(10'000),
                         .backoff_jitter = 0.0},
              1);
    Time now{};
    Waiter waiter(Priority::normal, std::source_location::current());
    Actions actions;
    ASSERT_EQ(core.try_acquire(Priority::normal, waiter.site, now, actions).kind,
              AcquireResult::Kind::wait);
    core.enqueue(waiter, now, actions);
    for (int failure = 1; failure <= 8; ++failure) {
      auto open = std::find_if(actions.begin(), actions.end(), [](const Action& action) {
        return action.kind == Action::Kind::open;
      });
      ASSERT_NE(open, actions.end()) << "failure " << failure;
      Node* node = open->node;
      actions.clear();
      core.connect_failed(*node, now, actions, backpressure);
      now += core.stats().connect_backoff;  // the retry is due: the upkeep tick opens it
      actions.clear();
      core.tick(now, actions);
    }
    if (backpressure) {
      EXPECT_EQ(core.stats().connect_backoff, milliseconds(500));
    } else {
      EXPECT_EQ(core.stats().connect_backoff, milliseconds(10'000));
    }
    core.withdraw(waiter, FailReason::cancelled, actions);
  }
}

// Waiters with a deadline are timed out by the upkeep tick, not by a timer each: enqueue arms the
// tick for the earliest deadline only (a later one arms nothing), a tick before a deadline leaves
// its waiter queued and re-arms for it, and a waiter handed a node before its deadline is not
// touched. (A timer per waiter cost a heap insert and removal in the reactor per wait, and a
// timerfd_settime whenever its deadline was the reactor's earliest.)
TEST(PoolCoreWaiterDeadlines, TheTickTimesOutWaitersPastTheirDeadlineAndArmsForTheNext) {
  Core core(CoreConfig{.max_size = 1, .min_idle = 0}, 1);
  Time now{};
  Actions actions;
  const auto arms = [&] {
    std::vector<Time> at;
    for (const Action& action : actions) {
      if (action.kind == Action::Kind::arm_timer) at.push_back(action.at);
    }
    return at;
  };
  const auto wakes = [&](const Waiter& waiter) {
    return std::count_if(actions.begin(), actions.end(), [&](const Action& action) {
      return action.kind == Action::Kind::wake && action.waiter == &waiter;
    });
  };
  Waiter first(Priority::normal, std::source_location::current());
  Waiter second(Priority::normal, std::source_location::current());
  Waiter third(Priority::high, std::source_location::current());
  first.deadline = now + milliseconds(100);
  second.deadline = now + milliseconds(300);
  third.deadline = now + milliseconds(200);
  core.enqueue(first, now, actions);
  EXPECT_EQ(arms(), std::vector<Time>{first.deadline});
  Node* opened = nullptr;
  for (const Action& action : actions) {
    if (action.kind == Action::Kind::open) opened = action.node;
  }
  ASSERT_NE(opened, nullptr);
  actions.clear();
  core.enqueue(second, now, actions);
  core.enqueue(third, now, actions);
  EXPECT_TRUE(arms().empty()) << "a later deadline re-armed the tick";

  // Early (a tick for something else): nobody times out, the tick is armed for the first.
  actions.clear();
  core.tick(now + milliseconds(50), actions);
  EXPECT_EQ(core.stats().waiting_normal + core.stats().waiting_high, 3u);
  EXPECT_EQ(arms(), std::vector<Time>{first.deadline});

  // The first deadline: only the first waiter fails, with a timeout; the next tick is the
  // high-priority waiter's deadline, the earliest left.
  actions.clear();
  core.tick(first.deadline, actions);
  EXPECT_EQ(first.outcome, Waiter::Outcome::failed);
  EXPECT_EQ(first.failed, FailReason::timeout);
  EXPECT_FALSE(first.queued);
  EXPECT_EQ(wakes(first), 1);
  EXPECT_EQ(core.stats().timeouts, 1u);
  EXPECT_EQ(second.outcome, Waiter::Outcome::none);
  EXPECT_EQ(arms(), std::vector<Time>{third.deadline});

  // The connection comes up before the others' deadlines: the high-priority waiter gets it, and
  // its deadline passing later changes nothing.
  actions.clear();
  core.connect_succeeded(*opened, now + milliseconds(150), actions);
  EXPECT_EQ(third.outcome, Waiter::Outcome::handed);
  actions.clear();
  core.tick(third.deadline, actions);
  EXPECT_EQ(third.outcome, Waiter::Outcome::handed);
  EXPECT_EQ(wakes(third), 0);
  EXPECT_EQ(second.outcome, Waiter::Outcome::none);
  EXPECT_EQ(core.stats().timeouts, 1u);

  // Past the second deadline, while the connection is still out: the second times out.
  actions.clear();
  core.tick(second.deadline + milliseconds(1), actions);
  EXPECT_EQ(second.outcome, Waiter::Outcome::failed);
  EXPECT_EQ(second.failed, FailReason::timeout);
  EXPECT_EQ(wakes(second), 1);
  EXPECT_EQ(core.stats().timeouts, 2u);
  EXPECT_EQ(core.stats().waiting_normal + core.stats().waiting_high, 0u);
  actions.clear();
  core.lease_returned(*third.handed, ReturnKind::clean, second.deadline, actions);
}

// Waiters usually wait as long as the one before them, and the tick then looks only at the
// expired head of each queue; a waiter with an earlier deadline queued behind a later one (a
// shorter per-call timeout) must still time out on time, and the tick must still arm for it.
TEST(PoolCoreWaiterDeadlines, AnEarlierDeadlineBehindALaterOneStillTimesOutOnTime) {
  Core core(CoreConfig{.max_size = 1, .min_idle = 0}, 1);
  const Time now{};
  Actions actions;
  Waiter later(Priority::normal, std::source_location::current());
  Waiter earlier(Priority::normal, std::source_location::current());
  Waiter last(Priority::normal, std::source_location::current());
  later.deadline = now + milliseconds(300);
  earlier.deadline = now + milliseconds(100);
  last.deadline = now + milliseconds(400);
  core.enqueue(later, now, actions);
  core.enqueue(earlier, now, actions);
  core.enqueue(last, now, actions);
  const auto armed_at = [&]() -> std::optional<Time> {
    std::optional<Time> at;
    for (const Action& action : actions) {
      if (action.kind == Action::Kind::arm_timer) at = action.at;
    }
    return at;
  };
  EXPECT_EQ(armed_at(), earlier.deadline);

  actions.clear();
  core.tick(earlier.deadline, actions);
  EXPECT_EQ(earlier.outcome, Waiter::Outcome::failed);
  EXPECT_EQ(earlier.failed, FailReason::timeout);
  EXPECT_EQ(later.outcome, Waiter::Outcome::none);
  EXPECT_EQ(last.outcome, Waiter::Outcome::none);
  EXPECT_EQ(armed_at(), later.deadline);

  actions.clear();
  core.tick(later.deadline, actions);
  EXPECT_EQ(later.outcome, Waiter::Outcome::failed);
  EXPECT_EQ(last.outcome, Waiter::Outcome::none);
  EXPECT_EQ(armed_at(), last.deadline);

  actions.clear();
  core.tick(last.deadline, actions);
  EXPECT_EQ(last.outcome, Waiter::Outcome::failed);
  EXPECT_EQ(core.stats().timeouts, 3u);
  EXPECT_EQ(core.stats().waiting_normal, 0u);
}

// Random deadlines (in and out of order, some never), priorities, consumers, cancellations and
// ticks at random moments, against the rule itself: a tick fails exactly the queued waiters whose
// deadline has passed, and arms the timer for the earliest deadline left.
TEST(PoolCoreWaiterDeadlines, TicksTimeOutExactlyTheWaitersPastTheirDeadline) {
  for (std::uint64_t seed = 1; seed <= 200; ++seed) {
    std::mt19937_64 random(seed);
    CoreConfig config{.max_size = 1, .min_idle = 0, .max_waiters = 1'000};
    config.consumers = {ConsumerLimits{.min = 0, .max = 1}};
    Core core(config, seed);
    Time now{};
    Actions actions;
    std::vector<std::unique_ptr<Waiter>> waiters;
    std::set<Waiter*> queued;
    for (int step = 0; step < 300; ++step) {
      actions.clear();
      const auto roll = random() % 10;
      if (roll < 5) {
        const auto priority = random() % 3 == 0 ? Priority::high : Priority::normal;
        const ConsumerIndex consumer = random() % 2;
        auto& waiter = *waiters.emplace_back(
            std::make_unique<Waiter>(priority, std::source_location::current(), consumer));
        waiter.deadline =
            random() % 8 == 0
                ? Time::max()
                : now + milliseconds(random() % 4 == 0 ? random() % 50 : 100 + random() % 20);
        core.enqueue(waiter, now, actions);
        queued.insert(&waiter);
      } else if (roll < 6 && !queued.empty()) {
        auto chosen = queued.begin();
        std::advance(chosen, static_cast<std::ptrdiff_t>(random() % queued.size()));
        ASSERT_TRUE(core.withdraw(**chosen, FailReason::cancelled, actions));
        queued.erase(chosen);
      } else {
        now += milliseconds(random() % 30);
        core.tick(now, actions);
        Time earliest_left = Time::max();
        for (auto it = queued.begin(); it != queued.end();) {
          Waiter& waiter = **it;
          const bool woken = std::any_of(actions.begin(), actions.end(), [&](const Action& a) {
            return a.kind == Action::Kind::wake && a.waiter == &waiter;
          });
          if (waiter.deadline <= now) {
            ASSERT_EQ(waiter.outcome, Waiter::Outcome::failed) << "seed " << seed;
            ASSERT_EQ(waiter.failed, FailReason::timeout) << "seed " << seed;
            ASSERT_TRUE(woken) << "seed " << seed;
            it = queued.erase(it);
          } else {
            ASSERT_EQ(waiter.outcome, Waiter::Outcome::none) << "seed " << seed;
            ASSERT_FALSE(woken) << "seed " << seed;
            earliest_left = std::min(earliest_left, waiter.deadline);
            ++it;
          }
        }
        std::optional<Time> armed;
        for (const Action& action : actions) {
          if (action.kind == Action::Kind::arm_timer) armed = action.at;
        }
        if (earliest_left != Time::max()) {
          ASSERT_EQ(armed, earliest_left) << "seed " << seed << " step " << step;
        }
      }
    }
    actions.clear();
    core.close(actions);
  }
}

// Pool::evict_all(): idle nodes close now, a leased one when it comes back, a connecting one when
// its connect succeeds; none of them is ever handed out again, and replacements are opened.
TEST(PoolCoreEviction, IdleNodesCloseNowAndTheOthersWhenTheyComeBack) {
  Core core(CoreConfig{.max_size = 3, .min_idle = 0}, 1);
  const Time now{};
  auto closes_of = [](const Actions& actions, const Node* node) {
    return std::count_if(actions.begin(), actions.end(), [&](const Action& action) {
      return action.kind == Action::Kind::close && action.node == node &&
             action.reason == DiscardReason::evicted;
    });
  };
  auto opened = [](const Actions& actions) {
    std::vector<Node*> nodes;
    for (const auto& action : actions) {
      if (action.kind == Action::Kind::open) nodes.push_back(action.node);
    }
    return nodes;
  };
  // Three waiters: three nodes opened, two of them connect and are leased, one still connecting.
  Waiter first(Priority::normal, std::source_location::current());
  Waiter second(Priority::normal, std::source_location::current());
  Waiter third(Priority::normal, std::source_location::current());
  Actions actions;
  for (Waiter* waiter : {&first, &second, &third}) {
    ASSERT_EQ(core.try_acquire(Priority::normal, waiter->site, now, actions).kind,
              AcquireResult::Kind::wait);
    core.enqueue(*waiter, now, actions);
  }
  const auto nodes = opened(actions);
  ASSERT_EQ(nodes.size(), 3u);
  actions.clear();
  core.connect_succeeded(*nodes[0], now, actions);
  core.connect_succeeded(*nodes[1], now, actions);
  ASSERT_EQ(first.handed, nodes[0]);
  ASSERT_EQ(second.handed, nodes[1]);
  actions.clear();
  core.lease_returned(*nodes[1], ReturnKind::clean, now, actions);  // idle now: third takes it?
  // The third waiter took it (FIFO); give it back so that one node is idle.
  ASSERT_EQ(third.handed, nodes[1]);
  core.lease_returned(*nodes[1], ReturnKind::clean, now, actions);
  ASSERT_EQ(nodes[1]->state, NodeState::idle);
  actions.clear();

  core.evict_all(now, actions);
  EXPECT_EQ(closes_of(actions, nodes[1]), 1) << "the idle one closes at once";
  EXPECT_EQ(nodes[0]->state, NodeState::leased) << "a lease in use is not interrupted";
  actions.clear();
  core.lease_returned(*nodes[0], ReturnKind::clean, now, actions);
  EXPECT_EQ(closes_of(actions, nodes[0]), 1) << "the leased one closes when it comes back";
  actions.clear();
  core.connect_succeeded(*nodes[2], now, actions);
  EXPECT_EQ(closes_of(actions, nodes[2]), 1) << "the one connecting closes when it connects";
  // A new acquire gets a new node, never an evicted one.
  actions.clear();
  const auto next =
      core.try_acquire(Priority::normal, std::source_location::current(), now, actions);
  EXPECT_NE(next.kind, AcquireResult::Kind::leased);
}

TEST(PoolCoreCapacity, ATokenGivesItsSlotBackExactlyOnce) {
  Capacity capacity(2);
  auto first = capacity.try_take();
  auto second = capacity.try_take();
  ASSERT_TRUE(first && second);
  EXPECT_FALSE(capacity.try_take());
  CapacityToken moved = std::move(*first);
  first.reset();  // the moved-from token gives nothing back
  EXPECT_EQ(capacity.taken(), 2u);
  moved.release();
  moved.release();
  EXPECT_EQ(capacity.taken(), 1u);
  second.reset();
  EXPECT_EQ(capacity.taken(), 0u);
}

}  // namespace
}  // namespace pgrt::detail::pool

namespace pgrt::detail::pool {
namespace {

// Every pair of states against the table of allowed moves.
TEST(PoolCoreNode, EveryTransitionMatchesTheTable) {
  const std::set<std::pair<NodeState, NodeState>> allowed{
      {NodeState::connecting, NodeState::idle},  {NodeState::connecting, NodeState::closing},
      {NodeState::idle, NodeState::leased},      {NodeState::idle, NodeState::pinging},
      {NodeState::idle, NodeState::closing},     {NodeState::leased, NodeState::idle},
      {NodeState::leased, NodeState::resetting}, {NodeState::leased, NodeState::closing},
      {NodeState::resetting, NodeState::idle},   {NodeState::resetting, NodeState::closing},
      {NodeState::pinging, NodeState::idle},     {NodeState::pinging, NodeState::closing},
      {NodeState::closing, NodeState::detached},
  };
  for (NodeState from : all_node_states) {
    for (NodeState to : all_node_states) {
      EXPECT_EQ(allowed_transition(from, to), allowed.contains({from, to}))
          << to_string(from) << " -> " << to_string(to);
    }
  }
}

}  // namespace
}  // namespace pgrt::detail::pool
