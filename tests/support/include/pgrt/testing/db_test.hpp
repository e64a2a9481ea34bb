#pragma once

/// @file
/// The GoogleTest fixture base for tests that need a PostgreSQL server.

#include <gtest/gtest.h>
#include <memory>

#include "pgrt/testing/temp_cluster.hpp"

namespace pgrt::testing {

/// Base class for database tests. By default every test of a binary shares one throwaway cluster,
/// started on first use and stopped when the binary exits; a test that needs different settings,
/// or that breaks its server on purpose, starts its own with start_own_cluster().
class DbTest : public ::testing::Test {
 protected:
  /// The cluster shared by this test binary. Throws ClusterError if it cannot be started.
  static TempCluster& cluster();
  /// A new cluster owned by the caller; stopped and removed when the pointer is destroyed.
  static std::unique_ptr<TempCluster> start_own_cluster(TempClusterOptions options = {});
};

}  // namespace pgrt::testing
