// The lifecycle manager with fake components: dependency order, failures, deadlines, hooks.
#include <algorithm>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <functional>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <memory>
#include <optional>
#include <spdlog/spdlog.h>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <vector>

#include "pgrt/db/error.hpp"
#include "pgrt/lifecycle.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt::lifecycle {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using pgrt::client_errc;
using pgrt::Diagnostics;
using pgrt::Error;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Journal = std::vector<std::string>;  // touched on the manager's strand only

using pgrt::testing::sleep_for;

// Sleeps and cannot be cancelled: a component that hangs for real.
asio::awaitable<void> sleep_ignoring_cancellation(std::chrono::milliseconds duration) {
  asio::steady_timer timer(co_await asio::this_coro::executor, duration);
  co_await timer.async_wait(
      asio::bind_cancellation_slot(asio::cancellation_slot(), asio::use_awaitable));
}

struct Fake {
  std::string id;
  Journal* journal = nullptr;
  std::chrono::milliseconds start_delay{0};
  bool fail_start = false;
  bool hang_start = false;  // cancellable
  bool hang_stop = false;   // not cancellable
  bool throw_in_stop = false;
  std::function<void()> during_stop;  // called as stop() begins, which then takes stop_delay
  std::chrono::milliseconds stop_delay{0};

  [[nodiscard]] std::string name() const { return id; }
  asio::awaitable<void> start() {
    journal->push_back("begin " + id);
    if (start_delay.count() > 0) co_await sleep_for(start_delay);
    if (hang_start) co_await sleep_for(1h);
    if (fail_start) throw std::runtime_error(id + " cannot start");
    journal->push_back("start " + id);
  }
  asio::awaitable<void> stop() {
    if (during_stop) during_stop();
    if (stop_delay.count() > 0) co_await sleep_for(stop_delay);
    if (hang_stop) co_await sleep_ignoring_cancellation(1h);
    if (throw_in_stop) throw std::runtime_error(id + " cannot stop");
    journal->push_back("stop " + id);
  }
};

struct FakeWithIntake : Fake {
  void stop_intake() { journal->push_back("intake " + id); }
};

// Its stop_intake() throws what is no std::exception.
struct IntakeThrowingAnInt : Fake {
  void stop_intake() { throw 42; }
};

ManagerOptions test_options() {
  ManagerOptions options;
  options.handle_signals = false;
  options.shutdown_logging = false;  // later tests still log
  return options;
}

Fake fake(std::string id, Journal& journal) {
  Fake component;
  component.id = std::move(id);
  component.journal = &journal;
  return component;
}

std::ptrdiff_t position(const Journal& journal, const std::string& entry) {
  auto found = std::find(journal.begin(), journal.end(), entry);
  EXPECT_NE(found, journal.end()) << "missing: " << entry;
  return found - journal.begin();
}

bool contains(const Journal& journal, const std::string& entry) {
  return std::find(journal.begin(), journal.end(), entry) != journal.end();
}

TEST(LifecycleManager, StartsAlongDependenciesAndStopsInReverse) {
  Journal journal;
  std::vector<State> states;
  std::vector<std::string> hooks;
  Manager app(test_options());
  auto& database = app.add(fake("db", journal));
  auto& cache = app.add(fake("cache", journal), after(database));
  app.add(fake("api", journal), after(database, cache));
  app.add(fake("metrics", journal));
  boost::signals2::scoped_connection subscription =
      app.events().state_changed.connect([&](State state) { states.push_back(state); });
  app.on_starting([&] { hooks.emplace_back("starting"); });
  app.on_ready([&] {
    hooks.emplace_back(app.ready() ? "ready" : "ready but not ready()");
    app.request_stop();
  });
  app.on_stopping([&] { hooks.emplace_back(app.ready() ? "stopping but ready()" : "stopping"); });
  app.on_stopped([&] { hooks.emplace_back("stopped"); });

  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_EQ(app.state(), State::stopped);
  EXPECT_LT(position(journal, "start db"), position(journal, "begin cache"));
  EXPECT_LT(position(journal, "start cache"), position(journal, "begin api"));
  EXPECT_LT(position(journal, "stop api"), position(journal, "stop cache"));
  EXPECT_LT(position(journal, "stop cache"), position(journal, "stop db"));
  EXPECT_TRUE(contains(journal, "stop metrics"));
  EXPECT_THAT(hooks, ElementsAre("starting", "ready", "stopping", "stopped"));
  EXPECT_THAT(states,
              ElementsAre(State::starting, State::running, State::stopping, State::stopped));
}

// run() ends with spdlog::shutdown(), which leaves no default logger: spdlog::info() then
// dereferenced null, so a line logged after run() returned (pgrt's own destructors log: a
// PendingWrites destroyed with writes it never flushed) crashed the process. A plain stderr logger
// takes the default's place.
TEST(LifecycleManager, ALineLoggedAfterRunReturnsNeitherCrashesNorIsLost) {
  const auto previous = spdlog::default_logger();
  {
    ManagerOptions options = test_options();
    options.shutdown_logging = true;
    Manager app(options);
    app.on_ready([&] { app.request_stop(); });
    EXPECT_EQ(app.run(), exit_code::ok);
    ASSERT_NE(spdlog::default_logger_raw(), nullptr);
    ::testing::internal::CaptureStderr();
    spdlog::warn("a line after run() returned");
    spdlog::default_logger()->flush();
    EXPECT_THAT(::testing::internal::GetCapturedStderr(), HasSubstr("a line after run() returned"));
  }
  spdlog::set_default_logger(previous);
}

TEST(LifecycleManager, IndependentComponentsStartConcurrently) {
  Journal journal;
  Manager app(test_options());
  auto first = fake("first", journal);
  first.start_delay = 200ms;
  auto second = fake("second", journal);
  second.start_delay = 200ms;
  app.add(std::move(first));
  app.add(std::move(second));
  app.on_ready([&] { app.request_stop(); });
  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_LT(position(journal, "begin second"), position(journal, "start first"));
  EXPECT_LT(std::chrono::steady_clock::now() - started, 380ms);
}

TEST(LifecycleManager, RejectsACycleNamingItAndAnUnknownDependency) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal), after("c"));
  app.add(fake("b", journal), after("a"));
  try {
    app.add(fake("c", journal), after("b"));
    FAIL() << "a cycle was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), ::testing::EndsWith("cycle: c -> b -> a -> c"));
  }
  try {
    app.add(fake("self", journal), after("self"));
    FAIL() << "a component that depends on itself was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), ::testing::EndsWith("cycle: self -> self"));
  }
  EXPECT_THROW(app.add(fake("a", journal)), std::invalid_argument);  // duplicate name

  Manager unknown(test_options());
  unknown.add(fake("api", journal), after("nope"));
  try {
    (void)unknown.run();
    FAIL() << "an unknown dependency was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), HasSubstr("'api' depends on 'nope', which was never added"));
  }
  EXPECT_TRUE(journal.empty());
}

TEST(LifecycleManager, FailedStartStopsExactlyWhatStartedInReverse) {
  Journal journal;
  Manager app(test_options());
  for (int k = 0; k < 5; ++k) {
    auto component = fake("c" + std::to_string(k), journal);
    component.fail_start = k == 2;
    app.add(std::move(component), k == 0 ? After{} : after("c" + std::to_string(k - 1)));
  }
  bool ready = false;
  app.on_ready([&] { ready = true; });
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_FALSE(ready);
  EXPECT_EQ(app.state(), State::failed);
  EXPECT_EQ(app.stop_reason(), "a component failed to start");
  Journal stops;
  std::copy_if(journal.begin(), journal.end(), std::back_inserter(stops),
               [](const std::string& entry) { return entry.starts_with("stop "); });
  EXPECT_THAT(stops, ElementsAre("stop c1", "stop c0"));
  EXPECT_FALSE(contains(journal, "begin c3"));
}

// A stop requested while a failed start is rolled back must not turn the failure into exit 0.
TEST(LifecycleManager, StopRequestedDuringTheRollbackOfAFailedStartStillFails) {
  Journal journal;
  Manager app(test_options());
  auto first = fake("a", journal);
  first.during_stop = [&] { app.request_stop(exit_code::ok, "late request"); };
  first.stop_delay = 100ms;  // the request is handled while the rollback waits for this stop
  app.add(std::move(first));
  auto broken = fake("b", journal);
  broken.fail_start = true;
  app.add(std::move(broken), after("a"));
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_EQ(app.state(), State::failed);
  EXPECT_EQ(app.stop_reason(), "a component failed to start");
  EXPECT_TRUE(contains(journal, "stop a"));
}

// The same for a SIGTERM (a stop request of its own) and a failed start whose rollback first
// waits for a start still in flight to be cancelled.
TEST(LifecycleManager, SigtermDuringTheRollbackOfAFailedStartIsIgnored) {
  Journal journal;
  ManagerOptions options = test_options();
  options.handle_signals = true;
  Manager app(options);
  auto first = fake("a", journal);
  first.during_stop = [] { ::raise(SIGTERM); };
  first.stop_delay = 100ms;
  app.add(std::move(first));
  auto broken = fake("b", journal);
  broken.fail_start = true;
  broken.start_delay = 50ms;
  app.add(std::move(broken), after("a"));
  auto slow = fake("c", journal);
  slow.hang_start = true;  // cancelled when b fails
  app.add(std::move(slow), after("a"));
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_EQ(app.state(), State::failed);
  EXPECT_EQ(app.stop_reason(), "a component failed to start");
  EXPECT_TRUE(contains(journal, "stop a"));
  EXPECT_FALSE(contains(journal, "start c"));
}

TEST(LifecycleManager, StartTimeoutStillRunsTheStops) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal));
  auto slow = fake("b", journal);
  slow.hang_start = true;
  app.add(std::move(slow), after("a"), ComponentLimits{.start_timeout = 100ms});
  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_LT(std::chrono::steady_clock::now() - started, 3s);
  EXPECT_EQ(app.state(), State::failed);
  EXPECT_TRUE(contains(journal, "stop a"));
  EXPECT_FALSE(contains(journal, "stop b"));
}

TEST(LifecycleManager, HangingStopIsAbandonedAfterItsDeadlineWhileTheOthersStop) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal));
  auto stuck = fake("b", journal);
  stuck.hang_stop = true;
  app.add(std::move(stuck), after("a"), ComponentLimits{.stop_timeout = 200ms});
  app.add(fake("c", journal), after("b"));
  app.on_ready([&] { app.request_stop(); });
  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(app.run(), exit_code::failure);
  const auto took = std::chrono::steady_clock::now() - started;
  EXPECT_GE(took, 200ms);
  EXPECT_LT(took, 3s);
  EXPECT_LT(position(journal, "stop c"), position(journal, "stop a"));
  EXPECT_FALSE(contains(journal, "stop b"));
  EXPECT_EQ(app.state(), State::stopped);
}

TEST(LifecycleManager, ThrowingStopIsReportedAndTheOthersStillStop) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal));
  auto broken = fake("b", journal);
  broken.throw_in_stop = true;
  app.add(std::move(broken), after("a"));
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_TRUE(contains(journal, "stop a"));
}

// stop() (and start()) need not be coroutines: a component may be a thin wrapper that returns
// another object's awaitable, and such a call can throw before it returns one (a null handle, a
// closed object). The Component concept allows it, and the docs say "a stop that throws is
// logged" and "the others still run": every component after it in the stop order (here 'a', the
// pending writes of a real service, whose flush must not be skipped) is still stopped.
struct StopThrowsFromTheCall {
  std::string id;
  Journal* journal = nullptr;
  [[nodiscard]] std::string name() const { return id; }
  asio::awaitable<void> start() { return started(journal, id); }
  asio::awaitable<void> stop() {  // not a coroutine: forwards, and throws from the call
    throw std::runtime_error(id + ": no handle to stop");
  }
  static asio::awaitable<void> started(Journal* journal, std::string id) {
    journal->push_back("start " + id);
    co_return;
  }
};

TEST(LifecycleManager, AStopThatThrowsFromTheCallIsReportedAndTheOthersStillStop) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal));
  app.add(StopThrowsFromTheCall{"b", &journal}, after("a"));
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_TRUE(contains(journal, "start b"));
  EXPECT_TRUE(contains(journal, "stop a")) << "'a' was never stopped";
  EXPECT_EQ(app.state(), State::stopped);
}

// The same for start(): a start() that throws from the call is a failed start, whose rollback
// stops what had started ('a', the pool and pending writes of a real service), in reverse.
struct StartThrowsFromTheCall {
  std::string id;
  Journal* journal = nullptr;
  [[nodiscard]] std::string name() const { return id; }
  asio::awaitable<void> start() {  // not a coroutine: throws from the call
    throw std::runtime_error(id + ": no handle to start");
  }
  asio::awaitable<void> stop() { return StopThrowsFromTheCall::started(journal, "stop " + id); }
};

TEST(LifecycleManager, AStartThatThrowsFromTheCallStopsWhatHadStarted) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal));
  app.add(StartThrowsFromTheCall{"b", &journal}, after("a"));
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_TRUE(contains(journal, "start a"));
  EXPECT_TRUE(contains(journal, "stop a")) << "'a' started and was never stopped";
  EXPECT_EQ(app.state(), State::failed);
}

TEST(LifecycleManager, StopRequestedDuringStartCancelsTheStartsInFlight) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("a", journal));
  auto slow = fake("b", journal);
  slow.hang_start = true;
  app.add(std::move(slow), after("a"));
  asio::co_spawn(
      app.executor(),
      [&]() -> asio::awaitable<void> {
        co_await sleep_for(100ms);
        app.request_stop(exit_code::interrupted, "test interrupt");
      },
      asio::detached);
  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(app.run(), exit_code::interrupted);
  EXPECT_EQ(app.stop_reason(), "test interrupt");
  EXPECT_LT(std::chrono::steady_clock::now() - started, 3s);
  EXPECT_TRUE(contains(journal, "stop a"));
  EXPECT_FALSE(contains(journal, "start b"));
  EXPECT_FALSE(contains(journal, "stop b"));
  EXPECT_EQ(app.state(), State::stopped);
}

TEST(LifecycleManager, IntakeStopsEverywhereBeforeAnyStop) {
  Journal journal;
  Manager app(test_options());
  FakeWithIntake front;
  front.id = "front";
  front.journal = &journal;
  FakeWithIntake back = front;
  back.id = "back";
  app.add(std::move(back));
  app.add(std::move(front), after("back"));
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_LT(position(journal, "intake back"), position(journal, "stop front"));
  EXPECT_LT(position(journal, "intake front"), position(journal, "stop front"));
  EXPECT_LT(position(journal, "stop front"), position(journal, "stop back"));
}

// Whatever a stop_intake() or a state_changed callback throws, every component is still stopped.
TEST(LifecycleManager, AStopIntakeOrStateCallbackThrowingANonStdExceptionStillStopsEverything) {
  Journal journal;
  Manager app(test_options());
  app.add(fake("writes", journal));
  IntakeThrowingAnInt front;
  front.id = "front";
  front.journal = &journal;
  app.add(std::move(front), after("writes"));
  const boost::signals2::scoped_connection throwing =
      app.events().state_changed.connect([](State state) {
        if (state == State::stopping) throw 7;
      });
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_TRUE(contains(journal, "stop front"));
  EXPECT_TRUE(contains(journal, "stop writes"));
}

// A state_changed subscriber that throws hides no state from the subscribers connected after it,
// and the manager still starts, stops and reaches `stopped`. (With a plain signal the throw
// skipped every subscriber after it.)
TEST(LifecycleManager, AStateSubscriberThatThrowsHidesNoStateFromTheOthers) {
  Journal journal;
  std::vector<State> states;
  Manager app(test_options());
  app.add(fake("db", journal));
  const boost::signals2::scoped_connection throwing =
      app.events().state_changed.connect([](State) { throw std::runtime_error("subscriber"); });
  const boost::signals2::scoped_connection recording =
      app.events().state_changed.connect([&](State state) { states.push_back(state); });
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_EQ(app.state(), State::stopped);
  EXPECT_TRUE(contains(journal, "stop db"));
  EXPECT_THAT(states,
              ElementsAre(State::starting, State::running, State::stopping, State::stopped));
}

TEST(LifecycleManager, TwoThreadsRunTheComponentsAndStopTheSame) {
  Journal journal;
  ManagerOptions options = test_options();
  options.threads = 2;
  Manager app(options);
  app.add(fake("a", journal));
  app.add(fake("b", journal), after("a"));
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_LT(position(journal, "stop b"), position(journal, "stop a"));
}

TEST(LifecycleManager, ExitHandlersRunOnlyWithoutAGracefulStop) {
  Journal journal;
  int abandoned_runs = 0;
  {
    Manager never_run(test_options());
    never_run.on_exit([&] { ++abandoned_runs; });
  }
  EXPECT_EQ(abandoned_runs, 1);

  int graceful_runs = 0;
  {
    Manager app(test_options());
    app.add(fake("a", journal));
    app.on_exit([&] { ++graceful_runs; });
    app.on_ready([&] { app.request_stop(); });
    EXPECT_EQ(app.run(), exit_code::ok);
  }
  EXPECT_EQ(graceful_runs, 0);
}

// An abandoned stop may leave sockets open: the exit handlers (the pool's close_now()) run
// before run() returns, once.
TEST(LifecycleManager, ExitHandlersRunWhenAStopWasAbandoned) {
  Journal journal;
  int runs = 0;
  {
    Manager app(test_options());
    app.add(fake("pool", journal));
    auto stuck = fake("writer", journal);
    stuck.hang_stop = true;
    app.add(std::move(stuck), after("pool"), ComponentLimits{.stop_timeout = 100ms});
    app.on_exit([&] { ++runs; });
    app.on_ready([&] { app.request_stop(); });
    EXPECT_EQ(app.run(), exit_code::failure);
    EXPECT_EQ(runs, 1) << "the handlers run inside run(), after its threads are joined";
  }
  EXPECT_EQ(runs, 1) << "and not again when the manager is destroyed";
}

// The shutdown budget ran out before a stop could complete: that stop is abandoned too.
TEST(LifecycleManager, ExitHandlersRunWhenTheShutdownBudgetRanOut) {
  Journal journal;
  int runs = 0;
  ManagerOptions options = test_options();
  options.shutdown_budget = 150ms;
  Manager app(options);
  auto slow = fake("pool", journal);
  slow.stop_delay = 1s;  // would stop, given the time
  app.add(std::move(slow));
  app.on_exit([&] { ++runs; });
  app.on_ready([&] { app.request_stop(); });
  EXPECT_EQ(app.run(), exit_code::failure);
  EXPECT_FALSE(contains(journal, "stop pool"));
  EXPECT_EQ(runs, 1);
}

// Options that cannot work are refused when the manager is made, not discovered at the first
// shutdown: a hard deadline within the shutdown budget would let the watchdog _exit() (code 2, no
// exit handlers) while the stops are still within their budget; a negative duration would cut
// every start or stop at once.
TEST(LifecycleManager, OptionsThatCannotWorkAreRefusedAtConstruction) {
  const auto refusal = [](const ManagerOptions& options) -> std::string {
    try {
      Manager app(options);
    } catch (const std::invalid_argument& error) {
      return error.what();
    }
    return "";
  };
  ManagerOptions short_hard_deadline = test_options();
  short_hard_deadline.shutdown_budget = 30s;
  short_hard_deadline.hard_deadline = 5s;
  EXPECT_THAT(refusal(short_hard_deadline),
              HasSubstr("hard_deadline (5000 ms) must be longer than shutdown_budget (30000 ms)"));
  ManagerOptions equal = test_options();
  equal.hard_deadline = equal.shutdown_budget;
  EXPECT_THAT(refusal(equal), HasSubstr("must be longer than shutdown_budget"));
  ManagerOptions negative_stop = test_options();
  negative_stop.stop_timeout = -1ms;
  EXPECT_THAT(refusal(negative_stop), HasSubstr("stop_timeout is negative"));
  ManagerOptions negative_start_hard = test_options();
  negative_start_hard.start_hard_deadline = -1ms;
  EXPECT_THAT(refusal(negative_start_hard), HasSubstr("start_hard_deadline is negative"));
  EXPECT_EQ(refusal(test_options()), "");

  Journal journal;
  Manager app(test_options());
  EXPECT_THROW(app.add(fake("a", journal), {}, ComponentLimits{.stop_timeout = -1ms}),
               std::invalid_argument);
}

// A duration too long for the clock means no limit: a shutdown budget without one, and no hard
// deadline either (the watchdog then never ends the shutdown, so it cannot cut the stops), is a
// configuration that can work, and is taken.
TEST(LifecycleManager, NoShutdownBudgetAndNoHardDeadlineAreTaken) {
  ManagerOptions unlimited = test_options();
  unlimited.shutdown_budget = std::chrono::milliseconds::max();
  unlimited.hard_deadline = std::chrono::milliseconds::max();
  EXPECT_NO_THROW(Manager{unlimited});
  ManagerOptions forever = test_options();
  forever.shutdown_budget = std::chrono::hours(24 * 365 * 300);  // past the clock's range
  forever.hard_deadline = std::chrono::hours(24 * 365 * 300);
  EXPECT_NO_THROW(Manager{forever});
  ManagerOptions bounded = test_options();  // a real hard deadline still outlasts the budget
  bounded.shutdown_budget = std::chrono::milliseconds::max();
  bounded.hard_deadline = 35s;
  EXPECT_THROW(Manager{bounded}, std::invalid_argument);
}

// A start cancelled by a stop request may not have cleaned up after itself (its clean-up's own
// waits see the cancellation): the exit handlers run.
TEST(LifecycleManager, ExitHandlersRunWhenAStartWasCancelled) {
  Journal journal;
  int runs = 0;
  Manager app(test_options());
  auto waiting = fake("pool", journal);
  waiting.hang_start = true;
  app.add(std::move(waiting));
  app.on_exit([&] { ++runs; });
  app.on_starting([&] { app.request_stop(); });
  (void)app.run();
  EXPECT_FALSE(contains(journal, "start pool"));
  EXPECT_EQ(runs, 1);
}

// Blocks the manager's strand in start(): no timer and no signal handler can run.
struct BlockingStart {
  [[nodiscard]] std::string name() const { return "blocking"; }
  asio::awaitable<void> start() {
    std::this_thread::sleep_for(3s);
    co_return;
  }
  asio::awaitable<void> stop() { co_return; }
};

struct FailingStart {
  std::exception_ptr error;
  std::string name() const { return "failing"; }
  asio::awaitable<void> start() {
    std::rethrow_exception(error);
    co_return;
  }
  asio::awaitable<void> stop() { co_return; }
};

// A configuration error is not worth a restart: 78, so that Restart=on-failure can skip it.
TEST(LifecycleManagerTest, AStartThatFailsOnItsConfigurationExits78AndAnyOtherFailure1) {
  const std::vector<std::pair<std::exception_ptr, int>> cases = {
      {std::make_exception_ptr(Error(make_error_code(client_errc::invalid_config),
                                     Diagnostics{.message = "PGRT_X='y' is not valid"})),
       exit_code::config},
      // errno's EINVAL (a socket option, a path) is not a configuration error.
      {std::make_exception_ptr(
           std::system_error(std::make_error_code(std::errc::invalid_argument))),
       exit_code::failure},
      {std::make_exception_ptr(Error(make_error_code(client_errc::connect_failed), Diagnostics{})),
       exit_code::failure},
      {std::make_exception_ptr(std::runtime_error("boom")), exit_code::failure},
  };
  for (const auto& [error, expected] : cases) {
    Manager app(test_options());
    app.add(FailingStart{error});
    EXPECT_EQ(app.run(), expected);
    EXPECT_EQ(exit_code::for_error(error), expected);
  }
  EXPECT_EQ(exit_code::for_error(nullptr), exit_code::failure);
}

TEST(LifecycleManagerDeathTest, StartHardDeadlineEndsAStartThatBlocksItsThread) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ManagerOptions options = test_options();
        options.start_timeout = 100ms;  // a timer: it cannot fire while the strand is blocked
        options.start_hard_deadline = 300ms;
        Manager app(options);
        app.add(BlockingStart{});
        app.on_ready([&] { app.request_stop(); });  // without the watchdog: exit 100 after 3 s
        std::exit(app.run() + 100);  // NOLINT(concurrency-mt-unsafe): the child's result
      },
      ::testing::ExitedWithCode(exit_code::hard_deadline), "");
}

TEST(LifecycleManagerDeathTest, StartHardDeadlineIsDisarmedOnceEverythingStarted) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        Journal journal;
        ManagerOptions options = test_options();
        options.start_hard_deadline = 100ms;
        options.shutdown_budget = 4s;
        options.hard_deadline = 5s;
        Manager app(options);
        app.add(fake("a", journal));
        app.on_ready([&] {
          asio::co_spawn(
              app.executor(),
              [&]() -> asio::awaitable<void> {
                co_await sleep_for(400ms);  // well past the start's hard deadline
                app.request_stop();
              },
              asio::detached);
        });
        std::exit(app.run());  // NOLINT(concurrency-mt-unsafe): the child's result
      },
      ::testing::ExitedWithCode(exit_code::ok), "");
}

// A start that ends only after `delay`, whatever its cancellation.
struct SlowToCancelStart {
  std::chrono::milliseconds delay;
  [[nodiscard]] std::string name() const { return "slow-to-cancel"; }
  asio::awaitable<void> start() { co_await sleep_ignoring_cancellation(delay); }
  asio::awaitable<void> stop() { co_return; }
};

// The rollback of a failed start waits for the other starts (up to their stop deadline), then
// stops what started (within the shutdown budget): the watchdog must not cut it within those.
TEST(LifecycleManagerDeathTest, TheWatchdogLeavesARollbackWithinItsDeadlinesAlone) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        Journal journal;
        ManagerOptions options = test_options();
        options.stop_timeout = 2s;
        options.shutdown_budget = 2s;
        options.hard_deadline = 2200ms;
        Manager app(options);
        Fake flushing = fake("flushing", journal);
        flushing.stop_delay = 1800ms;  // within its stop deadline and the budget
        app.add(std::move(flushing));
        Fake failing = fake("failing", journal);
        failing.start_delay = 100ms;
        failing.fail_start = true;
        app.add(std::move(failing), after("flushing"));
        app.add(SlowToCancelStart{1000ms});  // done 0.9 s after the failure: within 2 s
        // The watchdog from the failure would _exit(2) at 2.3 s, mid-way through the stop.
        std::exit(app.run() + 100);  // NOLINT(concurrency-mt-unsafe): the child's result
      },
      ::testing::ExitedWithCode(exit_code::failure + 100), "");
}

// A stop still running at the budget's end is given a wind-down past the budget, but never into
// the hard deadline: with a hard_deadline the options accept (longer than the budget, by less than
// that wind-down), a stop that ignores its cancellation is abandoned in time for run() to return 1
// and run the exit handlers, not cut by the watchdog's _exit(2) with the handlers skipped.
TEST(LifecycleManagerDeathTest, TheWindDownPastTheBudgetLeavesTheHardDeadlineAlone) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        Journal journal;
        ManagerOptions options = test_options();
        options.shutdown_budget = 200ms;
        options.hard_deadline = 700ms;
        Manager app(options);
        Fake hanging = fake("hanging", journal);
        hanging.hang_stop = true;  // ignores its cancellation
        app.add(std::move(hanging));
        bool handled = false;
        app.on_exit([&] { handled = true; });
        app.on_ready([&] { app.request_stop(); });
        const int code = app.run();
        // NOLINTNEXTLINE(concurrency-mt-unsafe): the child's result
        std::exit(handled ? 100 + code : 50 + code);
      },
      ::testing::ExitedWithCode(100 + exit_code::failure), "");
}

// Durations too long for the clock (steady_clock counts nanoseconds: about 292 years) mean no
// limit: added to now() they would overflow into the past, and every start and stop would be cut
// at once, the watchdog _exit()ing at the start of the shutdown.
TEST(LifecycleManagerDeathTest, DeadlinesTooLongForTheClockMeanNoLimit) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        Journal journal;
        ManagerOptions options = test_options();
        options.start_timeout = std::chrono::milliseconds::max();
        options.stop_timeout = std::chrono::milliseconds::max();
        options.shutdown_budget = std::chrono::hours(1'000'000);  // 114 years
        options.hard_deadline = std::chrono::milliseconds::max();
        options.start_hard_deadline = std::chrono::milliseconds::max();
        Manager app(options);
        Fake slow = fake("slow", journal);
        slow.start_delay = 50ms;
        slow.stop_delay = 50ms;
        app.add(std::move(slow));
        app.on_ready([&] { app.request_stop(); });
        const int code = app.run();
        // NOLINTNEXTLINE(concurrency-mt-unsafe): the child's result
        std::exit(code == exit_code::ok && contains(journal, "start slow") &&
                          contains(journal, "stop slow")
                      ? 0
                      : 100 + code);
      },
      ::testing::ExitedWithCode(0), "");
}

}  // namespace
// Before run() nothing has started: Ctrl+C during the program's own set-up must end it as usual,
// not wait unseen for run(). From run() on the manager owns the signals.
TEST(ManagerSignals, TheSignalsAreTakenOverByRunNotByTheConstructor) {
  auto disposition = [](int number) {
    struct sigaction current {};
    EXPECT_EQ(::sigaction(number, nullptr, &current), 0);
    return current.sa_handler;
  };
  (void)std::signal(SIGINT, SIG_DFL);
  (void)std::signal(SIGTERM, SIG_IGN);  // (a background job's inherited disposition)
  ManagerOptions options = test_options();
  options.handle_signals = true;
  Manager app(options);
  EXPECT_EQ(disposition(SIGINT), SIG_DFL);
  EXPECT_EQ(disposition(SIGTERM), SIG_IGN);
  bool owned_while_running = false;
  app.on_ready([&] {
    owned_while_running = disposition(SIGINT) != SIG_DFL && disposition(SIGTERM) != SIG_DFL;
    app.request_stop();
  });
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_TRUE(owned_while_running);
  // Once run() returns nothing listens any more: what the signals did before comes back, and
  // Ctrl+C ends what main() does after it.
  EXPECT_EQ(disposition(SIGINT), SIG_DFL);
  EXPECT_EQ(disposition(SIGTERM), SIG_IGN);
  (void)std::signal(SIGTERM, SIG_DFL);
}

// SIGHUP (the terminal a service was started from closes) would end the process at once by its
// default action, accepted writes lost: with that default action it starts a graceful shutdown
// (129) instead, the stops all run, and a second one is ignored. One ignored before run()
// (nohup) stays ignored, and it is given back as it was.
TEST(ManagerSignalsDeathTest, SighupWithItsDefaultActionStartsAGracefulShutdown) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        (void)std::signal(SIGHUP, SIG_DFL);
        Journal journal;
        ManagerOptions options = test_options();
        options.handle_signals = true;
        Manager app(options);
        Fake flushing = fake("flushing", journal);
        flushing.stop_delay = 100ms;
        flushing.during_stop = [] { (void)::raise(SIGHUP); };  // during the shutdown: ignored
        app.add(std::move(flushing));
        app.on_ready([] { (void)::raise(SIGHUP); });
        const int code = app.run();
        // NOLINTNEXTLINE(concurrency-mt-unsafe): the child's result
        std::exit(code == exit_code::hangup && app.stop_reason() == "SIGHUP" &&
                          contains(journal, "stop flushing")
                      ? 0
                      : 100);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(
      {
        (void)std::signal(SIGHUP, SIG_IGN);  // nohup
        Journal journal;
        ManagerOptions options = test_options();
        options.handle_signals = true;
        Manager app(options);
        app.add(fake("a", journal));
        app.on_ready([&] {
          (void)::raise(SIGHUP);
          asio::co_spawn(
              app.executor(),
              [&]() -> asio::awaitable<void> {
                co_await sleep_for(100ms);
                app.request_stop(exit_code::ok, "after the ignored SIGHUP");
              },
              asio::detached);
        });
        const int code = app.run();
        struct sigaction after {};
        (void)::sigaction(SIGHUP, nullptr, &after);
        // NOLINTNEXTLINE(concurrency-mt-unsafe): the child's result
        std::exit(code == exit_code::ok && app.stop_reason() == "after the ignored SIGHUP" &&
                          after.sa_handler == SIG_IGN
                      ? 0
                      : 100);
      },
      ::testing::ExitedWithCode(0), "");
}

// A disposition the program sets while run() runs (SIGHUP ignored once it has detached from its
// terminal, say) is the program's choice, and stays once run() has returned: giving back what the
// signal did before run() must not undo it, nor asio's reset to the default.
TEST(ManagerSignals, ADispositionTheProgramSetDuringRunStaysAfterIt) {
  auto disposition = [](int number) {
    struct sigaction current {};
    EXPECT_EQ(::sigaction(number, nullptr, &current), 0);
    return current.sa_handler;
  };
  (void)std::signal(SIGHUP, SIG_DFL);
  (void)std::signal(SIGTERM, SIG_DFL);
  ManagerOptions options = test_options();
  options.handle_signals = true;
  Manager app(options);
  app.on_ready([&] {
    (void)std::signal(SIGHUP, SIG_IGN);
    (void)std::signal(SIGTERM, SIG_IGN);
    app.request_stop();
  });
  EXPECT_EQ(app.run(), exit_code::ok);
  EXPECT_EQ(disposition(SIGHUP), SIG_IGN);
  EXPECT_EQ(disposition(SIGTERM), SIG_IGN);
  (void)std::signal(SIGHUP, SIG_DFL);
  (void)std::signal(SIGTERM, SIG_DFL);
}

// A signal_set the program makes of its own while run() runs keeps its signal once run() has
// returned: giving back what the signal did before run() must not take it from that set.
TEST(ManagerSignals, ASignalSetTheProgramMadeDuringRunKeepsItsSignalAfterIt) {
  (void)std::signal(SIGTERM, SIG_DFL);
  asio::io_context own_io;
  std::optional<asio::signal_set> own;
  ManagerOptions options = test_options();
  options.handle_signals = true;
  Manager app(options);
  app.on_ready([&] {
    own.emplace(own_io, SIGTERM);
    app.request_stop();
  });
  EXPECT_EQ(app.run(), exit_code::ok);
  ASSERT_TRUE(own.has_value());
  int received = 0;
  own->async_wait([&](boost::system::error_code error, int number) {
    if (!error) received = number;
  });
  // Without the set, SIGTERM's default action would end this test binary here.
  ASSERT_EQ(::raise(SIGTERM), 0);
  own_io.run_for(2s);
  EXPECT_EQ(received, SIGTERM);
  own.reset();
  (void)std::signal(SIGTERM, SIG_DFL);
}

// With handle_signals, a write to a pipe whose reader is gone (a log shipper restarting under
// stderr) fails with EPIPE instead of killing the process by SIGPIPE before any shutdown; a
// SIGPIPE handler of the program's own is kept.
TEST(ManagerSignals, SigpipeIsIgnoredUnlessTheProgramHandlesIt) {
  struct sigaction before {};
  ASSERT_EQ(::sigaction(SIGPIPE, nullptr, &before), 0);
  (void)std::signal(SIGPIPE, SIG_DFL);
  {
    ManagerOptions options = test_options();
    options.handle_signals = true;
    Manager app(options);
    struct sigaction now {};
    ASSERT_EQ(::sigaction(SIGPIPE, nullptr, &now), 0);
    EXPECT_EQ(now.sa_handler, SIG_IGN);
    int ends[2];
    ASSERT_EQ(::pipe(ends), 0);
    ::close(ends[0]);
    errno = 0;
    EXPECT_EQ(::write(ends[1], "x", 1), -1);
    EXPECT_EQ(errno, EPIPE);
    ::close(ends[1]);
  }
  static void (*const own)(int) = [](int) {};
  (void)std::signal(SIGPIPE, own);
  {
    ManagerOptions options = test_options();
    options.handle_signals = true;
    Manager app(options);
    struct sigaction now {};
    ASSERT_EQ(::sigaction(SIGPIPE, nullptr, &now), 0);
    EXPECT_EQ(now.sa_handler, own);
  }
  ASSERT_EQ(::sigaction(SIGPIPE, &before, nullptr), 0);
}

}  // namespace pgrt::lifecycle
