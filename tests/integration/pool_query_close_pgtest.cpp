// Pool::query() (statements without a lease) against the pool's close paths, a server that ends
// the shared connection, and callers on threads of their own: every caller is answered (its own
// answer or an error that says what happened), nothing waits without a bound.
#include <algorithm>
#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_future.hpp>
#include <chrono>
#include <future>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <pgrt/db.hpp>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::BlockingConnection;
using ::testing::HasSubstr;
using testing::run_coroutine;
using testing::sleep_for;
using awaitable_void = asio::awaitable<void>;

class PoolQueryCloseTest : public testing::DbTest {
 protected:
  static PoolConfig config(std::string instance, std::size_t max_size) {
    PoolConfig pool_config;
    pool_config.conninfo = cluster().dsn();
    pool_config.max_size = max_size;
    pool_config.application = "pgrt-test";
    pool_config.instance = std::move(instance);
    return pool_config;
  }
};

// One caller's outcome: its value, or the error it got.
struct Outcome {
  bool done = false;
  std::optional<int> value;
  std::optional<Error> error;
};

// Runs `sql` (a statement whose rows are not read) through `pool`'s query() on a coroutine of its
// own, on `executor`; its outcome goes to `outcome`.
void spawn_query(const asio::any_io_executor& executor, Pool& pool, std::string sql,
                 Outcome& outcome) {
  asio::co_spawn(
      executor,
      [&pool, sql = std::move(sql), &outcome]() -> awaitable_void {
        try {
          (void)co_await pool.query(sql);
        } catch (const Error& error) {
          outcome.error = error;
        }
        outcome.done = true;
      },
      asio::detached);
}

// `callers` query() callers on `executor`, each on a coroutine of its own: caller i runs `sql`
// with i as $1 and keeps the int it gets back (or its error) in outcomes[i].
void spawn_numbered_callers(const asio::any_io_executor& executor, Pool& pool,
                            const std::string& sql, std::vector<Outcome>& outcomes, int callers) {
  for (int caller = 0; caller < callers; ++caller) {
    asio::co_spawn(
        executor,
        [&pool, sql, &outcome = outcomes[static_cast<std::size_t>(caller)],
         caller]() -> awaitable_void {
          try {
            outcome.value = (co_await pool.query(sql, caller)).scalar<int>();
          } catch (const Error& error) {
            outcome.error = error;
          }
          outcome.done = true;
        },
        asio::detached);
  }
}

// Waits (polling the caller's io_context) until `done()`, at most `limit`.
template <typename Done>
asio::awaitable<bool> wait_until(Done done, std::chrono::milliseconds limit) {
  const auto give_up_at = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < give_up_at) co_await sleep_for(5ms);
  co_return done();
}

// Waits until the server runs `sql_text` (by its text in pg_stat_activity), at most 5 s.
asio::awaitable<bool> wait_until_running(BlockingConnection& observer,
                                         const std::string& sql_text) {
  const std::string count =
      "SELECT count(*) FROM pg_stat_activity WHERE query = '" + sql_text + "' AND state = 'active'";
  for (int i = 0; i < 500; ++i) {
    if (observer.scalar(count) == "1") co_return true;
    co_await sleep_for(10ms);
  }
  co_return false;
}

// close(grace) with a slow statement in flight and others sent behind it on the same shared
// connection, with acquire_timeout 0 (no bound on a wait behind another): once the grace has
// run out the connection is interrupted, close() returns, and every caller is answered (its own
// value, or an error), none waits on.
TEST_F(PoolQueryCloseTest, StatementsSentBehindASlowOneAreAllAnsweredWhenCloseRunsOutOfGrace) {
  BlockingConnection observer(cluster().dsn());
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig pool_config = config("query-close-grace", 1);
    pool_config.acquire_timeout = 0ms;
    Pool pool(executor, pool_config);
    constexpr int callers = 10;
    std::vector<Outcome> outcomes(callers + 1);
    spawn_query(executor, pool, "SELECT pg_sleep(60)", outcomes[callers]);
    EXPECT_TRUE(co_await wait_until_running(observer, "SELECT pg_sleep(60)"));
    spawn_numbered_callers(executor, pool, "SELECT $1::int", outcomes, callers);
    EXPECT_TRUE(
        co_await wait_until([&] { return pool.stats().shared_in_flight == callers + 1; }, 5000ms))
        << pool.stats().shared_in_flight << " in flight";
    const auto started = std::chrono::steady_clock::now();
    const auto outstanding = co_await pool.close(300ms);
    EXPECT_LT(std::chrono::steady_clock::now() - started, 5s);
    EXPECT_EQ(outstanding.size(), 1U);
    EXPECT_TRUE(co_await wait_until(
        [&] {
          return std::all_of(outcomes.begin(), outcomes.end(),
                             [](const Outcome& outcome) { return outcome.done; });
        },
        5000ms));
    for (int caller = 0; caller <= callers; ++caller) {
      const Outcome& outcome = outcomes[caller];
      EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits";
      if (outcome.value) {
        EXPECT_EQ(*outcome.value, caller) << "caller " << caller << " got another's answer";
      }
      if (outcome.error) {
        EXPECT_NE(outcome.error->code(), client_errc::pool_closed)
            << "caller " << caller
            << ": a statement already sent was failed as never sent: " << outcome.error->what();
      }
    }
    EXPECT_TRUE(outcomes[callers].error) << "the interrupted pg_sleep(60) ran to its end";
    if (outcomes[callers].error) {
      EXPECT_EQ(outcomes[callers].error->code(), client_errc::connection_lost)
          << outcomes[callers].error->what();
      EXPECT_THAT(outcomes[callers].error->what(), HasSubstr("interrupted"));
    }
  });
}

// close(grace) with statements in flight that end within the grace: close() waits for them
// (their callers get their answers, not an error), fails the statements still queued with
// pool_closed, and reports nothing cut.
TEST_F(PoolQueryCloseTest, CloseWaitsForTheStatementsInFlightAndFailsOnlyTheQueuedOnes) {
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig pool_config = config("query-close-waits", 1);
    pool_config.max_waiters = 1000;
    Pool pool(executor, pool_config);
    constexpr int callers = 100;
    std::vector<Outcome> outcomes(callers);
    spawn_numbered_callers(executor, pool, "SELECT $1::int FROM pg_sleep(0.05)", outcomes, callers);
    EXPECT_TRUE(co_await wait_until([&] { return pool.stats().shared_in_flight > 0; }, 5000ms));
    const auto in_flight = pool.stats().shared_in_flight;
    const auto outstanding = co_await pool.close(30s);
    EXPECT_TRUE(outstanding.empty()) << outstanding.size() << " cut";
    int answered = 0;
    int closed = 0;
    for (int caller = 0; caller < callers; ++caller) {
      const Outcome& outcome = outcomes[caller];
      EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits after close() returned";
      if (outcome.value) {
        EXPECT_EQ(*outcome.value, caller);
        ++answered;
      } else if (outcome.error) {
        EXPECT_EQ(outcome.error->code(), client_errc::pool_closed) << outcome.error->what();
        EXPECT_THAT(outcome.error->what(), HasSubstr("closed"));
        ++closed;
      }
    }
    EXPECT_GE(static_cast<std::size_t>(answered), in_flight);
    EXPECT_EQ(answered + closed, callers);
    EXPECT_GT(closed, 0);
  });
}

// The server ends a shared connection (pg_terminate_backend) with statements in flight on it and
// more queued: each statement in flight fails with connection_lost and the server's reason;
// those queued run on a new connection and get their own answers; the pool serves on.
TEST_F(PoolQueryCloseTest, StatementsInFlightWhenTheServerEndsTheConnectionFailTheQueuedOnesRun) {
  BlockingConnection observer(cluster().dsn());
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig pool_config = config("query-terminated", 1);
    pool_config.max_waiters = 1000;
    Pool pool(executor, pool_config);
    constexpr int callers = 100;
    std::vector<Outcome> outcomes(callers + 1);
    spawn_query(executor, pool, "SELECT pg_sleep(30)", outcomes[callers]);
    EXPECT_TRUE(co_await wait_until_running(observer, "SELECT pg_sleep(30)"));
    spawn_numbered_callers(executor, pool, "SELECT $1::int", outcomes, callers);
    co_await sleep_for(100ms);
    const auto before = pool.stats();
    EXPECT_GT(before.shared_queued, 0U);
    EXPECT_GT(before.shared_in_flight, 1U);
    observer.scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT "
        "pg_sleep(30)'");
    EXPECT_TRUE(co_await wait_until(
        [&] {
          return std::all_of(outcomes.begin(), outcomes.end(),
                             [](const Outcome& outcome) { return outcome.done; });
        },
        10000ms));
    std::size_t lost = 0;
    std::size_t answered = 0;
    for (int caller = 0; caller <= callers; ++caller) {
      const Outcome& outcome = outcomes[caller];
      EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits";
      if (outcome.value) {
        EXPECT_EQ(*outcome.value, caller) << "caller " << caller << " got another's answer";
        ++answered;
      } else if (outcome.error) {
        EXPECT_EQ(outcome.error->code(), client_errc::connection_lost) << outcome.error->what();
        EXPECT_EQ(outcome.error->sqlstate(), "57P01") << outcome.error->what();
        ++lost;
      }
    }
    EXPECT_EQ(lost, before.shared_in_flight);
    EXPECT_EQ(answered, before.shared_queued);
    EXPECT_EQ((co_await pool.query("SELECT 42")).scalar<int>(), 42);
    (void)co_await pool.close(5s);
  });
}

// The Pool object destroyed (no close()) with statements in flight and queued: those in flight
// run to their end and are answered, the queued ones fail with pool_closed, and the io_context
// runs out of work by itself (no timer or wait of the pool's left behind).
TEST_F(PoolQueryCloseTest, APoolDestroyedWithStatementsInFlightAnswersThemAndLeavesNoWork) {
  asio::io_context io;
  constexpr int callers = 100;
  std::vector<Outcome> outcomes(callers);
  auto pool = std::make_unique<Pool>(io.get_executor(), [] {
    PoolConfig pool_config = config("query-destroyed", 1);
    pool_config.max_waiters = 1000;
    return pool_config;
  }());
  spawn_numbered_callers(io.get_executor(), *pool, "SELECT $1::int FROM pg_sleep(0.05)", outcomes,
                         callers);
  asio::co_spawn(
      io,
      [&]() -> awaitable_void {
        (void)co_await wait_until([&] { return pool->stats().shared_in_flight > 0; }, 5000ms);
        pool.reset();
      },
      asio::detached);
  std::optional<std::chrono::steady_clock::time_point> all_done;
  asio::co_spawn(
      io,
      [&]() -> awaitable_void {
        if (co_await wait_until(
                [&] {
                  return std::all_of(outcomes.begin(), outcomes.end(),
                                     [](const Outcome& outcome) { return outcome.done; });
                },
                20000ms)) {
          all_done = std::chrono::steady_clock::now();
        }
      },
      asio::detached);
  io.run_for(30s);
  EXPECT_TRUE(all_done);
  if (all_done) {
    EXPECT_LT(std::chrono::steady_clock::now() - *all_done, 2s)
        << "the io_context still had work long after every caller was answered";
  }
  int answered = 0;
  for (int caller = 0; caller < callers; ++caller) {
    const Outcome& outcome = outcomes[caller];
    EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits";
    if (outcome.value) {
      EXPECT_EQ(*outcome.value, caller);
      ++answered;
    } else if (outcome.error) {
      EXPECT_EQ(outcome.error->code(), client_errc::pool_closed) << outcome.error->what();
    }
  }
  EXPECT_GT(answered, 0);
}

// Callers on threads of their own (not the io_context's), each awaiting its statements through
// a future, while the pool closes on the io thread: each gets its own answers, then pool_closed;
// none waits on.
TEST_F(PoolQueryCloseTest, CallersOnOtherThreadsGetTheirOwnAnswersThenPoolClosedAcrossAClose) {
  asio::io_context io;
  auto work = asio::make_work_guard(io);
  std::thread io_thread([&] { io.run(); });
  PoolConfig pool_config = config("query-threads", 2);
  pool_config.max_waiters = 1000;
  Pool pool(io.get_executor(), pool_config);
  constexpr int threads = 4;
  std::atomic<int> wrong{0};
  std::atomic<int> answered{0};
  std::atomic<int> closed{0};
  std::atomic<int> hung{0};
  std::atomic<int> other{0};
  std::vector<std::thread> callers;
  for (int thread = 0; thread < threads; ++thread) {
    callers.emplace_back([&, thread] {
      for (int i = 0;; ++i) {
        const int expected = thread * 100'000 + i;
        auto answer = asio::co_spawn(io, pool.query("SELECT $1::int", expected), asio::use_future);
        if (answer.wait_for(10s) != std::future_status::ready) {
          ++hung;
          return;
        }
        try {
          if (answer.get().scalar<int>() != expected) ++wrong;
          ++answered;
        } catch (const Error& error) {
          if (error.code() == client_errc::pool_closed) {
            ++closed;
            return;
          }
          ++other;
          ADD_FAILURE() << error.what();
          return;
        }
      }
    });
  }
  std::this_thread::sleep_for(300ms);
  auto closing = asio::co_spawn(io, pool.close(5s), asio::use_future);
  EXPECT_EQ(closing.wait_for(10s), std::future_status::ready);
  for (auto& caller : callers) caller.join();
  work.reset();
  if (closing.wait_for(0s) != std::future_status::ready) io.stop();
  io_thread.join();
  EXPECT_EQ(hung.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(closed.load(), threads);
  EXPECT_GT(answered.load(), 0);
}

// close_now() (an exit handler) from another thread while statements are in flight on shared
// connections and more are queued: each caller is answered (connection_lost saying the
// connection was interrupted for those in flight, pool_closed for those queued), and nothing of
// the pool keeps the io_context busy. (Before, the statement running when the interrupt's cancel
// request reached the server failed with that 57014, "canceling statement due to user request".)
TEST_F(PoolQueryCloseTest, CloseNowFromAnotherThreadAnswersEveryCaller) {
  asio::io_context io;
  PoolConfig pool_config = config("query-close-now", 2);
  pool_config.max_waiters = 1000;
  Pool pool(io.get_executor(), pool_config);
  constexpr int callers = 200;
  std::vector<Outcome> outcomes(callers);
  spawn_numbered_callers(io.get_executor(), pool, "SELECT $1::int FROM pg_sleep(0.02)", outcomes,
                         callers);
  std::thread io_thread([&] { io.run_for(20s); });
  for (int i = 0; i < 500 && pool.stats().shared_in_flight == 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(100ms);
  pool.close_now();
  const auto started = std::chrono::steady_clock::now();
  io_thread.join();
  EXPECT_LT(std::chrono::steady_clock::now() - started, 10s);
  for (int caller = 0; caller < callers; ++caller) {
    const Outcome& outcome = outcomes[caller];
    EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits";
    if (outcome.value) {
      EXPECT_EQ(*outcome.value, caller);
    }
    if (outcome.error) {
      EXPECT_TRUE(outcome.error->code() == client_errc::connection_lost ||
                  outcome.error->code() == client_errc::pool_closed)
          << outcome.error->what();
      if (outcome.error->code() == client_errc::connection_lost) {
        // (Not the server's 57014 for the interrupt's cancel request, "canceling statement due
        // to user request": nobody cancelled the statement.)
        EXPECT_THAT(outcome.error->what(), HasSubstr("interrupted"));
      }
    }
  }
}

// Statements that fail (division by zero) among other callers' statements on the same shared
// connections: only their callers fail, each with its statement's own error; the others get their
// own answers.
TEST_F(PoolQueryCloseTest, AFailingStatementAmongOthersOnItsConnectionFailsOnlyItsCaller) {
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    PoolConfig pool_config = config("query-error-among", 2);
    pool_config.max_waiters = 1000;
    Pool pool(executor, pool_config);
    constexpr int callers = 300;
    std::vector<Outcome> outcomes(callers);
    for (int caller = 0; caller < callers; ++caller) {
      asio::co_spawn(
          executor,
          [&, caller]() -> awaitable_void {
            try {
              // Every seventh caller divides by zero.
              outcomes[caller].value = (co_await pool.query("SELECT $1::int / $2::int", caller * 3,
                                                            caller % 7 == 0 ? 0 : 3))
                                           .scalar<int>();
            } catch (const Error& error) {
              outcomes[caller].error = error;
            }
            outcomes[caller].done = true;
          },
          asio::detached);
    }
    EXPECT_TRUE(co_await wait_until(
        [&] {
          return std::all_of(outcomes.begin(), outcomes.end(),
                             [](const Outcome& outcome) { return outcome.done; });
        },
        20000ms));
    for (int caller = 0; caller < callers; ++caller) {
      const Outcome& outcome = outcomes[caller];
      if (caller % 7 == 0) {
        EXPECT_TRUE(outcome.error) << "caller " << caller;
        if (outcome.error) {
          EXPECT_EQ(outcome.error->sqlstate(), "22012") << outcome.error->what();
        }
      } else {
        EXPECT_EQ(outcome.value, std::optional<int>(caller)) << "caller " << caller;
        if (outcome.error) ADD_FAILURE() << "caller " << caller << ": " << outcome.error->what();
      }
    }
    (void)co_await pool.close(5s);
  });
}

// A caller cancelled (a cancellation signal bound to its co_spawn) while its statement is in
// flight behind a slow one on the pool's only connection, then another caller: the cancelled one
// gets `cancelled` at once, the next statement gets its own answer (never the cancelled one's),
// and the connection serves on.
TEST_F(PoolQueryCloseTest, ACallerCancelledInFlightLeavesItsAnswerToNobody) {
  BlockingConnection observer(cluster().dsn());
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    Pool pool(executor, config("query-cancel-in-flight", 1));
    Outcome slow;
    Outcome cancelled;
    asio::co_spawn(
        executor,
        [&]() -> awaitable_void {
          slow.value = (co_await pool.query("SELECT 7 FROM pg_sleep(0.5)")).scalar<int>();
          slow.done = true;
        },
        asio::detached);
    EXPECT_TRUE(co_await wait_until_running(observer, "SELECT 7 FROM pg_sleep(0.5)"));
    asio::cancellation_signal signal;
    asio::co_spawn(
        executor,
        [&]() -> awaitable_void {
          try {
            cancelled.value = (co_await pool.query("SELECT 1111")).scalar<int>();
          } catch (const Error& error) {
            cancelled.error = error;
          }
          cancelled.done = true;
        },
        asio::bind_cancellation_slot(signal.slot(), asio::detached));
    EXPECT_TRUE(co_await wait_until([&] { return pool.stats().shared_in_flight == 2; }, 5000ms));
    signal.emit(asio::cancellation_type::terminal);
    EXPECT_TRUE(co_await wait_until([&] { return cancelled.done; }, 100ms))
        << "the cancelled caller waited for the slow statement ahead of its own";
    EXPECT_TRUE(cancelled.error);
    if (cancelled.error) {
      EXPECT_EQ(cancelled.error->code(), client_errc::cancelled);
    }
    EXPECT_EQ((co_await pool.query("SELECT 2222")).scalar<int>(), 2222);
    EXPECT_TRUE(co_await wait_until([&] { return slow.done; }, 5000ms));
    EXPECT_EQ(slow.value, std::optional<int>(7));
    EXPECT_EQ((co_await pool.query("SELECT 3333")).scalar<int>(), 3333);
    const auto stats = pool.stats();
    EXPECT_EQ(stats.shared_in_flight, 0U);
    EXPECT_EQ(stats.shared_queued, 0U);
    (void)co_await pool.close(5s);
  });
}

// pgrt::query() on the process-wide pool (its executor taken from the first caller), closed with
// statements in flight: those in flight are answered, pgrt::query() then reports
// pool_not_configured, and a pool configured again (run on another io_context) serves it.
TEST_F(PoolQueryCloseTest, ProcessWideQueryAcrossACloseAndAConfigureAgain) {
  PoolConfig pool_config = config("query-process-wide", 2);
  pool_config.max_waiters = 1000;
  pgrt::configure(pool_config);
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    constexpr int callers = 50;
    std::vector<Outcome> outcomes(callers);
    for (int caller = 0; caller < callers; ++caller) {
      asio::co_spawn(
          executor,
          [&, caller]() -> awaitable_void {
            try {
              outcomes[caller].value =
                  (co_await pgrt::query("SELECT $1::int FROM pg_sleep(0.01)", caller))
                      .scalar<int>();
            } catch (const Error& error) {
              outcomes[caller].error = error;
            }
            outcomes[caller].done = true;
          },
          asio::detached);
    }
    co_await sleep_for(50ms);
    const auto outstanding = co_await pgrt::pool().close(10s);
    EXPECT_TRUE(outstanding.empty());
    for (int caller = 0; caller < callers; ++caller) {
      const Outcome& outcome = outcomes[caller];
      EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits after close() returned";
      if (outcome.value) {
        EXPECT_EQ(*outcome.value, caller);
      }
      if (outcome.error) {
        EXPECT_EQ(outcome.error->code(), client_errc::pool_closed) << outcome.error->what();
      }
    }
    try {
      (void)co_await pgrt::query("SELECT 1");
      ADD_FAILURE() << "pgrt::query() ran on a closed process-wide pool";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::pool_not_configured) << error.what();
    }
  });
  pgrt::configure(pool_config);
  run_coroutine([&]() -> awaitable_void {
    EXPECT_EQ((co_await pgrt::query("SELECT 9")).scalar<int>(), 9);
    (void)co_await pgrt::pool().close(5s);
  });
}

// Two query() callers on an io_context that two threads run, each computing for a while after
// each answer (no I/O: CPU work a handler may do): their computations run side by side on the
// two threads, as any two coroutines' would. (Before, every shared connection ran on the
// multiplexer's one strand, and a caller resumed in place by its connection's answer computed on
// that strand: the computations never overlapped, and every shared connection stood still
// meanwhile.)
TEST_F(PoolQueryCloseTest, CallersComputingAfterTheirAnswersRunSideBySideOnTwoThreads) {
  asio::io_context io(2);
  auto work = asio::make_work_guard(io);
  std::vector<std::thread> threads;
  Pool pool(io.get_executor(), config("query-two-threads-compute", 2));
  std::atomic<int> computing{0};
  std::atomic<int> most_at_once{0};
  std::atomic<int> finished{0};
  for (int caller = 0; caller < 2; ++caller) {
    asio::co_spawn(
        io,
        [&]() -> awaitable_void {
          const auto until = std::chrono::steady_clock::now() + 1500ms;
          while (std::chrono::steady_clock::now() < until) {
            (void)co_await pool.query("SELECT 1");
            const int now_computing = ++computing;
            int seen = most_at_once.load();
            while (now_computing > seen &&
                   !most_at_once.compare_exchange_weak(seen, now_computing)) {
            }
            const auto computed_by = std::chrono::steady_clock::now() + 50ms;
            while (std::chrono::steady_clock::now() < computed_by) {
            }
            --computing;
          }
          ++finished;
        },
        asio::detached);
  }
  for (int thread = 0; thread < 2; ++thread) threads.emplace_back([&] { io.run_for(20s); });
  while (finished < 2) std::this_thread::sleep_for(10ms);
  asio::co_spawn(io, pool.close(5s), asio::detached);
  work.reset();
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(most_at_once.load(), 2)
      << "the callers' computations never overlapped: each ran on the shared connections' strand";
}

}  // namespace
}  // namespace pgrt
