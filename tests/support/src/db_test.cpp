#include "pgrt/testing/db_test.hpp"

namespace pgrt::testing {

TempCluster& DbTest::cluster() {
  static const std::unique_ptr<TempCluster> shared = start_own_cluster();
  return *shared;
}

std::unique_ptr<TempCluster> DbTest::start_own_cluster(TempClusterOptions options) {
  return std::make_unique<TempCluster>(std::move(options));
}

}  // namespace pgrt::testing
