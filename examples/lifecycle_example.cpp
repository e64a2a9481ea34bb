// A minimal service main(): the lifecycle manager, two components of its own (one depending on
// the other), a supervised child process and the hooks. No database. Runs until Ctrl+C or
// SIGTERM, or for --stop-after-ms N milliseconds. docs/lifecycle.md and docs/operations.md quote
// it.
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <spdlog/spdlog.h>
#include <string>
#include <string_view>

#include <pgrt/lifecycle.hpp>

namespace asio = boost::asio;
using namespace std::chrono_literals;

asio::awaitable<void> sleep_for(std::chrono::milliseconds duration) {
  asio::steady_timer timer(co_await asio::this_coro::executor, duration);
  co_await timer.async_wait(asio::use_awaitable);
}

// A component is anything with a name and awaitable start() and stop().
class Clock {
 public:
  explicit Clock(asio::any_io_executor executor) : executor_(std::move(executor)) {}
  std::string name() const { return "clock"; }

  asio::awaitable<void> start() {
    running_ = true;
    asio::co_spawn(executor_, tick(), asio::detached);
    co_return;
  }
  asio::awaitable<void> stop() {
    running_ = false;
    while (ticking_) co_await sleep_for(1ms);  // the loop sees the flag within one tick
  }
  long ticks() const { return ticks_; }

 private:
  asio::awaitable<void> tick() {
    ticking_ = true;
    while (running_) {
      co_await sleep_for(10ms);
      ++ticks_;
    }
    ticking_ = false;
  }
  asio::any_io_executor executor_;
  std::atomic<bool> running_{false};
  std::atomic<bool> ticking_{false};
  std::atomic<long> ticks_{0};
};

// Takes work from outside: stop_intake() is called on every component as soon as a shutdown
// begins, before any stop(). Here the work is a greeting every 50 ms, which ends at once.
class Greeter {
 public:
  explicit Greeter(const Clock& clock) : clock_(clock) {}
  std::string name() const { return "greeter"; }
  asio::awaitable<void> start() {
    spdlog::info("greeter: the clock has ticked {} times", clock_.ticks());
    greeting_ = true;
    asio::co_spawn(co_await asio::this_coro::executor, greet(),
                   [this](const std::exception_ptr& error) {
                     if (error) spdlog::error("greeter: the greetings ended with an exception");
                     greeting_ = false;
                   });
  }
  void stop_intake() { accepting_ = false; }
  asio::awaitable<void> stop() {
    accepting_ = false;  // also when stop_intake() was not called (a failed start)
    while (greeting_) co_await sleep_for(1ms);
    spdlog::info("greeter: {} greetings; the clock ticked {} times", greetings_.load(),
                 clock_.ticks());
  }

 private:
  asio::awaitable<void> greet() {
    while (accepting_) {
      spdlog::debug("greeter: hello at tick {}", clock_.ticks());
      ++greetings_;
      co_await sleep_for(50ms);
    }
  }
  const Clock& clock_;
  std::atomic<bool> accepting_{true};
  std::atomic<bool> greeting_{false};
  std::atomic<long> greetings_{0};
};

int main(int argc, char** argv) {
  std::chrono::milliseconds stop_after{0};
  if (argc == 3 && std::string_view(argv[1]) == "--stop-after-ms") {
    stop_after = std::chrono::milliseconds(std::strtol(argv[2], nullptr, 10));
  }

  pgrt::lifecycle::Manager app({.name = "example", .threads = 2});
  auto& clock = app.add(std::make_shared<Clock>(app.executor()));
  app.add(std::make_shared<Greeter>(clock), pgrt::lifecycle::after(clock),
          {.stop_timeout = std::chrono::seconds(2)});
  // A supervised child process: in its own process group, killed with this process even by
  // SIGKILL, restarted with backoff if it fails, SIGTERM then SIGKILL when the app stops.
  app.add(pgrt::lifecycle::ChildProcess({
      .name = "sidecar",
      .argv = {"/bin/sh", "-c", "while sleep 1; do :; done"},
      .env = {{"SIDECAR_MODE", "example"}},  // added to this process's environment
      .restart = pgrt::lifecycle::RestartPolicy::on_failure,
      .backoff_initial = std::chrono::milliseconds(500),
      .backoff_max = std::chrono::seconds(30),
      .max_restarts = 5,                              // within restart_window (10 min)
      .stop_grace = std::chrono::milliseconds(1500),  // + kill_wait within stop_timeout
  }));

  app.on_starting([&] { spdlog::info("starting (state() = {})", to_string(app.state())); });
  app.on_ready([&] { spdlog::info("ready (ready() = {}); Ctrl+C to stop", app.ready()); });
  app.on_stopping([&] { spdlog::info("stopping: {}", app.stop_reason()); });
  app.on_stopped([] { spdlog::info("stopped"); });
  boost::signals2::scoped_connection states = app.events().state_changed.connect(
      [](pgrt::lifecycle::State state) { spdlog::debug("state: {}", to_string(state)); });

  if (stop_after.count() > 0) {
    asio::co_spawn(
        app.executor(),
        [&app, stop_after]() -> asio::awaitable<void> {
          co_await sleep_for(stop_after);
          app.request_stop(pgrt::lifecycle::exit_code::ok, "--stop-after-ms");
        },
        asio::detached);
  }
  return app.run();  // 0; 130 after Ctrl+C; 78 for a malformed configuration; 1 otherwise
}
