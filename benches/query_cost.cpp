// pgrt_query_cost: runs one kind of `SELECT 1` a given number of times, so that counting tools
// (perf trace, valgrind --tool=callgrind) can wrap it; scripts/query-cost.sh runs it and writes
// docs/performance.md. It measures nothing but its own voluntary context switches (wake-ups).
//
//   pgrt_query_cost MODE QUERIES
//
// Modes (all on one connection, over whatever DATABASE_URL names):
//   pgrt-lease-prepared       acquire a lease from a max-1 pgrt::Pool, query_prepared, release
//   pgrt-lease-unprepared     the same with query() (unnamed statement, parse + bind every time)
//   pgrt-connection-prepared  query_prepared on a pgrt::Connection, no pool
//   pgrt-shared-query         Pool::query() by a lone caller on a max-1 pool (no lease)
//   libpq-exec-prepared       blocking PQexecPrepared
//   libpq-send-prepared       non-blocking PQsendQueryPrepared, then poll() + PQconsumeInput until
//                             the result is complete (the least an event loop over libpq needs)
//
// Before the counted queries it connects and runs one query (which prepares the statement), so
// that what happens once per run is the same whatever QUERIES is: under callgrind, the script
// subtracts a run of QUERIES from a run of 2 x QUERIES. Prints one JSON line: the mode, the number
// of queries, and the voluntary and involuntary context switches of the process during the
// counted queries. The two getrusage() calls that take those are the only ones the driver makes:
// in a syscall trace they mark where the counted queries begin and end.
//
// The server: DATABASE_URL, or a throwaway cluster started for the run when it is unset (then
// the cluster's own processes are children of this one: tools that follow children count them).
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <libpq-fe.h>
#include <memory>
#include <poll.h>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/resource.h>
#include <utility>

#include <pgrt/db.hpp>
#include <pgrt/testing/temp_cluster.hpp>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;

constexpr std::string_view kModes =
    "pgrt-lease-prepared, pgrt-lease-unprepared, pgrt-connection-prepared, pgrt-shared-query, "
    "libpq-exec-prepared, libpq-send-prepared";

struct Switches {
  long voluntary = 0;
  long involuntary = 0;
};

Switches switches_now() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return {usage.ru_nvcsw, usage.ru_nivcsw};
}

// What the counted queries did, apart from the queries themselves.
struct Window {
  Switches before;
  Switches after;
  std::uint64_t rows = 0;  // every query returns one row; checked, so nothing is optimized out
};

// Runs a coroutine to completion on its own io_context.
template <typename MakeCoroutine>
void run(asio::io_context& io, MakeCoroutine make) {
  std::exception_ptr failure;
  asio::co_spawn(io, make(), [&failure](std::exception_ptr error) { failure = error; });
  io.run();
  if (failure) std::rethrow_exception(failure);
}

// A pool of at most one connection to `dsn`.
pgrt::PoolConfig one_connection(const std::string& dsn) {
  pgrt::PoolConfig config;
  config.conninfo = dsn;
  config.max_size = 1;
  config.application = "pgrt-query-cost";
  return config;
}

// How the pool modes run their statement.
enum class PoolPath { lease_prepared, lease_unprepared, shared };

// The pool modes: a lease per statement, or Pool::query() by a lone caller (no lease: the pool's
// shared connection runs it in a sync segment of its own; pool.md's "Statements without a lease").
Window pgrt_pool(const std::string& dsn, std::uint64_t queries, PoolPath path) {
  asio::io_context io;
  pgrt::Pool pool(io.get_executor(), one_connection(dsn));
  Window window;
  run(io, [&]() -> asio::awaitable<void> {
    // The first query connects and prepares the statement. The loop body is written out, not a
    // coroutine of ours, so that every coroutine frame counted is pgrt's (or asio's).
    for (std::uint64_t i = 0; i <= queries; ++i) {
      if (i == 1) window.before = switches_now();
      if (path == PoolPath::shared) {
        window.rows += (co_await pool.query("SELECT 1")).size();
        continue;
      }
      auto lease = co_await pool.acquire();
      if (path == PoolPath::lease_prepared) {
        window.rows += (co_await lease->query_prepared("SELECT 1")).size();
      } else {
        window.rows += (co_await lease->query("SELECT 1")).size();
      }
    }
    window.after = switches_now();
    (void)co_await pool.close(0ms);
  });
  return window;
}

Window pgrt_connection(const std::string& dsn, std::uint64_t queries) {
  asio::io_context io;
  Window window;
  run(io, [&]() -> asio::awaitable<void> {
    // A named ConnectOptions: g++ 12 corrupts a braced temporary in a co_await (see usage.md).
    pgrt::ConnectOptions options{.conninfo = dsn, .application_name = "pgrt-query-cost"};
    auto connection = co_await pgrt::Connection::connect(std::move(options));
    window.rows = (co_await connection.query_prepared("SELECT 1")).size();
    window.before = switches_now();
    for (std::uint64_t i = 0; i < queries; ++i) {
      window.rows += (co_await connection.query_prepared("SELECT 1")).size();
    }
    window.after = switches_now();
    connection.close(pgrt::CloseMode::graceful);
  });
  return window;
}

using PgConn = std::unique_ptr<PGconn, decltype(&PQfinish)>;

PgConn libpq_connect(const std::string& dsn) {
  PgConn conn(PQconnectdb(dsn.c_str()), &PQfinish);
  if (PQstatus(conn.get()) != CONNECTION_OK) {
    throw std::runtime_error(std::string("libpq could not connect: ") + PQerrorMessage(conn.get()));
  }
  PGresult* prepared = PQprepare(conn.get(), "one", "SELECT 1", 0, nullptr);
  const bool ok = PQresultStatus(prepared) == PGRES_COMMAND_OK;
  PQclear(prepared);
  if (!ok) throw std::runtime_error(std::string("PQprepare: ") + PQerrorMessage(conn.get()));
  return conn;
}

// Takes a result's rows; throws if the query failed.
std::uint64_t rows_of(PGresult* result, PGconn* conn) {
  const bool ok = PQresultStatus(result) == PGRES_TUPLES_OK;
  const auto rows = static_cast<std::uint64_t>(PQntuples(result));
  PQclear(result);
  if (!ok) throw std::runtime_error(std::string("SELECT 1 failed: ") + PQerrorMessage(conn));
  return rows;
}

Window libpq_exec(const std::string& dsn, std::uint64_t queries) {
  const PgConn conn = libpq_connect(dsn);
  auto one = [&] {
    return rows_of(PQexecPrepared(conn.get(), "one", 0, nullptr, nullptr, nullptr, 0), conn.get());
  };
  Window window;
  window.rows = one();
  window.before = switches_now();
  for (std::uint64_t i = 0; i < queries; ++i) window.rows += one();
  window.after = switches_now();
  return window;
}

// Waits for the socket with poll(); throws on failure.
void wait_for(PGconn* conn, short events) {
  pollfd descriptor{.fd = PQsocket(conn), .events = events, .revents = 0};
  if (::poll(&descriptor, 1, -1) < 0) throw std::runtime_error("poll failed");
}

Window libpq_send(const std::string& dsn, std::uint64_t queries) {
  const PgConn conn = libpq_connect(dsn);
  if (PQsetnonblocking(conn.get(), 1) != 0) throw std::runtime_error("PQsetnonblocking failed");
  PGconn* raw = conn.get();
  auto one = [raw] {
    if (PQsendQueryPrepared(raw, "one", 0, nullptr, nullptr, nullptr, 0) == 0) {
      throw std::runtime_error(std::string("PQsendQueryPrepared: ") + PQerrorMessage(raw));
    }
    for (int pending = PQflush(raw); pending != 0; pending = PQflush(raw)) {
      if (pending < 0) throw std::runtime_error(std::string("PQflush: ") + PQerrorMessage(raw));
      wait_for(raw, POLLOUT | POLLIN);
      if (PQconsumeInput(raw) == 0) throw std::runtime_error(PQerrorMessage(raw));
    }
    std::uint64_t rows = 0;
    for (;;) {
      while (PQisBusy(raw) != 0) {
        wait_for(raw, POLLIN);
        if (PQconsumeInput(raw) == 0) throw std::runtime_error(PQerrorMessage(raw));
      }
      PGresult* result = PQgetResult(raw);
      if (result == nullptr) return rows;
      rows += rows_of(result, raw);
    }
  };
  Window window;
  window.rows = one();
  window.before = switches_now();
  for (std::uint64_t i = 0; i < queries; ++i) window.rows += one();
  window.after = switches_now();
  return window;
}

int usage(const char* problem) {
  std::cerr << "pgrt_query_cost: " << problem
            << "\nusage: pgrt_query_cost MODE QUERIES\nmodes: " << kModes << '\n';
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return usage("wrong number of arguments");
  const std::string mode = argv[1];
  char* end = nullptr;
  const std::uint64_t queries = std::strtoull(argv[2], &end, 10);
  if (end == argv[2] || *end != '\0' || queries == 0) {
    return usage("QUERIES must be a whole number, at least 1");
  }
  try {
    std::unique_ptr<pgrt::testing::TempCluster> cluster;
    std::string dsn;
    if (const char* url = std::getenv("DATABASE_URL"); url != nullptr && *url != '\0') {
      dsn = url;
    } else {
      cluster = std::make_unique<pgrt::testing::TempCluster>();
      dsn = cluster->dsn();
    }
    Window window;
    if (mode == "pgrt-lease-prepared") {
      window = pgrt_pool(dsn, queries, PoolPath::lease_prepared);
    } else if (mode == "pgrt-lease-unprepared") {
      window = pgrt_pool(dsn, queries, PoolPath::lease_unprepared);
    } else if (mode == "pgrt-connection-prepared") {
      window = pgrt_connection(dsn, queries);
    } else if (mode == "pgrt-shared-query") {
      window = pgrt_pool(dsn, queries, PoolPath::shared);
    } else if (mode == "libpq-exec-prepared") {
      window = libpq_exec(dsn, queries);
    } else if (mode == "libpq-send-prepared") {
      window = libpq_send(dsn, queries);
    } else {
      return usage(("unknown mode " + mode).c_str());
    }
    if (window.rows != queries + 1) {
      std::cerr << "pgrt_query_cost: expected " << queries + 1 << " rows, got " << window.rows
                << '\n';
      return 1;
    }
    std::cout << "{\"mode\": \"" << mode << "\", \"queries\": " << queries
              << ", \"voluntary_switches\": " << window.after.voluntary - window.before.voluntary
              << ", \"involuntary_switches\": "
              << window.after.involuntary - window.before.involuntary
              << ", \"libpq_version\": " << pgrt::libpq_version() << "}" << std::endl;
    return 0;
  } catch (const std::exception& error) {
    std::cerr << "pgrt_query_cost: " << mode << ": " << error.what() << '\n';
    return 1;
  }
}
