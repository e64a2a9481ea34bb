// The server every contestant of scripts/bench.sh runs against: a throwaway cluster (the test
// harness's TempCluster, so it runs as `postgres` when we are root) with fixed settings. Prints one
// JSON line (the unix-socket, plain TCP and TLS conninfo, the socket directory, the port and the
// server's bin directory, for pgbench and psql), then holds the cluster until its standard input
// closes, and removes it. If this process is killed, the cluster's guardian removes it.
//
//   pgrt_bench_server [max_connections]
#include <cstdlib>
#include <iostream>
#include <string>

#include "pgrt/testing/temp_cluster.hpp"

namespace {

// The paths and conninfo strings we print hold no quote or backslash (TempCluster makes them), but
// escape anyway so the line is always valid JSON.
std::string json_string(const std::string& text) {
  std::string quoted = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') quoted += '\\';
    quoted += c;
  }
  return quoted + '"';
}

}  // namespace

int main(int argc, char** argv) {
  try {
    pgrt::testing::TempClusterOptions options;
    options.max_connections = argc > 1 ? std::atoi(argv[1]) : 100;
    // TLS offered on the TCP port, plain TCP accepted too: the TLS rows beside the plain ones.
    options.tls = true;
    options.tls_only = false;
    // Durable commits, as a production server would have; the same for every contestant.
    pgrt::testing::TempCluster cluster(options);
    std::cout << "{\"dsn\": " << json_string(cluster.dsn())
              << ", \"tcp_dsn\": " << json_string(cluster.tcp_dsn())
              << ", \"tls_dsn\": " << json_string(cluster.tls_dsn("verify-full"))
              << ", \"socket_dir\": " << json_string(cluster.directory().string())
              << ", \"port\": " << cluster.port()
              << ", \"bin_dir\": " << json_string(cluster.bin_dir().string()) << "}" << std::endl;
    std::string ignored;
    while (std::getline(std::cin, ignored)) {
    }
    return 0;
  } catch (const std::exception& error) {
    std::cerr << "pgrt_bench_server: " << error.what() << '\n';
    return 1;
  }
}
