// The internal async primitives (db/src/async/): the abandon guard, the timer used as a condition
// variable, the wait group and run_blocking; and what co_spawn does with an early cancellation. The
// coroutines are free functions: a capturing lambda coroutine would outlive its captures.
#include <array>
#include <atomic>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>
#include <boost/version.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <gtest/gtest.h>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "async/abandon_guard.hpp"
#include "async/parked_wait.hpp"
#include "async/run_blocking.hpp"
#include "async/timer_condition.hpp"
#include "async/wait_group.hpp"

namespace pgrt::detail::async {
namespace {

using namespace std::chrono_literals;
using boost::system::error_code;

// Records how a coroutine ended; `done` is set last.
template <typename Value>
struct Outcome {
  std::optional<Value> value;
  std::exception_ptr error;
  bool done = false;
};

template <typename Value>
auto record(Outcome<Value>& outcome) {
  return [&outcome](const std::exception_ptr& error, Value value) {
    outcome.error = error;
    if (!error) outcome.value = std::move(value);
    outcome.done = true;
  };
}

// --- AbandonGuard --------------------------------------------------------------------------------

TEST(AbandonGuardTest, RunsWhenLeftArmedAndNotOnceDisarmed) {
  int runs = 0;
  {
    AbandonGuard guard([&runs] { ++runs; });
    EXPECT_TRUE(guard.armed());
  }
  EXPECT_EQ(runs, 1);
  {
    AbandonGuard guard([&runs] { ++runs; });
    guard.disarm();
    EXPECT_FALSE(guard.armed());
  }
  EXPECT_EQ(runs, 1);
}

TEST(AbandonGuardTest, RunsWhenAnExceptionLeavesTheScope) {
  int runs = 0;
  try {
    AbandonGuard guard([&runs] { ++runs; });
    throw std::runtime_error("abandoned");
  } catch (const std::runtime_error&) {  // NOLINT(bugprone-empty-catch): the guard is the point
  }
  EXPECT_EQ(runs, 1);
}

asio::awaitable<void> guarded_sleep(int& runs, bool& resumed) {
  AbandonGuard guard([&runs] { ++runs; });
  asio::steady_timer timer(co_await asio::this_coro::executor, Clock::time_point::max());
  co_await timer.async_wait(asio::use_awaitable);
  resumed = true;
  guard.disarm();
}

TEST(AbandonGuardTest, RunsWhenTheCoroutineFrameIsDestroyedMidWait) {
  int runs = 0;
  bool resumed = false;
  {
    asio::io_context io;
    asio::co_spawn(io, guarded_sleep(runs, resumed), asio::detached);
    io.poll();
    EXPECT_EQ(runs, 0) << "the coroutine should be waiting";
  }  // the io_context destroys the frame
  EXPECT_EQ(runs, 1);
  EXPECT_FALSE(resumed);
}

// --- wait_locked and TimerCondition ------------------------------------------------------------

// A mutex that calls `on_release` once, right before it is next released: a notifier that gets
// the mutex the very instant the waiter lets go of it.
class ReleaseHookMutex {
 public:
  void lock() { mutex_.lock(); }
  bool try_lock() { return mutex_.try_lock(); }
  void unlock() {
    if (auto hook = std::exchange(on_release, nullptr)) hook();
    mutex_.unlock();
  }
  std::function<void()> on_release;

 private:
  std::mutex mutex_;
};

asio::awaitable<error_code> wait_with_hook(ReleaseHookMutex& mutex, asio::steady_timer& timer,
                                           std::size_t& cancelled_at_release) {
  std::unique_lock lock(mutex);
  mutex.on_release = [&timer, &cancelled_at_release] { cancelled_at_release = timer.cancel(); };
  const error_code error = co_await wait_locked(lock, timer, Clock::time_point::max());
  EXPECT_TRUE(lock.owns_lock());
  co_return error;
}

TEST(TimerConditionTest, WaitLockedHasStartedItsWaitWhenItReleasesTheLock) {
  asio::io_context io;
  ReleaseHookMutex mutex;
  asio::steady_timer timer(io);
  std::size_t cancelled_at_release = 99;
  Outcome<error_code> outcome;
  asio::co_spawn(io, wait_with_hook(mutex, timer, cancelled_at_release), record(outcome));
  io.run_for(5s);
  // A notifier that takes the mutex as soon as it is free must find the wait started, or its
  // cancel is lost and the wait never ends.
  EXPECT_EQ(cancelled_at_release, 1U);
  ASSERT_TRUE(outcome.done) << "the wake-up was lost";
  EXPECT_EQ(*outcome.value, asio::error::operation_aborted);
}

asio::awaitable<Woken> wait_on_condition(ReleaseHookMutex& mutex, TimerCondition& condition) {
  std::unique_lock lock(mutex);
  mutex.on_release = [&condition] { condition.notify_all_locked(); };
  co_return co_await condition.wait(lock);
}

TEST(TimerConditionTest, ANotifyRightAtTheReleaseIsNotLost) {
  asio::io_context io;
  ReleaseHookMutex mutex;
  TimerCondition condition;
  Outcome<Woken> outcome;
  asio::co_spawn(io, wait_on_condition(mutex, condition), record(outcome));
  io.run_for(5s);
  ASSERT_TRUE(outcome.done) << "the wake-up was lost";
  EXPECT_EQ(*outcome.value, Woken::notified);
}

asio::awaitable<Woken> wait_until(std::mutex& mutex, TimerCondition& condition,
                                  Clock::time_point deadline) {
  std::unique_lock lock(mutex);
  co_return co_await condition.wait(lock, deadline);
}

std::size_t waiting(std::mutex& mutex, const TimerCondition& condition) {
  const std::lock_guard lock(mutex);
  return condition.waiting_locked();
}

TEST(TimerConditionTest, NotifyWakesEveryWaiterAndOnlyThoseWaiting) {
  asio::io_context io;
  std::mutex mutex;
  TimerCondition condition;
  {
    const std::lock_guard lock(mutex);
    condition.notify_all_locked();  // nobody waits: nothing is remembered
  }
  std::vector<Outcome<Woken>> outcomes(3);
  for (auto& outcome : outcomes) {
    asio::co_spawn(io, wait_until(mutex, condition, Clock::time_point::max()), record(outcome));
  }
  io.poll();
  ASSERT_EQ(waiting(mutex, condition), 3U);
  for (const auto& outcome : outcomes) EXPECT_FALSE(outcome.done);
  {
    const std::lock_guard lock(mutex);
    condition.notify_all_locked();
  }
  io.run_for(5s);
  for (const auto& outcome : outcomes) {
    ASSERT_TRUE(outcome.done);
    EXPECT_EQ(*outcome.value, Woken::notified);
  }
  EXPECT_EQ(waiting(mutex, condition), 0U);
}

TEST(TimerConditionTest, ADeadlineEndsTheWaitAndLeavesTheList) {
  asio::io_context io;
  std::mutex mutex;
  TimerCondition condition;
  Outcome<Woken> outcome;
  const auto started = Clock::now();
  asio::co_spawn(io, wait_until(mutex, condition, started + 50ms), record(outcome));
  io.run_for(5s);
  ASSERT_TRUE(outcome.done);
  EXPECT_EQ(*outcome.value, Woken::deadline);
  EXPECT_GE(Clock::now() - started, 50ms);
  EXPECT_EQ(waiting(mutex, condition), 0U);
}

TEST(TimerConditionTest, CancellationEndsTheWaitAndLeavesTheList) {
  asio::io_context io;
  std::mutex mutex;
  TimerCondition condition;
  Outcome<Woken> outcome;
  asio::cancellation_signal cancel;
  asio::co_spawn(io, wait_until(mutex, condition, Clock::time_point::max()),
                 asio::bind_cancellation_slot(cancel.slot(), record(outcome)));
  io.poll();
  ASSERT_EQ(waiting(mutex, condition), 1U);
  cancel.emit(asio::cancellation_type::terminal);
  io.run_for(5s);
  ASSERT_TRUE(outcome.done);
  EXPECT_EQ(*outcome.value, Woken::cancelled);
  EXPECT_EQ(waiting(mutex, condition), 0U);
}

TEST(TimerConditionTest, AWaiterDestroyedMidWaitLeavesTheList) {
  std::mutex mutex;
  TimerCondition condition;
  {
    asio::io_context io;
    asio::co_spawn(io, wait_until(mutex, condition, Clock::time_point::max()), asio::detached);
    io.poll();
    ASSERT_EQ(waiting(mutex, condition), 1U);
  }
  EXPECT_EQ(waiting(mutex, condition), 0U);  // a notify now would touch a dead timer
  const std::lock_guard lock(mutex);
  condition.notify_all_locked();
}

// Ping-pong between a plain thread (the notifier) and a coroutine on a two-thread io_context.
struct PingPong {
  static constexpr int rounds = 2000;
  std::mutex mutex;
  std::condition_variable consumed;  // for the thread
  TimerCondition produced;           // for the coroutine
  int pending = 0;
  int received = 0;
};

asio::awaitable<void> consume(PingPong& game) {
  std::unique_lock lock(game.mutex);
  for (int round = 0; round < PingPong::rounds; ++round) {
    while (game.pending == 0) {
      co_await game.produced.wait(lock);
    }
    --game.pending;
    ++game.received;
    game.consumed.notify_one();
  }
}

TEST(TimerConditionTest, NoWakeUpIsLostAcrossThreads) {
  PingPong game;
  asio::io_context io;
  asio::co_spawn(io, consume(game), asio::detached);
  std::thread notifier([&game] {
    for (int round = 0; round < PingPong::rounds; ++round) {
      std::unique_lock lock(game.mutex);
      if (!game.consumed.wait_for(lock, 10s, [&game] { return game.pending == 0; })) return;
      ++game.pending;
      game.produced.notify_all_locked();
    }
  });
  std::thread second([&io] { io.run_for(20s); });
  io.run_for(20s);
  second.join();
  notifier.join();
  const std::lock_guard lock(game.mutex);
  EXPECT_EQ(game.received, PingPong::rounds) << "a wake-up was lost";
}

// --- ParkedWait ----------------------------------------------------------------------------------

// A coroutine parked in `parked` (through park_then_unlock(), as the pool's waiters and query()'s
// callers park); records the error it was resumed with. `guard_runs` counts its unwinding.
asio::awaitable<void> park_in(std::mutex& mutex, ParkedWait& parked,
                              std::optional<error_code>& resumed_with, int& guard_runs) {
  AbandonGuard guard([&guard_runs] { ++guard_runs; });
  std::unique_lock lock(mutex);
  const auto executor = co_await asio::this_coro::executor;
  const auto [error] = co_await park_then_unlock(lock, parked, executor);
  guard.disarm();
  resumed_with = error;
}

TEST(ParkedWaitTest, ACoroutinesWaitIsHeldInPlaceAndEndsWhenResumed) {
  asio::io_context io;
  std::mutex mutex;
  ParkedWait parked;
  std::optional<error_code> resumed_with;
  int guard_runs = 0;
  asio::co_spawn(io, park_in(mutex, parked, resumed_with, guard_runs), asio::detached);
  io.poll();
  {
    std::lock_guard lock(mutex);
    ASSERT_TRUE(parked.waiting());
    // A coroutine's handler (a pointer to its frames) needs no allocation of its own: with many
    // coroutines parked at once, one per wait was a malloc and a free.
    EXPECT_TRUE(parked.handler.held_in_place());
  }
  std::optional<ParkedWait> taken;
  {
    std::lock_guard lock(mutex);
    taken.emplace(parked.take());
  }
  EXPECT_FALSE(parked.waiting());
  ASSERT_TRUE(taken->waiting());
  resume(std::move(*taken), error_code{}, false);
  io.poll();
  ASSERT_TRUE(resumed_with.has_value());
  EXPECT_FALSE(*resumed_with);
  EXPECT_EQ(guard_runs, 0);
}

TEST(ParkedWaitTest, TheCoroutinesCancellationEndsItsWaitWithOperationAborted) {
  asio::io_context io;
  std::mutex mutex;
  ParkedWait parked;
  std::optional<error_code> resumed_with;
  int guard_runs = 0;
  asio::cancellation_signal cancel;
  asio::co_spawn(io, park_in(mutex, parked, resumed_with, guard_runs),
                 asio::bind_cancellation_slot(cancel.slot(), asio::detached));
  io.poll();
  ASSERT_TRUE(parked.waiting());
  cancel.emit(asio::cancellation_type::terminal);
  io.poll();
  ASSERT_TRUE(resumed_with.has_value());
  EXPECT_EQ(*resumed_with, asio::error::operation_aborted);
  EXPECT_FALSE(parked.waiting());
  EXPECT_EQ(guard_runs, 0);
}

TEST(ParkedWaitTest, DestroyingAParkedWaitDestroysItsCoroutine) {
  asio::io_context io;
  std::mutex mutex;
  ParkedWait parked;
  std::optional<error_code> resumed_with;
  int guard_runs = 0;
  asio::co_spawn(io, park_in(mutex, parked, resumed_with, guard_runs), asio::detached);
  io.poll();
  ASSERT_TRUE(parked.waiting());
  {
    std::optional<ParkedWait> taken;
    {
      std::lock_guard lock(mutex);
      taken.emplace(parked.take());
    }
  }  // destroyed unlocked, as release_waits_on() does: the coroutine unwinds, through its
     // executor (asio posts a coroutine's unwinding)
  io.poll();
  EXPECT_EQ(guard_runs, 1);
  EXPECT_FALSE(resumed_with.has_value());
}

TEST(ParkedWaitTest, AHandlerTooLargeToHoldInPlaceStillRunsOnceAndIsDestroyedOnce) {
  auto counter = std::make_shared<int>(0);
  std::array<char, 256> padding{};
  padding[0] = 'x';
  auto large = [counter, padding](error_code error) {
    EXPECT_EQ(padding[0], 'x');
    *counter += error ? 100 : 1;
  };
  static_assert(!ParkedHandler::fits_in_place<decltype(large)>);
  asio::io_context io;
  {
    ParkedWait parked;
    (void)parked.hold(std::move(large), io.get_executor(), false);
    EXPECT_TRUE(parked.waiting());
    EXPECT_FALSE(parked.handler.held_in_place());
    EXPECT_EQ(counter.use_count(), 2);
    ParkedWait moved(parked.take());
    resume(std::move(moved), asio::error::operation_aborted, false);
  }
  io.poll();
  EXPECT_EQ(*counter, 100);
  EXPECT_EQ(counter.use_count(), 1) << "the handler's copy was not destroyed";
  {
    ParkedWait dropped;
    (void)dropped.hold([counter](error_code) { ++*counter; }, io.get_executor(), false);
    EXPECT_TRUE(dropped.handler.held_in_place());
    EXPECT_EQ(counter.use_count(), 2);
  }
  EXPECT_EQ(counter.use_count(), 1) << "a handler destroyed unrun must release what it holds";
  EXPECT_EQ(*counter, 100);
}

// --- WaitGroup -----------------------------------------------------------------------------------

asio::awaitable<Woken> wait_for_group(WaitGroup& group, Clock::time_point deadline) {
  co_return co_await group.wait(deadline);
}

TEST(WaitGroupTest, AZeroCountDoesNotWait) {
  asio::io_context io;
  WaitGroup group;
  Outcome<Woken> outcome;
  asio::co_spawn(io, wait_for_group(group, Clock::time_point::max()), record(outcome));
  io.poll();
  ASSERT_TRUE(outcome.done);
  EXPECT_EQ(*outcome.value, Woken::notified);
}

TEST(WaitGroupTest, WakesEveryWaiterWhenTheCountReachesZero) {
  asio::io_context io;
  WaitGroup group;
  group.add(2);
  std::vector<Outcome<Woken>> outcomes(3);
  for (auto& outcome : outcomes) {
    asio::co_spawn(io, wait_for_group(group, Clock::time_point::max()), record(outcome));
  }
  io.poll();
  group.done();
  io.poll();
  for (const auto& outcome : outcomes) EXPECT_FALSE(outcome.done) << "woken with one left";
  group.done();
  io.run_for(5s);
  for (const auto& outcome : outcomes) {
    ASSERT_TRUE(outcome.done);
    EXPECT_EQ(*outcome.value, Woken::notified);
  }
  EXPECT_EQ(group.count(), 0U);
}

TEST(WaitGroupTest, ADeadlineEndsTheWaitWithWorkLeft) {
  asio::io_context io;
  WaitGroup group;
  group.add();
  Outcome<Woken> outcome;
  const auto started = Clock::now();
  asio::co_spawn(io, wait_for_group(group, started + 50ms), record(outcome));
  io.run_for(5s);
  ASSERT_TRUE(outcome.done);
  EXPECT_EQ(*outcome.value, Woken::deadline);
  EXPECT_GE(Clock::now() - started, 50ms);
  EXPECT_LT(Clock::now() - started, 4s);
  EXPECT_EQ(group.count(), 1U);
  group.done();
}

TEST(WaitGroupTest, CancellationEndsTheWait) {
  asio::io_context io;
  WaitGroup group;
  group.add();
  Outcome<Woken> outcome;
  asio::cancellation_signal cancel;
  asio::co_spawn(io, wait_for_group(group, Clock::time_point::max()),
                 asio::bind_cancellation_slot(cancel.slot(), record(outcome)));
  io.poll();
  ASSERT_FALSE(outcome.done);
  cancel.emit(asio::cancellation_type::terminal);
  io.run_for(5s);
  ASSERT_TRUE(outcome.done);
  EXPECT_EQ(*outcome.value, Woken::cancelled);
  group.done();
}

asio::awaitable<void> wait_and_check(WaitGroup& group, std::atomic<int>& woken_at_zero,
                                     std::atomic<int>& woken_early) {
  const Woken woken = co_await group.wait();
  if (woken == Woken::notified && group.count() == 0) {
    ++woken_at_zero;
  } else {
    ++woken_early;
  }
}

TEST(WaitGroupTest, DoneFromOtherThreadsWakesWaitersOnAMultiThreadedContext) {
  for (int repeat = 0; repeat < 50; ++repeat) {
    asio::io_context io;
    WaitGroup group;
    constexpr int workers = 3, waiters = 4;
    group.add(workers);
    std::atomic<int> woken_at_zero = 0, woken_early = 0;
    for (int i = 0; i < waiters; ++i) {
      asio::co_spawn(io, wait_and_check(group, woken_at_zero, woken_early), asio::detached);
    }
    std::vector<std::thread> threads;
    threads.reserve(workers + 1);
    for (int i = 0; i < workers; ++i) {
      threads.emplace_back([&group, i] {
        std::this_thread::sleep_for(std::chrono::microseconds(100 * i));
        group.done();
      });
    }
    threads.emplace_back([&io] { io.run_for(10s); });
    io.run_for(10s);
    for (auto& thread : threads) thread.join();
    ASSERT_EQ(woken_at_zero, waiters) << "repeat " << repeat;
    ASSERT_EQ(woken_early, 0) << "repeat " << repeat;
  }
}

// --- run_blocking --------------------------------------------------------------------------------

// Destroyed on whichever thread drops the last reference; says so through `destroyed`.
struct Sentinel {
  explicit Sentinel(std::shared_ptr<std::promise<void>> destroyed_in)
      : destroyed(std::move(destroyed_in)) {}
  Sentinel(const Sentinel&) = delete;
  Sentinel& operator=(const Sentinel&) = delete;
  Sentinel(Sentinel&&) = delete;
  Sentinel& operator=(Sentinel&&) = delete;
  ~Sentinel() { destroyed->set_value(); }
  std::shared_ptr<std::promise<void>> destroyed;
};

// Opened once: by open(), or by a thread of its own after `fallback` (joined by the destructor),
// so that a worker blocked on it ends even when a test fails.
class Gate {
 public:
  explicit Gate(std::chrono::milliseconds fallback)
      : future_(promise_.get_future().share()), fallback_([this, fallback] {
          if (future_.wait_for(fallback) != std::future_status::ready) open();
        }) {}
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  Gate(Gate&&) = delete;
  Gate& operator=(Gate&&) = delete;
  ~Gate() { fallback_.join(); }

  // True if this call opened it.
  bool open() {
    if (opened_.exchange(true)) return false;
    promise_.set_value();
    return true;
  }
  [[nodiscard]] std::shared_future<void> future() const { return future_; }

 private:
  std::atomic<bool> opened_ = false;
  std::promise<void> promise_;
  std::shared_future<void> future_;
  std::thread fallback_;
};

// Blocks until `gate` opens, then returns a Sentinel.
asio::awaitable<std::shared_ptr<Sentinel>> run_gated(
    std::shared_future<void> gate, std::shared_ptr<std::promise<void>> destroyed) {
  auto blocking = [gate, destroyed] {
    gate.wait();
    return std::make_shared<Sentinel>(destroyed);
  };
  co_return co_await run_blocking(std::move(blocking));
}

asio::awaitable<int> add_blocking(int a, int b) {
  auto blocking = [a, b] { return a + b; };
  co_return co_await run_blocking(std::move(blocking));
}

asio::awaitable<int> throw_blocking() {
  auto blocking = []() -> int { throw std::runtime_error("from the worker"); };
  co_return co_await run_blocking(std::move(blocking));
}

TEST(RunBlockingTest, ReturnsTheValueAndRethrowsTheException) {
  asio::io_context io;
  Outcome<int> sum, failure;
  asio::co_spawn(io, add_blocking(2, 3), record(sum));
  asio::co_spawn(io, throw_blocking(), record(failure));
  io.run_for(10s);
  ASSERT_TRUE(sum.done && failure.done);
  EXPECT_FALSE(sum.error);
  EXPECT_EQ(*sum.value, 5);
  ASSERT_TRUE(failure.error);
  EXPECT_THROW(std::rethrow_exception(failure.error), std::runtime_error);
}

asio::awaitable<void> open_later(Gate& gate, bool& opened_here) {
  asio::steady_timer timer(co_await asio::this_coro::executor, 20ms);
  co_await timer.async_wait(asio::use_awaitable);
  opened_here = gate.open();
}

TEST(RunBlockingTest, LeavesTheExecutorFree) {
  // One thread: the worker waits for a gate that another coroutine on the same io_context opens
  // (if run_blocking held that thread, the gate's fallback would open it, after 2 s).
  asio::io_context io;
  Gate gate(2s);
  bool opened_here = false;
  auto destroyed = std::make_shared<std::promise<void>>();
  Outcome<std::shared_ptr<Sentinel>> outcome;
  asio::co_spawn(io, run_gated(gate.future(), destroyed), record(outcome));
  asio::co_spawn(io, open_later(gate, opened_here), asio::detached);
  io.run_for(10s);
  ASSERT_TRUE(outcome.done);
  EXPECT_FALSE(outcome.error);
  EXPECT_TRUE(opened_here) << "the executor was blocked while the worker ran";
}

TEST(RunBlockingTest, WaitsWithoutPolling) {
  asio::io_context io;
  Outcome<int> outcome;
  auto slow_sum = []() -> asio::awaitable<int> {
    auto blocking = [] {
      std::this_thread::sleep_for(300ms);
      return 1;
    };
    co_return co_await run_blocking(std::move(blocking));
  };
  asio::co_spawn(io, slow_sum(), record(outcome));
  const std::size_t handlers = io.run_for(10s);
  ASSERT_TRUE(outcome.done);
  // Start, wake-up, completion: a few handlers, not one every few milliseconds for 300 ms.
  EXPECT_LE(handlers, 5U);
}

TEST(RunBlockingTest, CancellationEndsTheWaitAndTheWorkerFinishesAlone) {
  auto destroyed = std::make_shared<std::promise<void>>();
  auto destroyed_future = destroyed->get_future();
  Gate gate(1s);
  const auto started = Clock::now();
  {
    asio::io_context io;
    Outcome<std::shared_ptr<Sentinel>> outcome;
    asio::cancellation_signal cancel;
    asio::co_spawn(io, run_gated(gate.future(), destroyed),
                   asio::bind_cancellation_slot(cancel.slot(), record(outcome)));
    io.poll();
    ASSERT_FALSE(outcome.done);
    cancel.emit(asio::cancellation_type::terminal);
    io.run_for(5s);
    ASSERT_TRUE(outcome.done);
    ASSERT_TRUE(outcome.error);
    try {
      std::rethrow_exception(outcome.error);
    } catch (const boost::system::system_error& error) {
      EXPECT_EQ(error.code(), asio::error::operation_aborted);
    }
  }
  EXPECT_LT(Clock::now() - started, 500ms) << "the cancelled wait waited for the worker";
  // The detached worker finishes when the gate opens, and destroys its unclaimed result itself.
  EXPECT_EQ(destroyed_future.wait_for(10s), std::future_status::ready);
}

TEST(RunBlockingTest, AFrameDestroyedWhileTheWorkerRunsIsNeverTouched) {
  auto destroyed = std::make_shared<std::promise<void>>();
  auto destroyed_future = destroyed->get_future();
  Gate gate(1s);
  const auto started = Clock::now();
  {
    asio::io_context io;
    asio::co_spawn(io, run_gated(gate.future(), destroyed), asio::detached);
    io.poll();
  }  // the frame goes with the io_context while the worker still blocks
  EXPECT_LT(Clock::now() - started, 500ms) << "destroying the frame waited for the worker";
  EXPECT_EQ(destroyed_future.wait_for(10s), std::future_status::ready);
}

// --- co_spawn and a cancellation that comes at once (Boost 1.81)
// ----------------------------------

asio::awaitable<void> start_and_wait(bool& started, asio::steady_timer& timer) {
  started = true;
  co_await timer.async_wait(asio::use_awaitable);
}

// What the places that cancel a coroutine they co_spawn rely on (the lifecycle manager's launch(),
// Watchdog::start(), the start-up hygiene's lock watch, the pending writes' flusher): co_spawn on
// a strand, called from a handler running on that strand, runs the coroutine up to its first wait
// before it returns, so that a cancellation emitted right after it, on the strand, reaches a
// coroutine that has started and ends it as cancelled.
TEST(CoSpawnCancellationTest, SpawnedFromItsOwnStrandTheCoroutineHasStartedWhenCoSpawnReturns) {
  asio::io_context io;
  auto strand = asio::make_strand(io.get_executor());
  asio::steady_timer timer(strand, 1h);
  asio::cancellation_signal cancel;
  bool started = false;
  bool started_when_spawned = false;
  std::optional<std::exception_ptr> ended;
  asio::dispatch(strand, [&] {
    asio::co_spawn(
        strand, start_and_wait(started, timer),
        asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e) { ended = e; }));
    started_when_spawned = started;
    cancel.emit(asio::cancellation_type::terminal);
  });
  EXPECT_NO_THROW(io.run_for(10s));
  EXPECT_TRUE(started_when_spawned);
  ASSERT_TRUE(ended.has_value()) << "the cancelled coroutine did not end";
  EXPECT_TRUE(*ended) << "the timer's wait was not cancelled";
}

// The hazard: spawned from outside the strand, the coroutine waits in the strand's queue, and a
// cancellation emitted on the strand before it first ran escapes from io_context::run() (outside
// the coroutine, and outside its completion handler). The places that spawn so (the pool's
// connect, pgrt-diag's steps) emit only once the coroutine has said it started.
TEST(CoSpawnCancellationTest, SpawnedFromOutsideACancellationBeforeTheFirstRunEscapesFromRun) {
#if BOOST_VERSION != 108100
  GTEST_SKIP() << "shown for Boost 1.81's co_spawn";
#endif
  asio::io_context io;
  auto strand = asio::make_strand(io.get_executor());
  asio::steady_timer timer(strand, 1h);
  asio::cancellation_signal cancel;
  bool started = false;
  bool ended = false;
  asio::post(strand, [&] { cancel.emit(asio::cancellation_type::terminal); });
  asio::co_spawn(strand, start_and_wait(started, timer),
                 asio::bind_cancellation_slot(cancel.slot(),
                                              [&](const std::exception_ptr&) { ended = true; }));
  EXPECT_THROW(io.run_for(10s), boost::system::system_error);
  EXPECT_FALSE(started);
  EXPECT_FALSE(ended);
}

}  // namespace
}  // namespace pgrt::detail::async
