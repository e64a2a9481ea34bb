#include <gtest/gtest.h>

#include "pgrt/lifecycle/state.hpp"

using pgrt::lifecycle::State;

TEST(LifecycleState, EveryStateHasItsOwnName) {
  EXPECT_EQ(to_string(State::created), "created");
  EXPECT_EQ(to_string(State::starting), "starting");
  EXPECT_EQ(to_string(State::running), "running");
  EXPECT_EQ(to_string(State::stopping), "stopping");
  EXPECT_EQ(to_string(State::stopped), "stopped");
  EXPECT_EQ(to_string(State::failed), "failed");
  EXPECT_EQ(to_string(static_cast<State>(99)), "unknown");
}
