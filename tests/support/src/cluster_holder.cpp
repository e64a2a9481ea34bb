// Starts a throwaway cluster, prints "<own pid> <postmaster pid> <directory>" and sleeps until
// killed.
#include <chrono>
#include <iostream>
#include <thread>
#include <unistd.h>

#include "pgrt/testing/temp_cluster.hpp"

int main() {
  try {
    pgrt::testing::TempCluster cluster;
    std::cout << ::getpid() << ' ' << cluster.postmaster_pid() << ' '
              << cluster.directory().string() << std::endl;
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  } catch (const std::exception& error) {
    std::cerr << "pgrt_cluster_holder: " << error.what() << '\n';
    return 1;
  }
}
