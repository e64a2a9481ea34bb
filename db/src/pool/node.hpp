#pragma once

// One pooled connection as the pool's core sees it: a state, the capacity token it owns, and the
// times the core decides by. The driver hangs its connection on it (NodeAttachment). Each node is
// always in exactly one state; the core moves it only through allowed_transition(), and every
// count the pool reports is the size of a state's list (see state_machine.hpp).

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <source_location>
#include <string_view>

#include "capacity.hpp"
#include "pgrt/db/pool_types.hpp"

namespace pgrt::detail::pool {

using Clock = std::chrono::steady_clock;
using Time = Clock::time_point;

// A consumer of the pool (PoolConfig::consumers): an index into the core's consumer table, 0 for
// acquires that name none.
using ConsumerIndex = std::uint16_t;
constexpr ConsumerIndex default_consumer = 0;

enum class NodeState : std::uint8_t {
  connecting,  // opening; no backend yet
  idle,        // ready, in the idle list
  leased,      // a Lease holds it
  resetting,   // ROLLBACK / DISCARD ALL after a return, in the background
  pinging,     // a keepalive ping, in the background
  closing,     // closed or being closed; holds its capacity until the server has ended the backend
  // Closed by its user inside a lease, and its backend has ended: its capacity is back, and only
  // that Lease still refers to it. Destroyed when the Lease is dropped.
  detached,
};
inline constexpr std::size_t node_state_count = 7;
inline constexpr std::array<NodeState, node_state_count> all_node_states{
    NodeState::connecting, NodeState::idle,    NodeState::leased,  NodeState::resetting,
    NodeState::pinging,    NodeState::closing, NodeState::detached};

// Whether the core may move a node from `from` to `to`. A node leaves `closing` by being destroyed
// (its backend has ended), or for `detached` when its Lease is still out; `connecting` also by
// being destroyed (the connect failed); `detached` only by being destroyed (its Lease dropped).
constexpr bool allowed_transition(NodeState from, NodeState to) {
  switch (from) {
    case NodeState::connecting:
      return to == NodeState::idle || to == NodeState::closing;
    case NodeState::idle:
      return to == NodeState::leased || to == NodeState::pinging || to == NodeState::closing;
    case NodeState::leased:
      return to == NodeState::idle || to == NodeState::resetting || to == NodeState::closing;
    case NodeState::resetting:
    case NodeState::pinging:
      return to == NodeState::idle || to == NodeState::closing;
    case NodeState::closing:
      return to == NodeState::detached;
    case NodeState::detached:
      return false;
  }
  return false;
}

constexpr std::string_view to_string(NodeState state) {
  switch (state) {
    case NodeState::connecting:
      return "connecting";
    case NodeState::idle:
      return "idle";
    case NodeState::leased:
      return "leased";
    case NodeState::resetting:
      return "resetting";
    case NodeState::pinging:
      return "pinging";
    case NodeState::closing:
      return "closing";
    case NodeState::detached:
      return "detached";
  }
  return "unknown";
}

// What the driver keeps on a node (its connection). Destroyed with the node.
struct NodeAttachment {
  NodeAttachment() = default;
  NodeAttachment(const NodeAttachment&) = delete;
  NodeAttachment& operator=(const NodeAttachment&) = delete;
  NodeAttachment(NodeAttachment&&) = delete;
  NodeAttachment& operator=(NodeAttachment&&) = delete;
  virtual ~NodeAttachment() = default;
};

struct Node {
  Node(std::uint64_t id_in, CapacityToken capacity_in) noexcept
      : id(id_in), capacity(std::move(capacity_in)) {}
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;
  Node(Node&&) = delete;
  Node& operator=(Node&&) = delete;
  ~Node() = default;

  const std::uint64_t id;  // 1, 2, ... in the order the core opened them
  NodeState state = NodeState::connecting;
  CapacityToken capacity;
  std::unique_ptr<NodeAttachment> attachment;

  Time expires = Time::max();  // max_lifetime, with jitter
  Time idle_since{};           // when it last became idle after use
  Time last_ping{};            // connected, or last keepalive ping
  // While leased:
  Time leased_at{};
  Time lease_started{};  // the driver's: when the caller got it, by the precise clock (use time)
  std::source_location lease_site;
  Priority priority = Priority::normal;
  ConsumerIndex consumer = default_consumer;
  bool leak_reported = false;
  bool session_used = false;  // leased since its last DISCARD ALL
  bool watched = false;       // idle, and the driver watches its socket (Action::watch)
  // Core::evict_all(), Core::slot_lost(): closed instead of becoming idle again, for this reason.
  bool evicted = false;
  DiscardReason evict_reason = DiscardReason::evicted;
  std::uint32_t resets = 0;  // how many times it entered `resetting` (a budget's check reads it)
  DiscardReason close_reason = DiscardReason::closing;  // while closing
  // Closed by its user inside a lease (Core::closed_in_lease) and that Lease not dropped yet.
  bool lease_out = false;

  // The list of its state (state_machine.hpp).
  Node* prev = nullptr;
  Node* next = nullptr;
};

}  // namespace pgrt::detail::pool
