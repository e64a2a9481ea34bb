// What one statement asks of the heap, counted: a guard on the query path's allocations.
//
// docs/performance.md says that a prepared statement, through a lease or on a Connection, makes
// no heap allocation of pgrt's own: its coroutine frames come from asio's per-thread recycling
// cache. That holds only while every frame stays small enough for the cache (a frame that grows
// past it costs a malloc and a free per statement, and no test fails). This binary replaces the
// global operator new and aligned_alloc (asio's frames) and counts their calls over a run of
// statements; it also makes them fail on demand, to test a path that must survive running out of
// memory. libpq's own allocations go through malloc and are not counted: they are the same
// with or without pgrt. Pool::query() (no lease) allocates by design (the statement shared with the
// connection's coroutine); its guard runs in optimized builds only, since in a Debug build (CI's)
// its larger frames outgrow asio's cache; scripts/query-cost.sh counts it in a release build.
#include <atomic>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <iostream>
#include <malloc.h>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <pgrt/db.hpp>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"
#include "pgrt/testing/fault_proxy.hpp"
#include "pgrt/testing/run_coroutine.hpp"
#include "pool/driver.hpp"
#include "pool/multiplexer.hpp"

namespace {
std::atomic<bool> counting{false};
std::atomic<std::size_t> allocations{0};
// While set, every allocation of this thread fails (operator new throws std::bad_alloc; the
// others return null), as when memory runs out.
thread_local bool out_of_memory = false;
// The next this many allocations of this thread fail, as above.
thread_local int failing_allocations = 0;
// The next allocations of this thread, one per bit from the lowest, until no bit is left: those of
// a set bit fail, as above (0b101: the next fails, the one after succeeds, the third fails).
thread_local unsigned failing_pattern = 0;

bool runs_out() {
  if (out_of_memory) return true;
  if (failing_pattern != 0) {
    const bool fails = (failing_pattern & 1U) != 0;
    failing_pattern >>= 1U;
    return fails;
  }
  if (failing_allocations == 0) return false;
  --failing_allocations;
  return true;
}

void count_one() {
  if (!counting.load(std::memory_order_relaxed)) return;
  allocations.fetch_add(1, std::memory_order_relaxed);
}

void* allocate(std::size_t size) {
  if (runs_out()) throw std::bad_alloc();
  count_one();
  if (void* block = std::malloc(size == 0 ? 1 : size)) return block;
  throw std::bad_alloc();
}

void* allocate_aligned(std::size_t size, std::align_val_t alignment) {
  if (runs_out()) throw std::bad_alloc();
  count_one();
  // memalign, not aligned_alloc: the latter is replaced below (and counted once).
  if (void* block = ::memalign(static_cast<std::size_t>(alignment), size == 0 ? 1 : size)) {
    return block;
  }
  throw std::bad_alloc();
}
}  // namespace

// asio allocates coroutine frames its cache cannot hold with std::aligned_alloc. A definition in
// the executable takes the place of glibc's (and of a sanitizer's) for every caller.
extern "C" void* aligned_alloc(std::size_t alignment, std::size_t size) {
  if (runs_out()) return nullptr;
  count_one();
  return ::memalign(alignment, size);
}

void* operator new(std::size_t size) {
  return allocate(size);
}
void* operator new[](std::size_t size) {
  return allocate(size);
}
void* operator new(std::size_t size, std::align_val_t alignment) {
  return allocate_aligned(size, alignment);
}
void* operator new[](std::size_t size, std::align_val_t alignment) {
  return allocate_aligned(size, alignment);
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  if (runs_out()) return nullptr;
  count_one();
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  if (runs_out()) return nullptr;
  count_one();
  return std::malloc(size == 0 ? 1 : size);
}
void operator delete(void* block) noexcept {
  std::free(block);
}
void operator delete[](void* block) noexcept {
  std::free(block);
}
void operator delete(void* block, std::size_t) noexcept {
  std::free(block);
}
void operator delete[](void* block, std::size_t) noexcept {
  std::free(block);
}
void operator delete(void* block, std::align_val_t) noexcept {
  std::free(block);
}
void operator delete[](void* block, std::align_val_t) noexcept {
  std::free(block);
}
void operator delete(void* block, std::size_t, std::align_val_t) noexcept {
  std::free(block);
}
void operator delete[](void* block, std::size_t, std::align_val_t) noexcept {
  std::free(block);
}

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::run_coroutine;

constexpr int warm_up_statements = 200;
constexpr int counted_statements = 2000;

// Counts the allocations made between start() and per_statement(), across threads. Each test
// runs its warm-up statements and then the counted ones in one loop, starting the count between
// them. The statements are run inline in the test's coroutine, as a service's handler runs them: a
// coroutine of the test's own per statement would be a third frame alive beside the statement's
// two, more than asio's frame cache holds (two blocks per thread), and would allocate by itself.
struct AllocationCount {
  void start() {
    allocations = 0;
    counting = true;
  }
  double per_statement() {
    counting = false;
    return static_cast<double>(allocations.load()) / counted_statements;
  }
};

class AllocationTest : public testing::DbTest {
 protected:
  static PoolConfig pool_of_one() {
    PoolConfig config;
    config.conninfo = cluster().dsn();
    config.max_size = 1;
    config.application = "pgrt-allocations";
    return config;
  }
};

// Time-driven work (the pool's upkeep tick) may allocate now and then; a statement that
// allocates does so every time. Below this, no statement allocates.
constexpr double at_most_now_and_then = 0.02;

TEST_F(AllocationTest, TheCounterSeesAnAllocationOfEachKind) {
  allocations = 0;
  counting = true;
  delete new int(1);
  ::operator delete (::operator new (64, std::align_val_t{64}), std::align_val_t{64});
  void* frame_like = std::aligned_alloc(64, 2048);
  counting = false;
  std::free(frame_like);
  EXPECT_EQ(allocations.load(), 3u);
}

TEST_F(AllocationTest, APreparedStatementOnAConnectionAllocatesNothingOfPgrts) {
  const double per_statement = run_coroutine([]() -> asio::awaitable<double> {
    ConnectOptions options;  // not a braced temporary in the co_await: g++ 12 frees it twice
    options.conninfo = cluster().dsn();
    Connection connection = co_await Connection::connect(options);
    std::size_t rows = 0;
    AllocationCount count;
    for (int i = 0; i < warm_up_statements + counted_statements; ++i) {
      if (i == warm_up_statements) count.start();
      rows += (co_await connection.query_prepared("SELECT 1")).size();
    }
    const double measured = count.per_statement();
    EXPECT_EQ(rows, std::size_t{warm_up_statements + counted_statements});
    co_return measured;
  });
  EXPECT_LE(per_statement, at_most_now_and_then)
      << "a prepared statement on a Connection allocated (a coroutine frame grown past asio's "
         "recycling cache?): docs/performance.md, scripts/query-cost.sh";
}

TEST_F(AllocationTest, APreparedStatementThroughALeaseAllocatesNothingOfPgrts) {
  const double per_statement = run_coroutine([]() -> asio::awaitable<double> {
    Pool pool(co_await asio::this_coro::executor, pool_of_one());
    std::size_t rows = 0;
    AllocationCount count;
    for (int i = 0; i < warm_up_statements + counted_statements; ++i) {
      if (i == warm_up_statements) count.start();
      auto lease = co_await pool.acquire();
      rows += (co_await lease->query_prepared("SELECT 1")).size();
    }
    const double measured = count.per_statement();
    EXPECT_EQ(rows, std::size_t{warm_up_statements + counted_statements});
    (void)co_await pool.close(1s);
    co_return measured;
  });
  EXPECT_LE(per_statement, at_most_now_and_then)
      << "acquire + prepared statement + release allocated: docs/performance.md";
}

// Pool::query() by a lone caller allocates by design: the statement it shares with the
// connection's coroutine (SharedStatement), and about one block of asio's where its per-thread
// cache (two blocks) is full: 2.0 per statement in this test's release build. Until the
// connection kept its sent statements in a ring that keeps its capacity and their prepared names
// inline (multiplexer.cpp: SentQueue, EntryName), it also copied the name to the heap (one per
// statement) and its std::deque of sent statements allocated a block every four: 3.25. A frame
// past asio's cache adds an aligned allocation per statement (run_shared() held the text and
// parameters by value until 4e22fa3). Optimized builds only: without optimization (CI's
// sanitizer builds) the frames are larger.
TEST_F(AllocationTest, AQueryByALoneCallerAllocatesNoMoreThanItsShare) {
#if !defined(__OPTIMIZE__) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "coroutine frames have their release size only in an optimized build without "
                  "sanitizers (PGRT_PRESET=release scripts/test.sh)";
#endif
  const double per_statement = run_coroutine([]() -> asio::awaitable<double> {
    Pool pool(co_await asio::this_coro::executor, pool_of_one());
    std::size_t rows = 0;
    AllocationCount count;
    for (int i = 0; i < warm_up_statements + counted_statements; ++i) {
      if (i == warm_up_statements) count.start();
      rows += (co_await pool.query("SELECT 1")).size();
    }
    const double measured = count.per_statement();
    EXPECT_EQ(rows, std::size_t{warm_up_statements + counted_statements});
    (void)co_await pool.close(1s);
    co_return measured;
  });
  std::cout << "query() by a lone caller: " << per_statement << " allocations per statement\n";
  EXPECT_LE(per_statement, 2.1)
      << "a lone query() allocated more than before (the prepared name copied, a block for the "
         "sent statements, a coroutine frame grown past asio's recycling cache?): "
         "docs/performance.md, scripts/query-cost.sh";
  // Its own statement at least: fewer means the count missed the counted loop.
  EXPECT_GE(per_statement, 1.0);
}

// Pool::query() by many callers at once: 256 on 3 connections, so that each connection's pipeline
// is full and every read answers dozens of callers. Each caller's statements are counted from the
// moment every caller has run its warm-up ones until the first caller is done. 2.95 per statement
// in this test's release build: each caller's statement (SharedStatement), and asio's blocks where
// its per-thread cache (two blocks) is full, mostly the posted resumptions of the callers a read
// answers at once but the first. Before, 4.2: each statement's prepared name was also copied to
// the heap, and the connection's std::deque of sent statements allocated a block every four. With
// the name's copy back it is 3.9 or more (the deque's blocks: the lone caller's test above).
TEST_F(AllocationTest, QueriesByManyCallersOnAFewConnectionsAllocateNoMoreThanTheirShare) {
#if !defined(__OPTIMIZE__) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "coroutine frames have their release size only in an optimized build without "
                  "sanitizers (PGRT_PRESET=release scripts/test.sh)";
#endif
  constexpr int callers = 256;
  constexpr int warm_up_each = 20;
  constexpr int counted_each = 100;
  struct Run {
    int warmed = 0;
    int finished = 0;
    std::size_t counted = 0;  // statements answered while counting
    std::size_t rows = 0;
    std::size_t allocations_seen = 0;
    std::size_t statements_seen = 0;
    int failures = 0;
  };
  const Run outcome = run_coroutine([]() -> asio::awaitable<Run> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.max_size = 3;
    Pool pool(executor, config);
    Run run;
    for (int caller = 0; caller < callers; ++caller) {
      asio::co_spawn(
          executor,
          [&]() -> asio::awaitable<void> {
            try {
              for (int i = 0; i < warm_up_each + counted_each; ++i) {
                if (i == warm_up_each && ++run.warmed == callers) AllocationCount{}.start();
                run.rows += (co_await pool.query("SELECT 1")).size();
                if (counting.load()) ++run.counted;
              }
            } catch (const std::exception&) {
              ++run.failures;
            }
            if (counting.exchange(false)) {  // the first caller done ends the count
              run.allocations_seen = allocations.load();
              run.statements_seen = run.counted;
            }
            ++run.finished;
          },
          asio::detached);
    }
    const auto started = std::chrono::steady_clock::now();
    while (run.finished < callers && std::chrono::steady_clock::now() - started < 30s) {
      co_await testing::sleep_for(10ms);
    }
    (void)co_await pool.close(1s);
    co_return run;
  });
  ASSERT_EQ(outcome.finished, callers);
  EXPECT_EQ(outcome.failures, 0);
  EXPECT_EQ(outcome.rows, std::size_t{callers} * (warm_up_each + counted_each));
  // Most of the callers' counted statements ran while counting.
  ASSERT_GE(outcome.statements_seen, std::size_t{callers} * counted_each / 2);
  const double per_statement =
      static_cast<double>(outcome.allocations_seen) / static_cast<double>(outcome.statements_seen);
  std::cout << "query() by " << callers << " callers on 3 connections: " << per_statement
            << " allocations per statement over " << outcome.statements_seen << " statements\n";
  EXPECT_LE(per_statement, 3.3)
      << "query() by many callers allocated more than before (the prepared name copied, blocks "
         "for the sent statements?): docs/performance.md";
  EXPECT_GE(per_statement, 1.0);  // (its own statement at least)
}

// Pool::query()'s multiplexer closed while memory runs out (every allocation of the closing
// thread fails): its close() throws nothing and fails every queued statement with pool_closed,
// each caller told so once it runs (its message built on its side). Before, close() built each
// statement's message itself: the first allocation that failed threw out of close() (out of
// Pool::close(), or of close_now(), from an io_context's handler), leaving the pool marked closed
// with the rest of the queue unfailed: those statements waited on for their acquire_timeout.
TEST_F(AllocationTest, AQueryMultiplexerClosingWhileMemoryRunsOutFailsEveryQueuedStatement) {
  run_coroutine([]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.acquire_timeout = 20s;
    Pool pool(executor, config);
    auto lease = co_await pool.acquire();  // the statements' borrow waits for it
    constexpr int callers = 3;
    std::vector<boost::system::error_code> codes;
    std::vector<std::string> messages;
    for (int caller = 0; caller < callers; ++caller) {
      asio::co_spawn(
          executor,
          [&]() -> asio::awaitable<void> {
            boost::system::error_code code;
            std::string message;
            try {
              (void)co_await pool.query("SELECT 1");
            } catch (const Error& error) {
              code = error.code();
              message = error.what();
            }
            codes.push_back(code);
            messages.push_back(message);
          },
          asio::detached);
    }
    while (pool.stats().shared_queued < callers) co_await testing::sleep_for(10ms);
    std::shared_ptr<detail::Multiplexer> multiplexer;
    {
      const auto state = detail::pool_state_of(pool).lock();
      const std::lock_guard lock(state->mutex);
      multiplexer = state->multiplexer;
    }
    bool threw = false;
    out_of_memory = true;
    try {
      multiplexer->close();
    } catch (...) {
      threw = true;
    }
    out_of_memory = false;
    EXPECT_FALSE(threw) << "the multiplexer's close() threw when out of memory";
    lease.release();
    const auto started = std::chrono::steady_clock::now();
    (void)co_await pool.close(5s);
    while (codes.size() < callers && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_LT(std::chrono::steady_clock::now() - started, 2s)
        << "the queued statements waited on after the close";
    EXPECT_EQ(codes.size(), std::size_t{callers});
    for (std::size_t caller = 0; caller < codes.size(); ++caller) {
      EXPECT_EQ(codes[caller], client_errc::pool_closed) << messages[caller];
      EXPECT_NE(messages[caller].find("the pool closed before the statement was sent"),
                std::string::npos)
          << messages[caller];
      EXPECT_NE(messages[caller].find("SELECT 1"), std::string::npos) << messages[caller];
    }
  });
}

// The same, with one caller cancelled while its statement, failed by the close, still waits for
// the resumption the close could not post: that caller is answered by its cancellation (with
// pool_closed: its statement was done), leaves the multiplexer's list of callers to answer, and
// is not answered twice when the others are.
TEST_F(AllocationTest,
       AQueryCallerCancelledWhileItsClosedStatementWaitsToBeAnsweredIsAnsweredOnce) {
  run_coroutine([]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.acquire_timeout = 20s;
    Pool pool(executor, config);
    auto lease = co_await pool.acquire();
    constexpr int callers = 3;
    std::vector<asio::cancellation_signal> signals(callers);
    std::vector<int> answers(callers, 0);
    std::vector<boost::system::error_code> codes(callers);
    for (int caller = 0; caller < callers; ++caller) {
      asio::co_spawn(
          executor,
          [&, caller]() -> asio::awaitable<void> {
            try {
              (void)co_await pool.query("SELECT 1");
            } catch (const Error& error) {
              codes[static_cast<std::size_t>(caller)] = error.code();
            }
            ++answers[static_cast<std::size_t>(caller)];
          },
          asio::bind_cancellation_slot(signals[static_cast<std::size_t>(caller)].slot(),
                                       asio::detached));
    }
    while (pool.stats().shared_queued < callers) co_await testing::sleep_for(10ms);
    std::shared_ptr<detail::Multiplexer> multiplexer;
    {
      const auto state = detail::pool_state_of(pool).lock();
      const std::lock_guard lock(state->mutex);
      multiplexer = state->multiplexer;
    }
    out_of_memory = true;
    try {
      multiplexer->close();
    } catch (...) {
      ADD_FAILURE() << "the multiplexer's close() threw when out of memory";
    }
    out_of_memory = false;
    signals[1].emit(asio::cancellation_type::terminal);
    const auto started = std::chrono::steady_clock::now();
    while (answers[1] == 0 && std::chrono::steady_clock::now() - started < 2s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_EQ(answers[1], 1) << "the cancelled caller was not answered";
    EXPECT_EQ(codes[1], client_errc::pool_closed);
    {
      const std::lock_guard lock(multiplexer->mutex);
      EXPECT_LE(multiplexer->unanswered.size(), std::size_t{callers - 1});
    }
    lease.release();
    (void)co_await pool.close(5s);
    while ((answers[0] == 0 || answers[2] == 0) &&
           std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    co_await testing::sleep_for(50ms);  // (an answer twice would come by now)
    for (std::size_t caller = 0; caller < callers; ++caller) {
      EXPECT_EQ(answers[caller], 1) << "caller " << caller;
      EXPECT_EQ(codes[caller], client_errc::pool_closed) << "caller " << caller;
    }
    const std::lock_guard lock(multiplexer->mutex);
    EXPECT_TRUE(multiplexer->unanswered.empty());
  });
}

// The multiplexer's handle on a query() caller's statement: the first statement the test's pool
// queued (it has one connection, leased by the test, so the statement stays queued).
std::shared_ptr<detail::Multiplexer> multiplexer_of(Pool& pool) {
  const auto state = detail::pool_state_of(pool).lock();
  const std::lock_guard lock(state->mutex);
  return state->multiplexer;
}

// A query() caller answered by a connection (resumed in place: it runs on the connections' own
// io_context) while memory runs out: the connection keeps it among those it resumes once the
// mutex is released (Multiplexer::finish_locked() with `answered`), and the push there fails. The
// caller is answered all the same. Before, its wait was taken out of the statement before the
// push, and destroyed with the push's throw: the caller's coroutine was unwound, never resumed
// (a co_await pool.query() that never returned, with no error), and the connection's coroutine
// got the std::bad_alloc. Here the test does the connection's part on a statement it takes from
// the queue, as the connection does once the statement is answered.
TEST_F(AllocationTest, AQueryCallerAnsweredWhileMemoryRunsOutIsResumed) {
  run_coroutine([]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.acquire_timeout = 20s;
    Pool pool(executor, config);
    auto lease = co_await pool.acquire();  // the statement stays queued
    bool answered = false;
    boost::system::error_code code;
    std::string message;
    asio::co_spawn(
        executor,
        [&]() -> asio::awaitable<void> {
          try {
            (void)co_await pool.query("SELECT 1");
          } catch (const Error& error) {
            code = error.code();
            message = error.what();
          }
          answered = true;
        },
        asio::detached);
    const auto started = std::chrono::steady_clock::now();
    while (pool.stats().shared_queued < 1 && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(5ms);
    }
    const std::shared_ptr<detail::Multiplexer> multiplexer = multiplexer_of(pool);
    EXPECT_TRUE(multiplexer) << "the statement was never queued";
    if (!multiplexer) co_return;
    std::string thrown;
    std::vector<detail::async::ParkedWait> to_resume;
    {
      const std::lock_guard lock(multiplexer->mutex);
      EXPECT_FALSE(multiplexer->queue.empty());
      if (multiplexer->queue.empty()) co_return;
      const std::shared_ptr<detail::SharedStatement> statement = multiplexer->queue.pop_front();
      EXPECT_TRUE(statement->wait.resumable_in_place);
      statement->error = make_error_code(client_errc::timeout);
      statement->diagnostics = Diagnostics{.message = "answered by the test"};
      failing_allocations = 1;
      try {
        multiplexer->finish_locked(*statement, to_resume);
      } catch (const std::exception& error) {
        thrown = error.what();
      }
      failing_allocations = 0;
    }
    multiplexer->answer(to_resume);
    EXPECT_EQ(thrown, "") << "finish_locked() threw when out of memory";
    while (!answered && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_TRUE(answered) << "the caller was never resumed";
    EXPECT_EQ(code, client_errc::timeout) << message;
    EXPECT_THAT(message, ::testing::HasSubstr("answered by the test"));
    lease.release();
    (void)co_await pool.close(1s);
  });
}

// The multiplexer's sweeper (it fails a statement sent behind another caller's on its connection
// that has not ended within acquire_timeout, and a statement queued that long) could not be armed
// for want of memory: it is not believed armed, and the next statement's wait arms it. Before,
// it was marked armed before its wait began: with the wait's allocation failed, it was believed
// armed for good and never armed again, and no deadline was enforced: here the statement sent
// behind a slow one waited for it (answered when that one ended, 1.1 s later, not failed with
// timeout after 300 ms).
TEST_F(AllocationTest, AQuerySweeperThatCouldNotBeArmedIsArmedByTheNextStatement) {
  run_coroutine([]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.acquire_timeout = 300ms;
    Pool pool(executor, config);
    std::vector<boost::system::error_code> codes(2);
    std::vector<bool> answered(2, false);
    const auto spawn_query = [&](std::size_t caller, std::string sql) {
      asio::co_spawn(
          executor,
          [&, caller, sql]() -> asio::awaitable<void> {
            try {
              (void)co_await pool.query(sql);
            } catch (const Error& error) {
              codes[caller] = error.code();
            }
            answered[caller] = true;
          },
          asio::detached);
    };
    spawn_query(0, "SELECT pg_sleep(1.5)");
    const auto started = std::chrono::steady_clock::now();
    // Sent, and past its own deadline: the sweeper fired for it (a head runs: it is not failed).
    while (
        (pool.stats().shared_in_flight < 1 || std::chrono::steady_clock::now() - started < 400ms) &&
        std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    const std::shared_ptr<detail::Multiplexer> multiplexer = multiplexer_of(pool);
    EXPECT_TRUE(multiplexer) << "the statement was never queued";
    if (!multiplexer) co_return;
    // Armed (as sweep() and a statement's wait do) from a thread of its own, where asio has no
    // cache of recycled blocks and every allocation fails: the wait cannot begin.
    bool threw = false;
    bool believed_armed = false;
    std::thread arming([&] {
      const std::lock_guard lock(multiplexer->mutex);
      out_of_memory = true;
      try {
        multiplexer->arm_sweeper_locked(std::chrono::steady_clock::now() + 50ms);
      } catch (const std::bad_alloc&) {
        threw = true;
      }
      out_of_memory = false;
      believed_armed = multiplexer->sweeper_armed;
    });
    arming.join();
    EXPECT_TRUE(threw) << "the sweeper's wait did not run out of memory";
    EXPECT_FALSE(believed_armed) << "the sweeper is believed armed, with no wait under way";
    const auto second = std::chrono::steady_clock::now();
    spawn_query(1, "SELECT 1");  // sent behind the slow one
    while (!answered[1] && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_EQ(codes[1], client_errc::timeout) << "the statement held up was not failed in time";
    EXPECT_LT(std::chrono::steady_clock::now() - second, 1s);
    while (!answered[0] && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_TRUE(answered[0]);
    (void)co_await pool.close(5s);
  });
}

// A query() statement queued while memory runs out, as a connection waits for its socket with a
// statement in flight: the wake that would make the connection take the new statement cannot be
// posted. The statement leaves the queue, and its caller gets the std::bad_alloc. Before, it stayed
// queued, its caller told it had failed (run_shared() passed the throw on), and ran later all the
// same (a caller that retried ran it twice); the connection was also marked woken, with no wake
// under way, so no other wake reached it until its socket's next answer. Here the test does the
// caller's part (Multiplexer::enqueue_locked(), as run_shared() calls it) from a thread of its
// own, where asio has no cache of recycled blocks and every allocation fails.
// With max_size 2, the connection has no room under its even share (the pool may lend one more):
// the borrow of one more is what cannot be posted, with the same outcome.
TEST_F(AllocationTest, AQueryStatementWhoseWakeCannotBePostedIsNotLeftQueued) {
  for (const std::size_t max_size : {1, 2}) {
    SCOPED_TRACE("max_size " + std::to_string(max_size));
    run_coroutine([max_size]() -> asio::awaitable<void> {
      auto executor = co_await asio::this_coro::executor;
      PoolConfig config = pool_of_one();
      config.max_size = max_size;
      config.acquire_timeout = 0ms;  // (no deadline: the sweeper is not armed for the statement)
      Pool pool(executor, config);
      bool answered = false;
      asio::co_spawn(
          executor,
          [&]() -> asio::awaitable<void> {
            const Result result = co_await pool.query("SELECT 1 FROM pg_sleep(0.3)");
            answered = result.size() == 1;
          },
          asio::detached);
      std::shared_ptr<detail::Multiplexer> multiplexer;
      const auto waiting = [&multiplexer] {
        if (!multiplexer) return false;
        const std::lock_guard lock(multiplexer->mutex);
        return multiplexer->links.size() == 1 && multiplexer->links.front()->waiting;
      };
      const auto started = std::chrono::steady_clock::now();
      while (!waiting() && std::chrono::steady_clock::now() - started < 5s) {
        co_await testing::sleep_for(5ms);
        if (!multiplexer) multiplexer = multiplexer_of(pool);
      }
      EXPECT_TRUE(waiting()) << "no query() connection waited for its statement's answer";
      if (!waiting()) co_return;
      auto statement = std::make_shared<detail::SharedStatement>("SELECT 2", ParamSink{});
      std::string thrown;
      bool queued = false;
      bool marked_woken = false;
      std::thread caller([&] {
        const std::lock_guard lock(multiplexer->mutex);
        out_of_memory = true;
        try {
          multiplexer->enqueue_locked(statement);
        } catch (const std::bad_alloc& error) {
          thrown = error.what();
        }
        out_of_memory = false;
        queued = !multiplexer->queue.empty();
        marked_woken = multiplexer->links.front()->wake_posted;
      });
      caller.join();
      EXPECT_NE(thrown, "") << "the wake was posted (memory did not run out)";
      EXPECT_FALSE(queued) << "the statement stayed queued, its caller told it had failed";
      EXPECT_FALSE(marked_woken) << "the connection is marked woken, with no wake under way";
      while (!answered && std::chrono::steady_clock::now() - started < 5s) {
        co_await testing::sleep_for(10ms);
      }
      EXPECT_TRUE(answered) << "the statement in flight was not answered";
      (void)co_await pool.close(1s);
    });
  }
}

// Writes in flight when the pending writes' flusher fails (here: it runs out of memory as it
// backs off from a transient error, the pool's connects all failing) are counted as failed, and
// were logged by their count only: events().failed never announced them, and a subscriber missed
// them. Every write given up on is announced, those in flight as the others.
TEST_F(AllocationTest, WritesInFlightWhenTheFlusherFailsAreAnnouncedThroughEventsFailed) {
  std::size_t announced = 0;
  std::vector<std::string> announced_writes;
  bool armed = false;
  PendingWritesReport end{};
  run_coroutine([&]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.connect.session_settings = {{"statement_timeout", "soon"}};  // every connect fails
    config.acquire_timeout = 100ms;
    Pool pool(executor, config);
    PendingWrites writes(
        pool, executor,
        PendingWritesConfig{.name = "flusher-fails", .batch_size = 2, .flush_interval = 0ms});
    boost::signals2::scoped_connection on_failed =
        writes.events().failed.connect([&](const std::vector<std::string>& lost, const Error&) {
          announced += lost.size();
          announced_writes.insert(announced_writes.end(), lost.begin(), lost.end());
        });
    boost::signals2::scoped_connection on_retrying =
        writes.events().retrying.connect([&](std::size_t, const Error&, std::chrono::milliseconds) {
          if (armed) return;
          armed = true;
          failing_allocations = 1;  // the flusher's next allocation, as it backs off
        });
    for (std::int64_t seq = 0; seq < 3; ++seq) {  // a batch of 2 in flight, 1 queued
      co_await writes.enqueue("INSERT INTO nowhere (seq) VALUES ($1)", seq);
    }
    co_await writes.start();
    const auto started = std::chrono::steady_clock::now();
    while (writes.report().failed < 3 && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    try {
      co_await with_timeout(writes.stop(), 5s);
    } catch (const Error&) {  // (writes_failed)
    }
    end = writes.report();
    (void)co_await pool.close(1s);
  });
  failing_allocations = 0;
  ASSERT_TRUE(armed) << "the batch was never retried";
  EXPECT_EQ(end.failed, 3U) << "the flusher did not fail when out of memory";
  EXPECT_EQ(end.pending, 0U);
  EXPECT_EQ(announced, end.failed)
      << "writes the flusher had in flight when it failed were not announced";
  for (const auto& write : announced_writes) {
    EXPECT_NE(write.find("INSERT INTO nowhere"), std::string::npos) << write;
  }
}

// An enqueue() waiting for room, whose write cannot be queued when room comes (the queue's
// push_back runs out of memory as the flusher settles the batch before it): its caller gets the
// std::bad_alloc, as one that did not wait would, and the flusher goes on. Before, the waiter
// left the wait list before the push, and the write was moved out of it: the push's throw lost
// the write and ended the flusher, whose end woke only the waiters still listed, so the
// enqueue() never returned (the test cancels it after 5 s).
TEST_F(AllocationTest, AWaitingEnqueueWhoseWriteCannotBeQueuedGetsTheAllocationFailure) {
  bool armed = false;
  bool answered = false;
  bool bad_alloc = false;
  std::string other;  // any other outcome of the waiting enqueue()
  PendingWritesReport end{};
  std::optional<Error> stopped;
  run_coroutine([&]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    Pool pool(executor, pool_of_one());
    PendingWrites writes(pool, executor,
                         PendingWritesConfig{.name = "no-room-for-the-waiter",
                                             .capacity = 1,
                                             .batch_size = 1,
                                             .flush_interval = 0ms});
    co_await writes.enqueue("SELECT $1::bigint", std::int64_t{1});  // the queue is full
    asio::cancellation_signal unstick;
    asio::co_spawn(
        executor,
        [&]() -> asio::awaitable<void> {
          try {
            co_await writes.enqueue("SELECT $1::bigint", std::int64_t{2});
            other = "accepted";
          } catch (const std::bad_alloc&) {
            bad_alloc = true;
          } catch (const std::exception& error) {
            other = error.what();
          }
          answered = true;
        },
        asio::bind_cancellation_slot(unstick.slot(), asio::detached));
    const auto started = std::chrono::steady_clock::now();
    while (writes.report().waiting < 1 && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(5ms);
    }
    EXPECT_EQ(writes.report().waiting, 1U) << "the second enqueue() did not wait for room";
    // The first batch's lease goes back; the next allocation of this thread is then the push of
    // the waiting write, as its batch is settled.
    boost::signals2::scoped_connection on_released = pool.events().released.connect([&] {
      if (armed) return;
      armed = true;
      failing_allocations = 1;
    });
    co_await writes.start();
    while (!answered && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_TRUE(answered) << "the waiting enqueue() was never answered";
    if (!answered) unstick.emit(asio::cancellation_type::terminal);
    // The flusher goes on: a later write is flushed.
    if (answered) co_await writes.enqueue("SELECT $1::bigint", std::int64_t{3});
    try {
      co_await with_timeout(writes.stop(), 5s);
    } catch (const Error& error) {
      stopped = error;
    }
    end = writes.report();
    (void)co_await pool.close(1s);
  });
  failing_allocations = 0;
  ASSERT_TRUE(armed) << "the first batch's lease never went back";
  EXPECT_TRUE(bad_alloc) << "the waiting enqueue() ended otherwise: " << other;
  EXPECT_FALSE(stopped.has_value()) << stopped->what();
  EXPECT_EQ(end.accepted, 2U);
  EXPECT_EQ(end.flushed, 2U);
  EXPECT_EQ(end.failed, 0U);
  EXPECT_EQ(end.waiting, 0U);
}

// The writes the flusher had in flight when it failed are handed to its end report with no
// allocation of their own, and its end counts every write before it allocates: memory may still be
// short. Here the flusher's next allocation fails as it backs off, and the third from it too.
// That third was the hand-back's, which pushed the batch's writes one by one into a vector: its
// growth failing, a write of the batch was destroyed unannounced (announced 2 of 3). With the
// hand-back allocating nothing, it came in the flusher's end, before it counted anything: the
// std::bad_alloc left io_context::run() with no write counted and stop() not woken. Now the
// writes are counted failed, stop() ends, and they are announced, or the log says that not all
// could be.
TEST_F(AllocationTest, WritesInFlightAreAnnouncedWhenMemoryStaysShortAsTheFlusherFails) {
  std::ostringstream log;
  const auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  std::size_t announced = 0;
  bool armed = false;
  bool stopped = false;
  PendingWritesReport end{};
  run_coroutine([&]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.connect.session_settings = {{"statement_timeout", "soon"}};  // every connect fails
    config.acquire_timeout = 100ms;
    Pool pool(executor, config);
    PendingWrites writes(
        pool, executor,
        PendingWritesConfig{.name = "short-of-memory", .batch_size = 2, .flush_interval = 0ms});
    boost::signals2::scoped_connection on_failed = writes.events().failed.connect(
        [&](const std::vector<std::string>& lost, const Error&) { announced += lost.size(); });
    boost::signals2::scoped_connection on_retrying =
        writes.events().retrying.connect([&](std::size_t, const Error&, std::chrono::milliseconds) {
          if (armed) return;
          armed = true;
          failing_pattern = 0b101U;
        });
    for (std::int64_t seq = 0; seq < 3; ++seq) {  // a batch of 2 in flight, 1 queued
      co_await writes.enqueue("INSERT INTO nowhere (seq) VALUES ($1)", seq);
    }
    co_await writes.start();
    try {
      co_await with_timeout(writes.stop(), 5s);
      stopped = true;
    } catch (const Error& error) {
      stopped = error.code() == client_errc::writes_failed;
    }
    end = writes.report();
    (void)co_await pool.close(1s);
  });
  const unsigned unused = failing_pattern;
  failing_pattern = 0;
  spdlog::default_logger()->flush();
  spdlog::set_default_logger(previous);
  ASSERT_TRUE(armed) << "the batch was never retried";
  EXPECT_EQ(unused, 0U) << "the flusher made fewer allocations than expected after its failure";
  EXPECT_TRUE(stopped) << "stop() did not end";
  EXPECT_EQ(end.failed, 3U) << log.str();
  EXPECT_EQ(end.pending, 0U);
  EXPECT_TRUE(announced == end.failed ||
              log.str().find("not all could be logged and reported") != std::string::npos)
      << "announced " << announced << " of " << end.failed << "\n"
      << log.str();
}

// A batch whose COMMIT was sent as the connection was lost may have been written (the server
// commits it all the same: here a deferred trigger holds the COMMIT while the connection is cut),
// and its retry is what settles it. When the flusher fails before that retry (here: it runs out of
// memory as it backs off), its writes are of unknown outcome, as when a closed pool keeps the retry
// off: report().unconfirmed, commit_unconfirmed through events().failed, stop() saying they may
// have been written. They were reported as not written (protocol_error, "the flusher failed
// before the commit of these writes' batch was confirmed"), while the row was in the table.
TEST_F(AllocationTest, WritesOfALostCommitAreUnconfirmedWhenTheFlusherFailsBeforeTheirRetry) {
  const std::string dsn = cluster().dsn();
  {
    testing::BlockingConnection admin(dsn);
    admin.query("DROP TABLE IF EXISTS alloc_lost_commit");
    admin.query("CREATE TABLE alloc_lost_commit (seq bigint PRIMARY KEY)");
    admin.query(
        "CREATE OR REPLACE FUNCTION alloc_lost_commit_slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$");
    admin.query(
        "CREATE CONSTRAINT TRIGGER alloc_lost_commit_slow AFTER INSERT ON alloc_lost_commit "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION alloc_lost_commit_slow()");
  }
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  PoolConfig config = pool_of_one();
  config.conninfo = proxy.conninfo_prefix() + " user=postgres dbname=postgres";
  bool commit_held = false;
  bool armed = false;
  std::vector<boost::system::error_code> failed_codes;
  std::vector<std::string> failed_messages;
  std::size_t announced = 0;
  std::optional<Error> stopped;
  PendingWritesReport end{};
  run_coroutine(
      [&]() -> asio::awaitable<void> {
        auto executor = co_await asio::this_coro::executor;
        Pool pool(executor, config);
        PendingWrites writes(pool, executor,
                             PendingWritesConfig{.name = "lost-commit-then-oom",
                                                 .flush_interval = 0ms,
                                                 .retry_initial = 1000ms,
                                                 .retry_max = 1000ms});
        boost::signals2::scoped_connection on_failed = writes.events().failed.connect(
            [&](const std::vector<std::string>& lost, const Error& error) {
              announced += lost.size();
              failed_codes.push_back(error.code());
              failed_messages.emplace_back(error.what());
            });
        boost::signals2::scoped_connection on_retrying = writes.events().retrying.connect(
            [&](std::size_t, const Error&, std::chrono::milliseconds) {
              if (armed) return;
              armed = true;
              failing_allocations = 1;  // the flusher's next allocation, as it backs off
            });
        co_await writes.start();
        co_await writes.enqueue("INSERT INTO alloc_lost_commit (seq) VALUES (1)");
        testing::BlockingConnection observer(dsn);
        const std::string held =
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND "
            "application_name = '" +
            pool.application_name() + "'";
        for (int i = 0; i < 500 && !commit_held; ++i) {
          commit_held = observer.scalar(held) == "1";
          if (!commit_held) co_await testing::sleep_for(20ms);
        }
        proxy.drop_all();  // the COMMIT's answer is lost; the server commits
        const auto started = std::chrono::steady_clock::now();
        while (writes.report().failed < 1 && std::chrono::steady_clock::now() - started < 10s) {
          co_await testing::sleep_for(10ms);
        }
        try {
          co_await with_timeout(writes.stop(), 10s);
        } catch (const Error& error) {
          stopped = error;
        }
        end = writes.report();
        (void)co_await pool.close(1s);
      },
      60s);
  failing_allocations = 0;
  ASSERT_TRUE(commit_held) << "the batch's COMMIT was never seen held by the trigger";
  ASSERT_TRUE(armed) << "the lost COMMIT was not retried";
  EXPECT_TRUE(testing::eventually(
      [&] {
        testing::BlockingConnection observer(dsn);
        return observer.scalar("SELECT count(*) FROM alloc_lost_commit") == "1";
      },
      10s))
      << "the server was expected to commit the batch whose answer was lost";
  EXPECT_EQ(end.failed, 1U) << "the flusher did not fail when out of memory";
  EXPECT_EQ(end.unconfirmed, 1U);
  EXPECT_EQ(announced, 1U);
  ASSERT_EQ(failed_codes.size(), 1U);
  EXPECT_EQ(failed_codes[0], client_errc::commit_unconfirmed) << failed_messages[0];
  EXPECT_THAT(failed_messages[0], ::testing::HasSubstr("may have been written"));
  ASSERT_TRUE(stopped.has_value());
  EXPECT_EQ(stopped->code(), client_errc::writes_failed) << stopped->what();
  EXPECT_THAT(stopped->what(), ::testing::HasSubstr("1 may have been written")) << stopped->what();
}

// A PendingWrites may be destroyed by a failed subscriber called for the writes its flusher gave
// up on as it ended (here: it failed, running out of memory): nothing is left running then. It
// logged "destroyed while running, without stop()" and abandoned a flushing that was over.
TEST_F(AllocationTest, APendingWritesDestroyedByASubscriberOfItsEndReportLogsNothingSpurious) {
  std::ostringstream log;
  const auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  bool armed = false;
  bool destroyed = false;
  run_coroutine([&]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.connect.session_settings = {{"statement_timeout", "soon"}};  // every connect fails
    config.acquire_timeout = 100ms;
    Pool pool(executor, config);
    auto writes = std::make_unique<PendingWrites>(
        pool, executor,
        PendingWritesConfig{.name = "destroyed-at-end", .batch_size = 2, .flush_interval = 0ms});
    boost::signals2::scoped_connection on_failed =
        writes->events().failed.connect([&](const std::vector<std::string>&, const Error&) {
          writes.reset();
          destroyed = true;
        });
    boost::signals2::scoped_connection on_retrying = writes->events().retrying.connect(
        [&](std::size_t, const Error&, std::chrono::milliseconds) {
          if (armed) return;
          armed = true;
          failing_allocations = 1;  // the flusher's next allocation, as it backs off
        });
    for (std::int64_t seq = 0; seq < 3; ++seq) {
      co_await writes->enqueue("INSERT INTO nowhere (seq) VALUES ($1)", seq);
    }
    co_await writes->start();
    const auto started = std::chrono::steady_clock::now();
    while (!destroyed && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    co_await testing::sleep_for(50ms);
    (void)co_await pool.close(1s);
  });
  failing_allocations = 0;
  spdlog::default_logger()->flush();
  spdlog::set_default_logger(previous);
  ASSERT_TRUE(armed) << "the batch was never retried";
  ASSERT_TRUE(destroyed) << log.str();
  EXPECT_EQ(log.str().find("destroyed while running"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("the flusher failed"), std::string::npos) << log.str();
}

// Pool::evict_all() while memory runs out, with a query() connection waiting for its statement's
// answer: the multiplexer's part (evict_links(), called here from a thread of its own, where
// asio has no cache of recycled blocks and every allocation fails) marks the connection as
// taking no new statement, and throws nothing, although it cannot post the wake-up of that
// connection. The connection sees the eviction once its statement is answered, and goes back.
// Before, the failed post threw std::bad_alloc out of evict_all(), after the pool's eviction was
// done.
TEST_F(AllocationTest, AnEvictionOfQueryConnectionsWhileMemoryRunsOutThrowsNothing) {
  run_coroutine([]() -> asio::awaitable<void> {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig config = pool_of_one();
    config.max_size = 2;
    Pool pool(executor, config);
    bool answered = false;
    asio::co_spawn(
        executor,
        [&]() -> asio::awaitable<void> {
          const Result result = co_await pool.query("SELECT 1 FROM pg_sleep(0.3)");
          answered = result.size() == 1;
        },
        asio::detached);
    std::shared_ptr<detail::Multiplexer> multiplexer;
    {
      const auto state = detail::pool_state_of(pool).lock();
      const std::lock_guard lock(state->mutex);
      multiplexer = state->multiplexer;
    }
    const auto waiting = [&multiplexer] {
      if (!multiplexer) return false;
      const std::lock_guard lock(multiplexer->mutex);
      return multiplexer->links.size() == 1 && multiplexer->links.front()->waiting;
    };
    const auto started = std::chrono::steady_clock::now();
    while (!waiting() && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(5ms);
      if (!multiplexer) {
        const auto state = detail::pool_state_of(pool).lock();
        const std::lock_guard lock(state->mutex);
        multiplexer = state->multiplexer;
      }
    }
    EXPECT_TRUE(waiting()) << "no query() connection waited for its statement's answer";
    std::string thrown;
    std::thread evicting([&] {
      out_of_memory = true;
      try {
        multiplexer->evict_links();
      } catch (const std::exception& error) {
        thrown = error.what();
      }
      out_of_memory = false;
    });
    evicting.join();
    EXPECT_EQ(thrown, "") << "the multiplexer's evict_links() threw when out of memory";
    {
      const std::lock_guard lock(multiplexer->mutex);
      for (const auto& link : multiplexer->links) EXPECT_TRUE(link->drained_for_good());
    }
    while (!answered && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_TRUE(answered) << "the statement in flight on the evicted connection was not answered";
    while (pool.stats().shared_connections > 0 && std::chrono::steady_clock::now() - started < 5s) {
      co_await testing::sleep_for(10ms);
    }
    EXPECT_EQ(pool.stats().shared_connections, 0u) << "the evicted connection was not given back";
    (void)co_await pool.close(1s);
  });
}

}  // namespace
}  // namespace pgrt
