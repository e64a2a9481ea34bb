// pgrt's benchmarks (Google Benchmark). Each one runs for a fixed wall-clock window per
// repetition (PGRT_BENCH_SECONDS, default 1; the ctest smoke run uses 0.02) and reports its own
// counters; scripts/bench.sh runs them interleaved with the peers (pgbench, raw libpq in this
// binary, the Python pools) and writes docs/benchmarks.md.
//
// The server: DATABASE_URL (DATABASE_URL_TCP for the TCP variant, else DATABASE_URL), or a
// throwaway cluster started for the run when DATABASE_URL is unset.
#include <algorithm>
#include <array>
#include <atomic>
#include <benchmark/benchmark.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <libpq-fe.h>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <pgrt/db.hpp>
#include <pgrt/testing/fault_proxy.hpp>
#include <pgrt/testing/temp_cluster.hpp>

namespace {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// --- the server ----------------------------------------------------------------------------------

struct Server {
  std::unique_ptr<pgrt::testing::TempCluster> cluster;
  std::string unix_dsn;
  std::string tcp_dsn;
  std::string tls_dsn;  // empty: no TLS rows (DATABASE_URL given without DATABASE_URL_TLS)
};

Server& server() {
  static Server instance = [] {
    Server made;
    const char* url = std::getenv("DATABASE_URL");
    if (url != nullptr && *url != '\0') {
      made.unix_dsn = url;
      const char* tcp = std::getenv("DATABASE_URL_TCP");
      made.tcp_dsn = tcp != nullptr && *tcp != '\0' ? tcp : url;
      const char* tls = std::getenv("DATABASE_URL_TLS");
      made.tls_dsn = tls != nullptr ? tls : "";
    } else {
      made.cluster = std::make_unique<pgrt::testing::TempCluster>(
          pgrt::testing::TempClusterOptions{.tls = true, .tls_only = false});
      made.unix_dsn = made.cluster->dsn();
      made.tcp_dsn = made.cluster->tcp_dsn();
      made.tls_dsn = made.cluster->tls_dsn("verify-full");
    }
    return made;
  }();
  return instance;
}

std::chrono::duration<double> window() {
  const char* text = std::getenv("PGRT_BENCH_SECONDS");
  const double seconds = text != nullptr ? std::strtod(text, nullptr) : 1.0;
  return std::chrono::duration<double>(seconds > 0 ? seconds : 1.0);
}

// The benchmarks' "tcp" argument: 0 the unix socket, 1 plain TCP, 2 TCP with TLS (verify-full).
const std::string& dsn_for(std::int64_t tcp) {
  return tcp == 2 ? server().tls_dsn : tcp == 1 ? server().tcp_dsn : server().unix_dsn;
}

// A TLS row without a TLS server is skipped, saying why.
bool skipped_without_tls(benchmark::State& state) {
  if (state.range(1) != 2 || !server().tls_dsn.empty()) return false;
  state.SkipWithError("no TLS server: set DATABASE_URL_TLS beside DATABASE_URL");
  return true;
}

pgrt::PoolConfig pool_config(std::size_t max_size, std::int64_t tcp = 0) {
  pgrt::PoolConfig config;
  config.conninfo = dsn_for(tcp);
  config.max_size = max_size;
  config.application = "pgrt-bench";
  config.max_waiters = 100'000;
  return config;
}

// Runs a coroutine to completion on its own io_context.
template <typename MakeCoroutine>
void run(asio::io_context& io, MakeCoroutine make) {
  std::exception_ptr failure;
  asio::co_spawn(io, make(), [&failure](std::exception_ptr error) { failure = error; });
  io.run();
  if (failure) std::rethrow_exception(failure);
}

// Opens the three connections of a max-3 pool before a window starts (held at once, released).
asio::awaitable<void> open_three(pgrt::Pool& pool) {
  auto a = co_await pool.acquire();
  auto b = co_await pool.acquire();
  auto c = co_await pool.acquire();
}

// --- a log-linear latency histogram
// ---------------------------------------------------------------

// Buckets of 1/16 of each power of two of nanoseconds: at most ~6% error, no allocation on record.
class Histogram {
 public:
  void record(std::chrono::nanoseconds value) {
    const auto ns = static_cast<std::uint64_t>(std::max<std::int64_t>(value.count(), 1));
    const int power = 63 - __builtin_clzll(ns);
    const int sub = power >= 4 ? static_cast<int>((ns >> (power - 4)) & 15U) : 0;
    ++buckets_[static_cast<std::size_t>(power * 16 + sub)];
    ++count_;
  }
  [[nodiscard]] double percentile_us(double fraction) const {
    if (count_ == 0) return 0;
    const auto wanted =
        static_cast<std::uint64_t>(std::ceil(fraction * static_cast<double>(count_)));
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < buckets_.size(); ++i) {
      seen += buckets_[i];
      if (seen >= wanted) {
        const int power = static_cast<int>(i / 16);
        const int sub = static_cast<int>(i % 16);
        const double low = power >= 4 ? std::ldexp(16.0 + sub, power - 4) : std::ldexp(1.0, power);
        return low / 1000.0;
      }
    }
    return 0;
  }
  [[nodiscard]] std::uint64_t count() const { return count_; }

 private:
  std::array<std::uint64_t, 64 * 16> buckets_{};
  std::uint64_t count_ = 0;
};

void report_latency(benchmark::State& state, const Histogram& histogram, const char* prefix) {
  const std::string name(prefix);
  state.counters[name + "_p50_us"] = histogram.percentile_us(0.50);
  state.counters[name + "_p99_us"] = histogram.percentile_us(0.99);
  state.counters[name + "_p999_us"] = histogram.percentile_us(0.999);
}

asio::awaitable<void> yield() {
  co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
}

// Tasks in flight on one single-threaded io_context. wait() returns once every spawned task has
// ended, and rethrows the first failure (a benchmark whose server went away fails, it does not
// hang). It sleeps on a timer that the last task cancels, so waiting costs no wakeups (polling
// would add timer syscalls to every contestant's numbers).
class InFlight {
 public:
  explicit InFlight(asio::io_context& io) : io_(io), timer_(io, Clock::time_point::max()) {}
  template <typename MakeCoroutine>
  void spawn(MakeCoroutine make) {
    ++count_;
    asio::co_spawn(io_, std::move(make), [this](const std::exception_ptr& error) {
      if (error && !failure_) failure_ = error;
      if (--count_ == 0) timer_.cancel();
    });
  }
  asio::awaitable<void> wait() {
    while (count_ > 0) co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
    if (failure_) std::rethrow_exception(failure_);
  }

 private:
  asio::io_context& io_;
  asio::steady_timer timer_;
  std::size_t count_ = 0;
  std::exception_ptr failure_;
};

// --- the floor: a minimal pool on asio alone
// ----------------------------------------------------

// The least a pool with pgrt's interface can do on asio: `co_await acquire()` returns a move-only
// token for one of `size` slots, under one mutex; a caller that finds none waits in FIFO order and
// is woken by a post of its coroutine when a token comes back. No connections, deadlines, stats,
// events, checks or shutdown safety (a waiter whose io_context is destroyed is leaked). Benchmarks
// 1 and 2 run it in the pool's shapes: what asio's coroutines and scheduler cost on this machine
// before any pool work, the floor under pgrt's rows.
class MinimalPool {
 public:
  class Token {
   public:
    explicit Token(MinimalPool* pool) : pool_(pool) {}
    Token(Token&& other) noexcept : pool_(std::exchange(other.pool_, nullptr)) {}
    Token& operator=(Token&&) = delete;
    ~Token() {
      if (pool_ != nullptr) pool_->give_back();
    }

   private:
    MinimalPool* pool_;
  };

  explicit MinimalPool(std::size_t size) : free_(size) {}

  asio::awaitable<Token> acquire() {
    {
      std::lock_guard lock(mutex_);
      if (free_ > 0) {
        --free_;
        co_return Token(this);
      }
    }
    // Woken with a token handed over by give_back() (free_ was not raised for it).
    co_await asio::async_initiate<const asio::use_awaitable_t<>&, void()>(
        [this](auto handler) {
          std::unique_lock lock(mutex_);
          if (free_ > 0) {  // one came back before this waiter was queued
            --free_;
            lock.unlock();
            Waiter<decltype(handler)>(std::move(handler)).wake();
            return;
          }
          waiters_.push_back(std::make_unique<Waiter<decltype(handler)>>(std::move(handler)));
        },
        asio::use_awaitable);
    co_return Token(this);
  }

 private:
  struct WaiterBase {
    WaiterBase() = default;
    WaiterBase(const WaiterBase&) = delete;
    WaiterBase& operator=(const WaiterBase&) = delete;
    virtual ~WaiterBase() = default;
    virtual void wake() = 0;
  };
  template <typename Handler>
  struct Waiter final : WaiterBase {
    explicit Waiter(Handler woken) : handler(std::move(woken)) {}
    void wake() override {
      const auto executor = asio::get_associated_executor(handler);
      asio::post(executor, std::move(handler));
    }
    Handler handler;
  };

  void give_back() {
    std::unique_ptr<WaiterBase> next;
    {
      std::lock_guard lock(mutex_);
      if (waiters_.empty()) {
        ++free_;
        return;
      }
      next = std::move(waiters_.front());
      waiters_.pop_front();
    }
    next->wake();
  }

  std::mutex mutex_;
  std::size_t free_;
  std::deque<std::unique_ptr<WaiterBase>> waiters_;
};

// --- 1. uncontended acquire + release, no I/O
// -------------------------------------------------------

// Acquire + release of the one idle connection, as often as Google Benchmark asks.
void acquire_release_cycles(benchmark::State& state, bool timings) {
  asio::io_context io;
  auto config = pool_config(1);
  config.timings = timings;
  pgrt::Pool pool(io.get_executor(), config);
  run(io, [&]() -> asio::awaitable<void> {
    { auto warm = co_await pool.acquire(); }  // the connection is open and idle from here
    for (auto _ : state) {
      auto lease = co_await pool.acquire();
      benchmark::DoNotOptimize(lease);
    }
    (void)co_await pool.close(0ms);
  });
  state.SetItemsProcessed(state.iterations());
}

void BM_PoolAcquireReleaseUncontended(benchmark::State& state) {
  acquire_release_cycles(state, true);
}
BENCHMARK(BM_PoolAcquireReleaseUncontended);

// The same with PoolConfig::timings off: the difference is what recording the wait and use time
// histograms costs (two precise clock reads per cycle).
void BM_PoolAcquireReleaseUncontendedUntimed(benchmark::State& state) {
  acquire_release_cycles(state, false);
}
BENCHMARK(BM_PoolAcquireReleaseUncontendedUntimed);

// The floor (MinimalPool above) in the same loop: a co_await that returns a token and its end.
// A timer stays armed, as the pool's upkeep timer is, so the io_context's reactor is in use.
void BM_MinimalPoolAcquireReleaseUncontended(benchmark::State& state) {
  asio::io_context io;
  MinimalPool pool(1);
  asio::steady_timer armed(io, Clock::time_point::max());
  armed.async_wait([](boost::system::error_code) {});
  run(io, [&]() -> asio::awaitable<void> {
    for (auto _ : state) {
      auto token = co_await pool.acquire();
      benchmark::DoNotOptimize(token);
    }
    armed.cancel();
  });
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_MinimalPoolAcquireReleaseUncontended);

// --- 2. contended handoff: W waiters on max 3, each holding its lease across one yield
// ------------

// One window of W waiters on 3 slots; `Contended` is pgrt::Pool (its three connections opened
// first) or MinimalPool (with a timer armed, as the pool's upkeep timer is, so that the
// io_context's reactor is in use in both).
template <typename Contended>
void contended_handoff(benchmark::State& state, asio::io_context& io, Contended& pool) {
  constexpr bool is_pgrt = std::is_same_v<Contended, pgrt::Pool>;
  const auto waiters = static_cast<std::size_t>(state.range(0));
  Histogram waits;
  std::vector<std::uint64_t> completions(waiters, 0);
  double seconds = 0;
  run(io, [&]() -> asio::awaitable<void> {
    asio::steady_timer armed(io, Clock::time_point::max());
    if constexpr (is_pgrt) {
      co_await open_three(pool);
    } else {
      armed.async_wait([](boost::system::error_code) {});
    }
    const auto started = Clock::now();
    const auto until = started + window();
    InFlight running(io);
    for (std::size_t w = 0; w < waiters; ++w) {
      running.spawn([&, w]() -> asio::awaitable<void> {
        while (Clock::now() < until) {
          const auto asked = Clock::now();
          auto lease = co_await pool.acquire();
          waits.record(Clock::now() - asked);
          ++completions[w];
          co_await yield();
        }
      });
    }
    co_await running.wait();
    seconds = std::chrono::duration<double>(Clock::now() - started).count();
    armed.cancel();
    if constexpr (is_pgrt) (void)co_await pool.close(0ms);
  });
  const auto [fewest, most] = std::minmax_element(completions.begin(), completions.end());
  state.counters["acquires_per_s"] = static_cast<double>(waits.count()) / seconds;
  state.counters["fairness_min_over_max"] =
      *most == 0 ? 0.0 : static_cast<double>(*fewest) / static_cast<double>(*most);
  report_latency(state, waits, "wait");
}

void BM_PoolContendedHandoff(benchmark::State& state) {
  for (auto _ : state) {
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(3));
    contended_handoff(state, io, pool);
  }
}
BENCHMARK(BM_PoolContendedHandoff)->Arg(3)->Arg(16)->Arg(64)->Arg(256)->Iterations(1);

// The floor (MinimalPool) in the same shape.
void BM_MinimalPoolContendedHandoff(benchmark::State& state) {
  for (auto _ : state) {
    asio::io_context io;
    MinimalPool pool(3);
    contended_handoff(state, io, pool);
  }
}
BENCHMARK(BM_MinimalPoolContendedHandoff)->Arg(3)->Arg(16)->Arg(64)->Arg(256)->Iterations(1);

// --- 3 and 7. acquire + prepared SELECT 1 + release, over the unix socket or TCP
// --------------------

// Runs `tasks` coroutines doing acquire + prepared SELECT 1 + release on a max-3 pool for the
// window; returns queries per second and records each request's latency.
double select_one_closed_loop(std::size_t tasks, std::int64_t tcp, Histogram& latencies) {
  asio::io_context io;
  pgrt::Pool pool(io.get_executor(), pool_config(3, tcp));
  std::uint64_t queries = 0;
  double seconds = 0;
  run(io, [&]() -> asio::awaitable<void> {
    {
      auto a = co_await pool.acquire();
      auto b = co_await pool.acquire();
      auto c = co_await pool.acquire();
      (void)co_await a->query_prepared("SELECT 1");
      (void)co_await b->query_prepared("SELECT 1");
      (void)co_await c->query_prepared("SELECT 1");
    }
    const auto started = Clock::now();
    const auto until = started + window();
    InFlight running(io);
    for (std::size_t t = 0; t < tasks; ++t) {
      running.spawn([&]() -> asio::awaitable<void> {
        while (Clock::now() < until) {
          const auto begun = Clock::now();
          auto lease = co_await pool.acquire();
          auto result = co_await lease->query_prepared("SELECT 1");
          benchmark::DoNotOptimize(result);
          lease.release();
          latencies.record(Clock::now() - begun);
          ++queries;
        }
      });
    }
    co_await running.wait();
    seconds = std::chrono::duration<double>(Clock::now() - started).count();
    (void)co_await pool.close(0ms);
  });
  return static_cast<double>(queries) / seconds;
}

void BM_PoolSelectOne(benchmark::State& state) {
  if (skipped_without_tls(state)) return;
  const auto tasks = static_cast<std::size_t>(state.range(0));
  const std::int64_t tcp = state.range(1);
  for (auto _ : state) {
    Histogram latencies;
    state.counters["queries_per_s"] = select_one_closed_loop(tasks, tcp, latencies);
    report_latency(state, latencies, "latency");
  }
}
BENCHMARK(BM_PoolSelectOne)
    ->ArgNames({"tasks", "tcp"})
    ->Args({1, 0})
    ->Args({3, 0})
    ->Args({64, 0})
    ->Args({1, 1})
    ->Args({3, 1})
    ->Args({64, 1})
    ->Args({1, 2})
    ->Args({3, 2})
    ->Iterations(1);

// --- 8. statements without a lease: query() on shared connections
// ---------------------------------

// `callers` coroutines each run SELECT 1 in a loop for the window, through Pool::query() (shared)
// or a lease per statement; reports queries per second and their latencies.
// This process's CPU time so far (user, system), in seconds.
std::pair<double, double> process_cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& time) {
    return static_cast<double>(time.tv_sec) + static_cast<double>(time.tv_usec) / 1e6;
  };
  return {seconds(usage.ru_utime), seconds(usage.ru_stime)};
}

// The calling thread's CPU time so far, in seconds.
double thread_cpu_seconds() {
  timespec time{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time);
  return static_cast<double>(time.tv_sec) + static_cast<double>(time.tv_nsec) / 1e9;
}

// The client's CPU per query over a window (the server's backends are other processes):
// `client_cpu_us` per query, and `client_kernel_share` (the part spent in the kernel: syscalls).
void report_client_cpu(benchmark::State& state, std::pair<double, double> before,
                       std::pair<double, double> after, std::uint64_t queries) {
  const double user = after.first - before.first;
  const double system = after.second - before.second;
  if (queries == 0 || user + system <= 0) return;
  state.counters["client_cpu_us"] = (user + system) * 1e6 / static_cast<double>(queries);
  state.counters["client_kernel_share"] = system / (user + system);
}

void select_one_callers(benchmark::State& state, const pgrt::PoolConfig& config,
                        std::size_t callers, bool shared) {
  asio::io_context io;
  pgrt::Pool pool(io.get_executor(), config);
  Histogram latencies;
  std::uint64_t queries = 0;
  double seconds = 0;
  std::pair<double, double> cpu_before;
  std::pair<double, double> cpu_after;
  run(io, [&]() -> asio::awaitable<void> {
    if (shared) {
      (void)co_await pool.query("SELECT 1");  // connected and prepared before the window
    } else {
      co_await open_three(pool);
    }
    cpu_before = process_cpu_seconds();
    const auto started = Clock::now();
    const auto until = started + window();
    InFlight running(io);
    for (std::size_t c = 0; c < callers; ++c) {
      running.spawn([&]() -> asio::awaitable<void> {
        while (Clock::now() < until) {
          const auto begun = Clock::now();
          if (shared) {
            auto result = co_await pool.query("SELECT 1");
            benchmark::DoNotOptimize(result);
          } else {
            auto lease = co_await pool.acquire();
            auto result = co_await lease->query_prepared("SELECT 1");
            benchmark::DoNotOptimize(result);
          }
          latencies.record(Clock::now() - begun);
          ++queries;
        }
      });
    }
    co_await running.wait();
    seconds = std::chrono::duration<double>(Clock::now() - started).count();
    cpu_after = process_cpu_seconds();
    (void)co_await pool.close(0ms);
  });
  state.counters["queries_per_s"] = static_cast<double>(queries) / seconds;
  report_latency(state, latencies, "latency");
  report_client_cpu(state, cpu_before, cpu_after, queries);
}

// SELECT 1 by `callers` coroutines on max 3 connections (unix socket), through Pool::query()
// (shared = 1) or a lease per statement (shared = 0).
void BM_PoolQueryShared(benchmark::State& state) {
  for (auto _ : state) {
    select_one_callers(state, pool_config(3), static_cast<std::size_t>(state.range(0)),
                       state.range(1) != 0);
  }
}
BENCHMARK(BM_PoolQueryShared)
    ->ArgNames({"callers", "shared"})
    ->Args({1, 1})
    ->Args({256, 1})
    ->Args({256, 0})
    ->Iterations(1);

// The same across a slow network: 256 callers on max 3 connections through a TCP proxy that holds
// each chunk 1 ms each way (a database in another zone), by query() (shared = 1) or by a lease per
// statement (shared = 0).
void BM_PoolRemote(benchmark::State& state) {
  for (auto _ : state) {
    const std::string tcp = server().tcp_dsn;
    const std::size_t at = tcp.find("port=");
    const auto port = static_cast<std::uint16_t>(std::stoi(tcp.substr(at + 5)));
    pgrt::testing::FaultProxy proxy("127.0.0.1", port);
    proxy.set_latency(std::chrono::milliseconds(1));
    auto config = pool_config(3, 1);
    config.conninfo = tcp + " " + proxy.conninfo_prefix();  // (the last host and port win)
    select_one_callers(state, config, 256, state.range(0) != 0);
  }
}
BENCHMARK(BM_PoolRemote)->ArgName("shared")->Arg(1)->Arg(0)->Iterations(1);

// The peer: blocking libpq, one thread per connection, PQexecPrepared in a loop.
void BM_RawLibpqSelectOne(benchmark::State& state) {
  if (skipped_without_tls(state)) return;
  const auto connections = static_cast<std::size_t>(state.range(0));
  const std::string conninfo = dsn_for(state.range(1));
  for (auto _ : state) {
    std::atomic<std::uint64_t> queries{0};
    std::atomic<bool> failed{false};
    // The clock starts once every connection is open and its statement prepared, as pgrt's
    // pools are warmed up and pgbench leaves its connection time out.
    std::atomic<std::size_t> ready{0};
    std::atomic<bool> go{false};
    Clock::time_point started;
    Clock::time_point until;
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < connections; ++i) {
      threads.emplace_back([&] {
        PGconn* conn = PQconnectdb(conninfo.c_str());
        PGresult* prepared = PQprepare(conn, "one", "SELECT 1", 0, nullptr);
        if (PQstatus(conn) != CONNECTION_OK || PQresultStatus(prepared) != PGRES_COMMAND_OK) {
          failed = true;
        }
        PQclear(prepared);
        ++ready;
        while (!go) std::this_thread::yield();
        std::uint64_t mine = 0;
        while (!failed && Clock::now() < until) {
          PGresult* result = PQexecPrepared(conn, "one", 0, nullptr, nullptr, nullptr, 0);
          if (PQresultStatus(result) != PGRES_TUPLES_OK) failed = true;
          PQclear(result);
          ++mine;
        }
        queries += mine;
        PQfinish(conn);
      });
    }
    while (ready < connections) std::this_thread::yield();
    started = Clock::now();
    until = started + std::chrono::duration_cast<Clock::duration>(window());
    go = true;
    for (auto& thread : threads) thread.join();
    if (failed) state.SkipWithError("libpq could not connect or query");
    state.counters["queries_per_s"] = static_cast<double>(queries) /
                                      std::chrono::duration<double>(Clock::now() - started).count();
  }
}
BENCHMARK(BM_RawLibpqSelectOne)
    ->ArgNames({"connections", "tcp"})
    ->Args({1, 0})
    ->Args({3, 0})
    ->Args({1, 1})
    ->Args({3, 1})
    ->Args({1, 2})
    ->Args({3, 2})
    ->Iterations(1);

// --- 4. overload: 256 tasks on 3 connections, closed loop and open loop
// ---------------------------

void BM_PoolOverloadClosedLoop(benchmark::State& state) {
  for (auto _ : state) {
    Histogram latencies;
    state.counters["queries_per_s"] = select_one_closed_loop(256, false, latencies);
    report_latency(state, latencies, "latency");
  }
}
BENCHMARK(BM_PoolOverloadClosedLoop)->Iterations(1);

// The closed-loop capacity the open loops offer a share of: scripts/bench.sh passes the one it
// measured in this repetition; alone, a benchmark measures it first.
double closed_loop_capacity() {
  const char* given = std::getenv("PGRT_BENCH_CAPACITY");
  if (given != nullptr && std::strtod(given, nullptr) > 0) return std::strtod(given, nullptr);
  Histogram ignored;
  return select_one_closed_loop(256, false, ignored);
}

// One open-loop request: its latency counts from its intended start. With `served`, the time from
// its delivery to the io_context's thread is recorded there too: the pool's and the server's part.
asio::awaitable<void> one_request(pgrt::Pool& pool, Histogram& latencies,
                                  Clock::time_point intended, Histogram* served = nullptr,
                                  Clock::time_point delivered = {}) {
  auto lease = co_await pool.acquire();
  auto result = co_await lease->query_prepared("SELECT 1");
  benchmark::DoNotOptimize(result);
  lease.release();
  const auto ended = Clock::now();
  latencies.record(ended - intended);
  if (served != nullptr) served->record(ended - delivered);
}

// Requests arrive at a given mean rate (a share of the measured closed-loop capacity), at random
// (Poisson) moments, each with its own coroutine; latency counts from the request's intended start,
// so a stalled pool is not hidden by requests that were never sent (no coordinated omission).
void BM_PoolOverloadOpenLoop(benchmark::State& state) {
  const double share = static_cast<double>(state.range(0)) / 100.0;
  for (auto _ : state) {
    const double capacity = closed_loop_capacity();
    const double rate = capacity * share;
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(3));
    Histogram latencies;
    std::pair<double, double> cpu_before, cpu_after;
    run(io, [&]() -> asio::awaitable<void> {
      co_await open_three(pool);
      const auto started = Clock::now();
      const auto until = started + window();
      // Poisson arrivals (exponential gaps, a fixed seed), as pgbench -R schedules them.
      std::mt19937_64 random(42);
      std::exponential_distribution<double> gap(rate);
      std::chrono::duration<double> offset{0};
      asio::steady_timer pacer(io);
      InFlight requests(io);
      cpu_before = process_cpu_seconds();
      for (;;) {
        offset += std::chrono::duration<double>(gap(random));
        const auto intended = started + std::chrono::duration_cast<Clock::duration>(offset);
        if (intended >= until) break;
        // Arming a timer for every arrival would cost a timerfd_settime each, which this VM makes
        // dear (half a core at 15k/s), and pgbench's poll() timeouts do not pay (they have the
        // kernel's 50 us timer slack). So the pacer sleeps on its timer only for gaps of 50 us or
        // more, and yields to the other coroutines for shorter ones; a request never starts
        // before its intended time.
        if (intended - Clock::now() >= 50us) {
          pacer.expires_at(intended);
          co_await pacer.async_wait(asio::use_awaitable);
        }
        while (Clock::now() < intended) co_await yield();
        requests.spawn([&, intended] { return one_request(pool, latencies, intended); });
      }
      co_await requests.wait();
      cpu_after = process_cpu_seconds();
      (void)co_await pool.close(0ms);
    });
    state.counters["capacity_per_s"] = capacity;
    state.counters["offered_per_s"] = rate;
    report_latency(state, latencies, "latency");
    report_client_cpu(state, cpu_before, cpu_after, latencies.count());
  }
}
// The shares of capacity both open loops are offered (bench.py's OPEN_LOOP_PERCENTS).
void open_loop_shares(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgName("percent_of_capacity")->Arg(25)->Arg(50)->Arg(80)->Arg(95)->Iterations(1);
}
BENCHMARK(BM_PoolOverloadOpenLoop)->Apply(open_loop_shares);

// The same open loop, with the arrivals made the way a network makes them: a thread of its own
// sleeps until each request's intended moment and posts it into the io_context, whose one thread
// runs only the pool and the requests (BM_PoolOverloadOpenLoop's pacer runs on that thread, and
// yields to the requests between arrivals). Side by side, the two tell whether a latency collapse
// belongs to the pool or to the load generator.
void BM_PoolOverloadOpenLoopPosted(benchmark::State& state) {
  const double share = static_cast<double>(state.range(0)) / 100.0;
  for (auto _ : state) {
    const double capacity = closed_loop_capacity();
    const double rate = capacity * share;
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(3));
    Histogram latencies;
    std::pair<double, double> cpu_before,
        cpu_after;  // the whole process: pool, requests, generator
    double generator_cpu = 0;
    // How late each arrival reached the io_context's thread (from its intended start to the moment
    // the thread ran the post that brought it): the generator's and the scheduler's share of a
    // request's latency, before the pool ever saw the request.
    Histogram delivery;
    Histogram served;  // from the delivery to the request's end: the rest of its latency
    std::thread generator;
    const auto join_generator = [&] {
      if (generator.joinable()) generator.join();
    };
    try {
      run(io, [&]() -> asio::awaitable<void> {
        co_await open_three(pool);
        InFlight requests(io);
        asio::steady_timer generated(io, Clock::time_point::max());
        bool done = false;
        const auto started = Clock::now();
        const auto until = started + window();
        cpu_before = process_cpu_seconds();
        generator = std::thread([&, started, until] {
          // A network delivers a request when it comes, not up to 50 us later: the thread's
          // sleeps end on time (the kernel's default timer slack, 50 us, would make every arrival
          // late, and its lateness counts in the request's latency, though no pool could avoid
          // it). pgbench -R's own sleeps keep the default slack: they are part of that client.
          prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
          std::mt19937_64 random(42);  // the same arrivals as BM_PoolOverloadOpenLoop's
          std::exponential_distribution<double> gap(rate);
          std::chrono::duration<double> offset{0};
          const auto next_arrival = [&] {
            offset += std::chrono::duration<double>(gap(random));
            return started + std::chrono::duration_cast<Clock::duration>(offset);
          };
          // The thread sleeps until the next arrival, then posts it together with every later one
          // that is due by the time it woke (a wake-up can still be late on a busy machine): one
          // post and one wake-up per batch, as a network delivers what came meanwhile. Each
          // request's latency still counts from its own intended start.
          auto intended = next_arrival();
          while (intended < until) {
            std::this_thread::sleep_until(intended);
            std::vector<Clock::time_point> due{intended};
            const auto woke = Clock::now();
            while ((intended = next_arrival()) <= woke && intended < until) due.push_back(intended);
            asio::post(io, [&, due = std::move(due)] {
              const auto delivered = Clock::now();
              for (const auto at : due) {
                delivery.record(delivered - at);
                requests.spawn([&, at, delivered] {
                  return one_request(pool, latencies, at, &served, delivered);
                });
              }
            });
          }
          generator_cpu = thread_cpu_seconds();
          asio::post(io, [&] {
            done = true;
            generated.cancel();
          });
        });
        while (!done) co_await generated.async_wait(asio::as_tuple(asio::use_awaitable));
        co_await requests.wait();
        cpu_after = process_cpu_seconds();
        (void)co_await pool.close(0ms);
      });
    } catch (...) {
      join_generator();
      throw;
    }
    join_generator();
    state.counters["capacity_per_s"] = capacity;
    state.counters["offered_per_s"] = rate;
    report_latency(state, latencies, "latency");
    report_latency(state, delivery, "delivery");
    report_latency(state, served, "served");
    report_client_cpu(state, cpu_before, cpu_after, latencies.count());
    if (latencies.count() > 0) {
      state.counters["generator_cpu_us"] =
          generator_cpu * 1e6 / static_cast<double>(latencies.count());
    }
  }
}
// 100% with PGRT_BENCH_CAPACITY set to a rate offers exactly that rate: bench.py's search for the
// sustainable rate.
BENCHMARK(BM_PoolOverloadOpenLoopPosted)->Apply(open_loop_shares)->Arg(100);

// --- 5. a pipelined batch on one lease
// -------------------------------------------------------------

// `depth` SELECT 1 as one pipeline on one lease, in a loop; prepared or unnamed, in one sync
// segment or (sync_each = 1) each in a segment of its own, as query() sends them: the cost of a
// sync per statement on libpq 15, whose PQpipelineSync flushes (one send each).
void BM_PoolPipelinedBatch(benchmark::State& state) {
  const auto depth = static_cast<std::size_t>(state.range(0));
  const bool prepared = state.range(1) != 0;
  const bool sync_each = state.range(2) != 0;
  for (auto _ : state) {
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(1));
    std::uint64_t statements = 0;
    double seconds = 0;
    run(io, [&]() -> asio::awaitable<void> {
      pgrt::Pipeline pipeline;
      pipeline.prepare_statements(prepared);
      for (std::size_t i = 0; i < depth; ++i) {
        pipeline.add("SELECT 1");
        if (sync_each) pipeline.sync();
      }
      auto lease = co_await pool.acquire();
      const auto started = Clock::now();
      const auto until = started + window();
      while (Clock::now() < until) {
        auto outcomes = co_await lease->run(pipeline);
        statements += outcomes.size();
      }
      seconds = std::chrono::duration<double>(Clock::now() - started).count();
      lease.release();
      (void)co_await pool.close(0ms);
    });
    state.counters["statements_per_s"] = static_cast<double>(statements) / seconds;
  }
}
BENCHMARK(BM_PoolPipelinedBatch)
    ->ArgNames({"depth", "prepared", "sync_each"})
    ->Args({10, 1, 0})
    ->Args({100, 1, 0})
    ->Args({10, 0, 0})
    ->Args({100, 0, 0})
    ->Args({100, 1, 1})
    ->Iterations(1);

// --- 6. pending writes
// ------------------------------------------------------------------------------

asio::awaitable<void> recreate_table(pgrt::Pool& pool, const std::string& table) {
  auto lease = co_await pool.acquire();
  co_await lease->execute("DROP TABLE IF EXISTS " + table);
  co_await lease->execute("CREATE UNLOGGED TABLE " + table +
                          " (seq bigint PRIMARY KEY, payload text NOT NULL)");
}

// Rows per second through PendingWrites (COPY batches of 500), 3 producers.
void BM_PendingWritesRows(benchmark::State& state) {
  for (auto _ : state) {
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(3));
    std::uint64_t rows = 0;
    double seconds = 0;
    run(io, [&]() -> asio::awaitable<void> {
      co_await recreate_table(pool, "bench_pending");
      pgrt::PendingWrites writes(pool, io.get_executor());
      co_await writes.start();
      auto table = writes.table<std::int64_t, std::string>("bench_pending", {"seq", "payload"});
      const auto started = Clock::now();
      const auto until = started + window();
      std::int64_t next = 0;
      InFlight running(io);
      for (int producer = 0; producer < 3; ++producer) {
        running.spawn([&]() -> asio::awaitable<void> {
          const std::string payload = "a pending write of about forty bytes....";
          while (Clock::now() < until) co_await table.append(++next, payload);
        });
      }
      co_await running.wait();
      co_await writes.stop();  // everything accepted is flushed
      seconds = std::chrono::duration<double>(Clock::now() - started).count();
      rows = writes.report().flushed;
      (void)co_await pool.close(0ms);
    });
    state.counters["rows_per_s"] = static_cast<double>(rows) / seconds;
  }
}
BENCHMARK(BM_PendingWritesRows)->Iterations(1);

// The peer: single-row autocommit INSERTs through the pool, 3 tasks.
void BM_AutocommitInsertRows(benchmark::State& state) {
  for (auto _ : state) {
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(3));
    std::uint64_t rows = 0;
    double seconds = 0;
    run(io, [&]() -> asio::awaitable<void> {
      co_await recreate_table(pool, "bench_autocommit");
      const auto started = Clock::now();
      const auto until = started + window();
      std::int64_t next = 0;
      InFlight running(io);
      for (int task = 0; task < 3; ++task) {
        running.spawn([&]() -> asio::awaitable<void> {
          const std::string payload = "a pending write of about forty bytes....";
          while (Clock::now() < until) {
            auto lease = co_await pool.acquire();
            (void)co_await lease->query_prepared(
                "INSERT INTO bench_autocommit (seq, payload) VALUES ($1, $2)", ++next, payload);
            ++rows;
          }
        });
      }
      co_await running.wait();
      seconds = std::chrono::duration<double>(Clock::now() - started).count();
      (void)co_await pool.close(0ms);
    });
    state.counters["rows_per_s"] = static_cast<double>(rows) / seconds;
  }
}
BENCHMARK(BM_AutocommitInsertRows)->Iterations(1);

// How long stop() takes with 10,000 writes pending (none flushed before it).
void BM_PendingWritesShutdown(benchmark::State& state) {
  for (auto _ : state) {
    asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pool_config(3));
    double stop_ms = 0;
    std::uint64_t flushed = 0;
    run(io, [&]() -> asio::awaitable<void> {
      co_await recreate_table(pool, "bench_shutdown");
      pgrt::PendingWritesConfig config;
      config.batch_size = 10'000;
      config.flush_interval = std::chrono::hours(1);
      pgrt::PendingWrites writes(pool, io.get_executor(), config);
      co_await writes.start();
      auto table = writes.table<std::int64_t, std::string>("bench_shutdown", {"seq", "payload"});
      const std::string payload = "a pending write of about forty bytes....";
      for (std::int64_t seq = 1; seq <= 10'000; ++seq) co_await table.append(seq, payload);
      const auto stopping = Clock::now();
      co_await writes.stop();
      stop_ms = std::chrono::duration<double, std::milli>(Clock::now() - stopping).count();
      flushed = writes.report().flushed;
      (void)co_await pool.close(0ms);
    });
    state.counters["stop_ms"] = stop_ms;
    state.counters["flushed"] = static_cast<double>(flushed);
  }
}
BENCHMARK(BM_PendingWritesShutdown)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();
