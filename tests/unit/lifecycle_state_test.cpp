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
  // Well-defined, not UB: a scoped enumeration has a fixed underlying type (int), so every int is
  // one of its values ([dcl.enum]/8, [expr.static.cast]/10). A value read from a corrupt byte or
  // a newer peer gets a name too.
  EXPECT_EQ(to_string(static_cast<State>(99)), "unknown");
}
