// The pooled connection's state machine, every state against every event.
#include "connection_node.hpp"

#include <gtest/gtest.h>
#include <map>
#include <set>

namespace pgrt::detail {
namespace {

using Edge = std::pair<NodeState, NodeEvent>;

const std::map<Edge, NodeState>& allowed() {
  static const std::map<Edge, NodeState> edges{
      {{NodeState::connecting, NodeEvent::connected}, NodeState::idle},
      {{NodeState::connecting, NodeEvent::connect_failed}, NodeState::closed},
      {{NodeState::idle, NodeEvent::lease}, NodeState::leased},
      {{NodeState::idle, NodeEvent::needs_reset}, NodeState::resetting},
      {{NodeState::idle, NodeEvent::ping}, NodeState::pinging},
      {{NodeState::idle, NodeEvent::discard}, NodeState::closed},
      {{NodeState::leased, NodeEvent::returned}, NodeState::idle},
      {{NodeState::resetting, NodeEvent::reset_done}, NodeState::idle},
      {{NodeState::resetting, NodeEvent::discard}, NodeState::closed},
      {{NodeState::pinging, NodeEvent::ping_done}, NodeState::idle},
      {{NodeState::pinging, NodeEvent::discard}, NodeState::closed},
  };
  return edges;
}

TEST(ConnectionNode, EveryStateAndEventMatchesTheTable) {
  for (NodeState state : all_node_states) {
    for (NodeEvent event : all_node_events) {
      const auto next = node_transition(state, event);
      const auto expected = allowed().find({state, event});
      if (expected == allowed().end()) {
        EXPECT_FALSE(next.has_value())
            << to_string(state) << " must refuse event " << static_cast<int>(event);
      } else {
        ASSERT_TRUE(next.has_value())
            << to_string(state) << " must take event " << static_cast<int>(event);
        EXPECT_EQ(*next, expected->second);
      }
    }
  }
}

TEST(ConnectionNode, ALeasedConnectionCanOnlyComeBack) {
  // No reset, ping or discard while a user holds it: the pool never touches a leased connection.
  for (NodeEvent event : all_node_events) {
    EXPECT_EQ(node_transition(NodeState::leased, event).has_value(), event == NodeEvent::returned);
  }
}

TEST(ConnectionNode, ClosedIsTerminalAndEveryOtherStateHoldsCapacity) {
  for (NodeEvent event : all_node_events) {
    EXPECT_FALSE(node_transition(NodeState::closed, event).has_value());
  }
  for (NodeState state : all_node_states) {
    EXPECT_EQ(counts_against_max(state), state != NodeState::closed) << to_string(state);
  }
}

TEST(ConnectionNode, EveryStateIsReachableAndEveryLiveStateCanReachClosed) {
  std::set<NodeState> reached{NodeState::connecting};
  for (bool grew = true; grew;) {
    grew = false;
    for (NodeState state : std::set<NodeState>(reached)) {
      for (NodeEvent event : all_node_events) {
        if (auto next = node_transition(state, event)) grew |= reached.insert(*next).second;
      }
    }
  }
  EXPECT_EQ(reached.size(), all_node_states.size());
  for (NodeState start : all_node_states) {
    std::set<NodeState> seen{start};
    for (bool grew = true; grew;) {
      grew = false;
      for (NodeState state : std::set<NodeState>(seen)) {
        for (NodeEvent event : all_node_events) {
          if (auto next = node_transition(state, event)) grew |= seen.insert(*next).second;
        }
      }
    }
    EXPECT_TRUE(seen.count(NodeState::closed)) << to_string(start) << " can never be closed";
  }
}

}  // namespace
}  // namespace pgrt::detail
