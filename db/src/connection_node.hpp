#pragma once

// The life of one pooled connection as a state machine free of I/O: the pool advances each
// connection through it and refuses a transition the table does not allow. Unit-tested
// exhaustively (tests/unit/connection_node_test.cpp).

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace pgrt::detail {

enum class NodeState { connecting, idle, leased, resetting, pinging, closed };
enum class NodeEvent {
  connected,       // connecting -> idle
  connect_failed,  // connecting -> closed
  lease,           // idle -> leased (fast path or handoff to a waiter)
  returned,        // leased -> idle (the lease ended; the pool then decides what to do)
  needs_reset,     // idle -> resetting (ROLLBACK and/or DISCARD ALL in the background)
  reset_done,      // resetting -> idle
  ping,            // idle -> pinging (keepalive)
  ping_done,       // pinging -> idle
  discard,         // idle, resetting, pinging -> closed (broken, expired, closing, failed reset)
};

inline constexpr std::array<NodeState, 6> all_node_states{
    NodeState::connecting, NodeState::idle,    NodeState::leased,
    NodeState::resetting,  NodeState::pinging, NodeState::closed};
inline constexpr std::array<NodeEvent, 9> all_node_events{
    NodeEvent::connected, NodeEvent::connect_failed, NodeEvent::lease,
    NodeEvent::returned,  NodeEvent::needs_reset,    NodeEvent::reset_done,
    NodeEvent::ping,      NodeEvent::ping_done,      NodeEvent::discard};

// The state after `event`, or nullopt when `event` cannot happen in `state`.
constexpr std::optional<NodeState> node_transition(NodeState state, NodeEvent event) {
  switch (state) {
    case NodeState::connecting:
      if (event == NodeEvent::connected) return NodeState::idle;
      if (event == NodeEvent::connect_failed) return NodeState::closed;
      return std::nullopt;
    case NodeState::idle:
      if (event == NodeEvent::lease) return NodeState::leased;
      if (event == NodeEvent::needs_reset) return NodeState::resetting;
      if (event == NodeEvent::ping) return NodeState::pinging;
      if (event == NodeEvent::discard) return NodeState::closed;
      return std::nullopt;
    case NodeState::leased:
      if (event == NodeEvent::returned) return NodeState::idle;
      return std::nullopt;
    case NodeState::resetting:
      if (event == NodeEvent::reset_done) return NodeState::idle;
      if (event == NodeEvent::discard) return NodeState::closed;
      return std::nullopt;
    case NodeState::pinging:
      if (event == NodeEvent::ping_done) return NodeState::idle;
      if (event == NodeEvent::discard) return NodeState::closed;
      return std::nullopt;
    case NodeState::closed:
      return std::nullopt;
  }
  return std::nullopt;
}

// Whether a connection in `state` counts against max_size: every state but closed, because
// capacity is given back only after the socket is closed.
constexpr bool counts_against_max(NodeState state) {
  return state != NodeState::closed;
}

// How many transitions the pool attempted that the table refuses (a pool bug); tests check it
// stays 0. Defined in pool.cpp.
std::uint64_t illegal_node_transitions() noexcept;

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
    case NodeState::closed:
      return "closed";
  }
  return "unknown";
}

}  // namespace pgrt::detail
