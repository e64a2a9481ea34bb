#include "pgrt/lifecycle/manager.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <unistd.h>

#include "await_helpers.hpp"

namespace pgrt::lifecycle {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

std::string describe(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& exception) {
    return exception.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

void flush_logs() noexcept {
  try {
    spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& logger) { logger->flush(); });
  } catch (...) {  // NOLINT(bugprone-empty-catch): best effort on the way out
  }
}

// Logs, flushes and ends the process now, without atexit handlers or destructors. The line is
// written by a thread of its own, waited for at most a moment: logging can block (a sink's mutex
// held by a thread stuck writing into a pipe nobody reads), and the exit must not block with it.
[[noreturn]] void exit_now(int code, const char* why) noexcept {
  struct LastWords {
    std::mutex mutex;
    std::condition_variable written;
    bool done = false;
  };
  try {
    auto words = std::make_shared<LastWords>();
    std::thread([words, code, why] {
      try {
        spdlog::error("{}; exiting now with code {}", why, code);
      } catch (...) {  // NOLINT(bugprone-empty-catch): the exit matters more than the line
      }
      flush_logs();
      std::fflush(stderr);
      {
        std::lock_guard lock(words->mutex);
        words->done = true;
      }
      words->written.notify_all();
    }).detach();
    std::unique_lock lock(words->mutex);
    words->written.wait_for(lock, std::chrono::milliseconds(500), [&] { return words->done; });
  } catch (...) {  // NOLINT(bugprone-empty-catch): no thread or no memory: exit without the line
  }
  ::_exit(code);
}

}  // namespace

// --- the process-wide atexit registry ------------------------------------------------------------

namespace {
std::mutex registry_mutex;
std::vector<Manager::Impl*>& live_managers() {
  static std::vector<Manager::Impl*> managers;
  return managers;
}
void run_exit_handlers_at_exit();

// An io_context whose services can be shut down before it is destroyed. Shutting down destroys
// every pending operation and coroutine frame while the services themselves still exist, so that
// objects which hold its executors (a cancellation slot's handler holds a strand executor) can be
// destroyed in between. The io_context's destructor shuts down again (a no-op) and then destroys
// the services.
class ShutdownableIoContext : public asio::io_context {
 public:
  using asio::io_context::io_context;
  void destroy_pending_work() { shutdown(); }
};
}  // namespace

struct Manager::Impl {
  enum class Status { pending, starting, started, start_failed, stopping, stopped, abandoned };

  struct Node {
    Node(AnyComponent component_in, std::string name_in, std::vector<std::string> dependencies_in,
         ComponentLimits limits_in)
        : component(std::move(component_in)),
          name(std::move(name_in)),
          dependencies(std::move(dependencies_in)),
          limits(limits_in) {}
    AnyComponent component;
    std::string name;
    std::vector<std::string> dependencies;
    ComponentLimits limits;
    Status status = Status::pending;
    asio::cancellation_signal cancel;
    bool cancel_emitted = false;
    Clock::time_point deadline{};
    Clock::time_point began{};
    bool done = false;  // the current start()/stop() completed
    std::exception_ptr error;
  };

  explicit Impl(ManagerOptions options_in)
      : options(std::move(options_in)),
        strand(asio::make_strand(io.get_executor())),
        wakeup(strand),
        stop_request_timer(strand, Clock::time_point::max()) {
    if (options.threads == 0) throw std::invalid_argument("ManagerOptions::threads must be >= 1");
    check_durations();
    events.state_changed.set_combiner(pgrt::detail::EverySubscriber{options.name});
    if (options.handle_signals) {
      // A write to a pipe or socket whose reader is gone (a log shipper restarting under stderr)
      // would otherwise kill the process by SIGPIPE: no shutdown, pending writes lost without a
      // word. Ignored, such a write fails with EPIPE instead. A handler of the program's own is
      // left alone.
      struct sigaction current {};
      if (::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
        struct sigaction ignore {};
        ignore.sa_handler = SIG_IGN;
        ::sigemptyset(&ignore.sa_mask);
        (void)::sigaction(SIGPIPE, &ignore, nullptr);
      }
    }
    std::lock_guard lock(registry_mutex);
    // The registry is constructed before the handler is registered, so that it is destroyed
    // after the handler has run (atexit handlers and static destructors run in reverse order).
    auto& managers = live_managers();
    // spdlog's registry too: the handler logs.
    (void)spdlog::default_logger_raw();
    static const bool registered = std::atexit(run_exit_handlers_at_exit) == 0;
    if (!registered) spdlog::warn("{}: could not register the atexit handler", options.name);
    managers.push_back(this);
  }

  ~Impl() {
    run_exit_handlers("the manager is destroyed without a graceful stop");
    {
      std::lock_guard lock(registry_mutex);
      auto& managers = live_managers();
      managers.erase(std::remove(managers.begin(), managers.end(), this), managers.end());
    }
    // In this order: abandoned operations (their frames may refer to the nodes' components) are
    // destroyed first, then the nodes, whose cancellation signals hold handlers with strand
    // executors, while the strand service still exists; the io_context's services go last.
    io.destroy_pending_work();
    by_name.clear();
    nodes.clear();
  }

  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  Impl(Impl&&) = delete;
  Impl& operator=(Impl&&) = delete;

  // Declared before the io_context; the destructor destroys the pending work, then the nodes,
  // then (as members) the io_context: see ~Impl().
  std::vector<std::unique_ptr<Node>> nodes;
  std::map<std::string, Node*, std::less<>> by_name;
  std::vector<std::function<void()>> starting_hooks, ready_hooks, stopping_hooks, stopped_hooks;
  std::vector<std::function<void()>> exit_handlers;
  ManagerEvents events;
  const ManagerOptions options;

  ShutdownableIoContext io;
  asio::strand<asio::io_context::executor_type> strand;
  asio::steady_timer wakeup;              // an orchestrator waits on it; completions cancel it
  asio::steady_timer stop_request_timer;  // cancelled by a stop request
  std::optional<asio::signal_set> signals;
  // What SIGINT, SIGTERM, SIGQUIT and SIGHUP did before run() took them (restored once it is
  // done; SIGHUP is taken only when it had its default action).
  std::array<struct sigaction, 4> signals_before{};
  // What they did once run() had taken them: one that no longer does that when run() is done was
  // set by the program meanwhile, and keeps what the program chose.
  std::array<struct sigaction, 4> signals_taken{};
  static constexpr std::array<int, 4> owned_signals{SIGINT, SIGTERM, SIGQUIT, SIGHUP};

  std::atomic<State> current_state{State::created};
  std::atomic<bool> is_ready{false};
  std::atomic<bool> graceful_done{false};
  bool every_stop_ran = false;  // set by live() on the strand, read by run() after the join
  std::atomic<bool> exit_handlers_ran{false};
  bool ran = false;

  mutable std::mutex reason_mutex;
  std::string reason_text;
  void set_stop_reason(std::string reason) {
    std::lock_guard lock(reason_mutex);
    if (reason_text.empty()) reason_text = std::move(reason);
  }
  std::string stop_reason() const {
    std::lock_guard lock(reason_mutex);
    return reason_text;
  }

  // Strand-only state.
  bool stop_requested = false;
  // A component failed to start (threw or timed out, not cancelled by us): the rollback is under
  // way and run() returns exit_code::failure, whatever stop request comes meanwhile.
  bool start_failed = false;
  int start_failure_code = exit_code::failure;  // of the first start failure
  bool shutting_down = false;
  int requested_code = exit_code::ok;

  // The watchdog: armed for the start-up (start_hard_deadline) and for the shutdown.
  std::thread watchdog;
  std::mutex watchdog_mutex;
  std::condition_variable watchdog_wakeup;
  bool watchdog_released = false;
  std::optional<Clock::time_point> watchdog_deadline;  // none: disarmed
  const char* watchdog_reason = "";

  // Options that cannot work together are refused at construction, rather than turning into a
  // surprise at the first shutdown.
  void check_durations() const {
    const auto refuse = [](const std::string& what) {
      throw std::invalid_argument("ManagerOptions::" + what);
    };
    for (auto [duration, label] : {std::pair{options.start_timeout, "start_timeout"},
                                   {options.stop_timeout, "stop_timeout"},
                                   {options.shutdown_budget, "shutdown_budget"},
                                   {options.hard_deadline, "hard_deadline"}}) {
      if (duration.count() < 0) refuse(std::string(label) + " is negative");
    }
    if (options.start_hard_deadline && options.start_hard_deadline->count() < 0) {
      refuse("start_hard_deadline is negative");
    }
    // The watchdog would _exit() in the middle of the stops' budget: a stop within its deadline
    // cut with exit code 2, the exit handlers skipped, a pending write's loss unreported. (Not
    // with no hard deadline, one too long for the clock: then no budget, as long, is fine too.)
    const bool no_hard_deadline =
        deadline_after(Clock::now(), options.hard_deadline) == Clock::time_point::max();
    if (!no_hard_deadline && options.hard_deadline <= options.shutdown_budget) {
      refuse("hard_deadline (" + std::to_string(options.hard_deadline.count()) +
             " ms) must be longer than shutdown_budget (" +
             std::to_string(options.shutdown_budget.count()) +
             " ms): the watchdog would end the shutdown before the stops' budget is spent");
    }
  }

  // --- adding ----------------------------------------------------------------------------------

  void add(AnyComponent component, std::vector<std::string> dependencies, ComponentLimits limits) {
    if (ran) throw std::logic_error("components must be added before Manager::run()");
    std::string name = component.name();
    if (name.empty()) throw std::invalid_argument("a component's name must not be empty");
    if ((limits.start_timeout && limits.start_timeout->count() < 0) ||
        (limits.stop_timeout && limits.stop_timeout->count() < 0)) {
      throw std::invalid_argument("component '" + name + "': a negative start or stop timeout");
    }
    if (by_name.contains(name)) {
      throw std::invalid_argument("a component named '" + name + "' was already added");
    }
    // A cycle through the new component: one of its dependencies reaches it again.
    for (const auto& dependency : dependencies) {
      std::vector<std::string> path{name};
      if (reaches(dependency, name, path)) {
        // (The path ends where it began: at the new component.)
        std::string cycle = path.front();
        for (auto step = path.begin() + 1; step != path.end(); ++step) cycle += " -> " + *step;
        throw std::invalid_argument("adding component '" + name +
                                    "' would create a dependency cycle: " + cycle);
      }
    }
    auto node = std::make_unique<Node>(std::move(component), name, std::move(dependencies), limits);
    by_name.emplace(name, node.get());
    nodes.push_back(std::move(node));
  }

  // Whether `from` depends (transitively) on `target`, treating `target` as already added; `path`
  // gets the chain.
  bool reaches(const std::string& from, const std::string& target,
               std::vector<std::string>& path) const {
    path.push_back(from);
    if (from == target) return true;
    if (auto found = by_name.find(from); found != by_name.end()) {
      for (const auto& next : found->second->dependencies) {
        if (std::find(path.begin(), path.end(), next) != path.end() && next != target) continue;
        if (reaches(next, target, path)) return true;
      }
    }
    path.pop_back();
    return false;
  }

  void check_dependencies() const {
    for (const auto& node : nodes) {
      for (const auto& dependency : node->dependencies) {
        if (!by_name.contains(dependency)) {
          throw std::invalid_argument("component '" + node->name + "' depends on '" + dependency +
                                      "', which was never added");
        }
      }
    }
  }

  // --- state and hooks -------------------------------------------------------------------------

  void set_state(State state) {
    current_state = state;
    spdlog::info("{}: {}", options.name, to_string(state));
    try {
      events.state_changed(state);
    } catch (...) {  // (the combiner catches what subscribers throw; this is for bad_alloc)
      spdlog::error("{}: a state_changed callback threw: {}", options.name,
                    describe(std::current_exception()));
    }
  }

  void run_hooks(const std::vector<std::function<void()>>& hooks, const char* which) {
    for (const auto& hook : hooks) {
      try {
        hook();
      } catch (const std::exception& error) {
        spdlog::error("{}: an {} hook threw: {}", options.name, which, error.what());
      } catch (...) {
        spdlog::error("{}: an {} hook threw", options.name, which);
      }
    }
  }

  // --- stop requests and signals (strand only) -------------------------------------------------

  void on_stop_request(int code, std::string reason) {
    if (stop_requested) return;
    if (start_failed) {
      spdlog::info("{}: {}: ignored, the shutdown after a failed start is under way", options.name,
                   reason);
      return;
    }
    stop_requested = true;
    requested_code = code;
    set_stop_reason(std::move(reason));
    spdlog::info("{}: stopping ({})", options.name, stop_reason());
    stop_request_timer.cancel();
    wakeup.cancel();
  }

  asio::awaitable<void> handle_signals() {
    for (;;) {
      auto [error, number] = co_await signals->async_wait(no_throw);
      if (error) co_return;
      if (number == SIGQUIT) exit_now(exit_code::quit, "SIGQUIT");
      if (number == SIGINT && (stop_requested || start_failed || shutting_down)) {
        exit_now(exit_code::interrupted, "a second SIGINT during the shutdown");
      }
      const bool interrupt = number == SIGINT;
      const bool hangup = number == SIGHUP;
      const char* name = interrupt ? "SIGINT" : hangup ? "SIGHUP" : "SIGTERM";
      if (stop_requested || start_failed || shutting_down) {  // (SIGTERM or SIGHUP)
        spdlog::warn("{}: {}: ignored, the graceful shutdown is under way", options.name,
                     hangup ? "SIGHUP during the shutdown" : "SIGTERM again");
        continue;
      }
      spdlog::info("{}: {}: shutting down gracefully{}", options.name, name,
                   interrupt ? " (Ctrl+C again exits at once)" : "");
      on_stop_request(interrupt ? exit_code::interrupted
                      : hangup  ? exit_code::hangup
                                : exit_code::ok,
                      name);
    }
  }

  // --- running components (strand only) -------------------------------------------------------

  // Runs the node's start() or stop() with per-operation cancellation; completion marks it done
  // and wakes the orchestrator.
  void launch(Node& node, asio::awaitable<void> operation, milliseconds limit) {
    node.done = false;
    node.error = nullptr;
    node.cancel_emitted = false;
    node.began = Clock::now();
    node.deadline = deadline_after(node.began, limit);
    asio::co_spawn(strand, std::move(operation),
                   asio::bind_cancellation_slot(node.cancel.slot(),
                                                [this, &node](const std::exception_ptr& error) {
                                                  node.done = true;
                                                  node.error = error;
                                                  wakeup.cancel();
                                                }));
  }

  void cancel(Node& node) {
    if (node.cancel_emitted) return;
    node.cancel_emitted = true;
    node.cancel.emit(asio::cancellation_type::terminal);
  }

  // Waits until a completion, a stop request or `until`.
  asio::awaitable<void> wait_until(Clock::time_point until) {
    wakeup.expires_at(until);
    co_await wakeup.async_wait(no_throw);
  }

  [[nodiscard]] bool dependencies_started(const Node& node) const {
    return std::all_of(
        node.dependencies.begin(), node.dependencies.end(),
        [&](const std::string& name) { return by_name.at(name)->status == Status::started; });
  }

  milliseconds start_limit(const Node& node) const {
    return node.limits.start_timeout.value_or(options.start_timeout);
  }
  milliseconds stop_limit(const Node& node) const {
    return node.limits.stop_timeout.value_or(options.stop_timeout);
  }

  // The first start failure begins the shutdown: the reason is fixed, and the watchdog is armed
  // for the rollback: the other starts are cancelled and waited for (each up to its stop
  // deadline), then live() re-arms it for the stops (shutdown_budget) as any shutdown.
  void note_start_failure(const std::exception_ptr& error = nullptr) {
    if (start_failed) return;
    start_failed = true;
    start_failure_code = exit_code::for_error(error);
    set_stop_reason("a component failed to start");
    milliseconds longest_cancel{0};
    for (const auto& node : nodes) {
      if (node->status == Status::starting)
        longest_cancel = std::max(longest_cancel, stop_limit(*node));
    }
    arm_shutdown_watchdog(deadline_after(Clock::now(), longest_cancel));
  }

  // Starts every component along the DAG. True if all started. On a failure or a stop request it
  // cancels the starts in flight and waits for them (each at most its stop deadline).
  asio::awaitable<bool> start_all() {
    bool failed = false;
    for (;;) {
      const auto now = Clock::now();
      std::size_t in_flight = 0;
      for (auto& node : nodes) {
        if (node->status != Status::starting) continue;
        if (node->done) {
          if (node->error) {
            node->status = Status::start_failed;
            if (!node->cancel_emitted) {
              failed = true;
              note_start_failure(node->error);
              spdlog::error("{}: component '{}' failed to start: {}", options.name, node->name,
                            describe(node->error));
            } else {
              spdlog::info("{}: the start of '{}' was cancelled", options.name, node->name);
            }
          } else {
            node->status = Status::started;
            spdlog::info("{}: started '{}' in {} ms", options.name, node->name,
                         elapsed_ms(node->began).count());
          }
        } else if (now >= node->deadline) {
          if (!node->cancel_emitted) {
            failed = true;
            note_start_failure();
            spdlog::error("{}: component '{}' did not start within {} ms", options.name, node->name,
                          start_limit(*node).count());
            cancel(*node);
            node->deadline = deadline_after(now, stop_limit(*node));
            ++in_flight;
          } else {
            node->status = Status::abandoned;
            spdlog::error("{}: the start of '{}' ignored its cancellation; abandoned", options.name,
                          node->name);
          }
        } else {
          ++in_flight;
        }
      }
      const bool aborting = failed || stop_requested;
      if (aborting) {
        for (auto& node : nodes) {
          if (node->status == Status::starting && !node->cancel_emitted) {
            cancel(*node);
            node->deadline = deadline_after(now, stop_limit(*node));
          }
        }
      } else {
        for (auto& node : nodes) {
          if (node->status == Status::pending && dependencies_started(*node)) {
            node->status = Status::starting;
            spdlog::info("{}: starting '{}'", options.name, node->name);
            launch(*node, node->component.start(), start_limit(*node));
            ++in_flight;
          }
        }
      }
      const bool all_started = std::all_of(nodes.begin(), nodes.end(), [](const auto& node) {
        return node->status == Status::started;
      });
      if (all_started) co_return true;
      if (in_flight == 0) co_return false;  // aborting, or nothing could start (cannot happen)
      auto earliest = Clock::time_point::max();
      for (auto& node : nodes) {
        if (node->status == Status::starting) earliest = std::min(earliest, node->deadline);
      }
      co_await wait_until(earliest);
    }
  }

  // Whether every started component that depends on `node` has stopped (or was abandoned).
  [[nodiscard]] bool dependents_stopped(const Node& node) const {
    for (const auto& other : nodes) {
      const bool depends = std::find(other->dependencies.begin(), other->dependencies.end(),
                                     node.name) != other->dependencies.end();
      if (depends && (other->status == Status::started || other->status == Status::stopping)) {
        return false;
      }
    }
    return true;
  }

  // How long a stop past its deadline has, once cancelled, to wind down before it is abandoned.
  static constexpr milliseconds stop_wind_down{1'000};

  // Stops every started component along the reverse DAG. True if all stopped cleanly.
  asio::awaitable<bool> stop_all() {
    const auto budget_end = deadline_after(Clock::now(), options.shutdown_budget);
    // A cancelled stop winds down by then at the latest: the budget's end plus one wind-down, but
    // no more than half the time the hard deadline leaves after the budget (the other half is the
    // exit handlers'): the watchdog must not _exit() in a wind-down the manager gave.
    const auto past_budget =
        std::min(stop_wind_down, (options.hard_deadline - options.shutdown_budget) / 2);
    const auto wind_down_end = deadline_after(budget_end, past_budget);
    bool clean = true;
    for (;;) {
      const auto now = Clock::now();
      std::size_t in_flight = 0;
      for (auto& node : nodes) {
        if (node->status != Status::stopping) continue;
        if (node->done) {
          node->status = Status::stopped;
          if (node->error) {
            clean = false;
            spdlog::error("{}: component '{}' failed to stop: {}", options.name, node->name,
                          describe(node->error));
          } else {
            spdlog::info("{}: stopped '{}' in {} ms", options.name, node->name,
                         elapsed_ms(node->began).count());
          }
        } else if (now >= node->deadline && !node->cancel_emitted &&
                   wind_down_end - now > milliseconds(1)) {
          // Cancelled first, and given a moment to wind down, at the budget's end too (then past
          // the budget, by at most stop_wind_down and half the hard deadline's margin over the
          // budget): a stop that honours its cancellation says what it gave up on (a
          // PendingWrites counts and reports through events().failed the writes it could not
          // commit) instead of being dropped mid-way. With no time left for that, it is
          // abandoned at once.
          clean = false;
          cancel(*node);
          node->deadline = std::min(now + stop_wind_down, wind_down_end);
          spdlog::error(
              "{}: component '{}' did not stop within {} ms; cancelled (abandoned if "
              "it has not wound down within {} ms)",
              options.name, node->name, elapsed_ms(node->began).count(),
              std::chrono::duration_cast<milliseconds>(node->deadline - now).count());
          ++in_flight;
        } else if (now >= node->deadline) {
          clean = false;
          node->status = Status::abandoned;
          cancel(*node);
          spdlog::error("{}: component '{}' did not stop within {} ms; abandoned", options.name,
                        node->name, elapsed_ms(node->began).count());
        } else {
          ++in_flight;
        }
      }
      for (auto& node : nodes) {
        if (node->status == Status::started && dependents_stopped(*node)) {
          node->status = Status::stopping;
          spdlog::info("{}: stopping '{}'", options.name, node->name);
          const auto left = std::chrono::duration_cast<milliseconds>(budget_end - now);
          launch(*node, node->component.stop(),
                 std::max(milliseconds(0), std::min(stop_limit(*node), left)));
          ++in_flight;
        }
      }
      if (in_flight == 0) co_return clean;
      auto earliest = Clock::time_point::max();
      for (auto& node : nodes) {
        if (node->status == Status::stopping) earliest = std::min(earliest, node->deadline);
      }
      co_await wait_until(earliest);
    }
  }

  // --- the whole life ----------------------------------------------------------------------------

  asio::awaitable<int> live() {
    set_state(State::starting);
    run_hooks(starting_hooks, "on_starting");
    const bool started = co_await start_all();
    if (started && !stop_requested) {
      if (options.start_hard_deadline) arm_watchdog(std::nullopt, "");
      set_state(State::running);
      is_ready = true;
      run_hooks(ready_hooks, "on_ready");
      co_await stop_request_timer.async_wait(no_throw);
    }
    // The shutdown: readiness first, then intake, then the stops along the reverse DAG.
    shutting_down = true;
    is_ready = false;
    arm_shutdown_watchdog(Clock::now());
    set_state(State::stopping);
    run_hooks(stopping_hooks, "on_stopping");
    for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
      if ((*it)->status != Status::started) continue;
      try {
        (*it)->component.stop_intake();
      } catch (...) {  // whatever it threw, every component must still be stopped
        spdlog::error("{}: stop_intake() of '{}' threw: {}", options.name, (*it)->name,
                      describe(std::current_exception()));
      }
    }
    const bool stopped_cleanly = co_await stop_all();
    // Whether every component that had started (or whose start was abandoned or cancelled)
    // completed a stop, cleanly or by throwing. If not, what it holds may still be open: run()
    // runs the exit handlers (e.g. the pool's close_now()) once its threads are joined. (A
    // cancelled start's own clean-up may have been cut short by that cancellation, and so may a
    // stop cancelled at its deadline or the budget's end, though it wound down.)
    every_stop_ran = std::none_of(nodes.begin(), nodes.end(), [](const auto& node) {
      return node->status == Status::abandoned || node->status == Status::started ||
             node->status == Status::stopping ||
             (node->status == Status::stopped && node->cancel_emitted) ||
             (node->status == Status::start_failed && node->cancel_emitted);
    });
    // start_failed, not "!started && !stop_requested": a stop requested during the rollback of a
    // failed start must not turn the failure into a clean exit.
    set_state(start_failed ? State::failed : State::stopped);
    run_hooks(stopped_hooks, "on_stopped");
    if (start_failed) co_return start_failure_code;
    if (!stopped_cleanly) co_return exit_code::failure;
    co_return requested_code;
  }

  // The shutdown's hard deadline: hard_deadline after `from`, the start of the stops (or a
  // bound on it).
  void arm_shutdown_watchdog(Clock::time_point from) {
    arm_watchdog(deadline_after(from, options.hard_deadline),
                 "the shutdown overran its hard deadline");
  }

  // Replaces the watchdog's deadline (none: disarmed), starting its thread on first use.
  void arm_watchdog(std::optional<Clock::time_point> deadline, const char* reason) {
    {
      std::lock_guard lock(watchdog_mutex);
      watchdog_deadline = deadline;
      watchdog_reason = reason;
    }
    watchdog_wakeup.notify_all();
    if (watchdog.joinable() || !deadline) return;
    watchdog = std::thread([this] {
      std::unique_lock lock(watchdog_mutex);
      while (!watchdog_released) {
        if (!watchdog_deadline) {
          watchdog_wakeup.wait(lock);
        } else if (Clock::now() >= *watchdog_deadline) {
          exit_now(exit_code::hard_deadline, watchdog_reason);
        } else {
          watchdog_wakeup.wait_until(lock, *watchdog_deadline);
        }
      }
    });
  }

  void release_watchdog() {
    {
      std::lock_guard lock(watchdog_mutex);
      watchdog_released = true;
    }
    watchdog_wakeup.notify_all();
    if (watchdog.joinable()) watchdog.join();
  }

  int run() {
    if (ran) throw std::logic_error("Manager::run() may be called once");
    check_dependencies();
    ran = true;
    if (options.start_hard_deadline) {
      // Before any start: a start that blocks its thread holds the strand, and then neither its
      // start_timeout nor a signal can end it.
      arm_watchdog(deadline_after(Clock::now(), *options.start_hard_deadline),
                   "the start-up overran its hard deadline");
    }
    std::optional<int> code;
    std::exception_ptr crashed;
    if (options.handle_signals) {
      // Taken over by run(), not before: until then nothing has started, and Ctrl+C during the
      // program's own set-up ends it as usual rather than waiting, unseen, for run(). Created
      // once and kept: destroying a signal_set restores the default disposition, and a second
      // Ctrl+C would then kill the process without a word.
      for (std::size_t i = 0; i < owned_signals.size(); ++i) {
        (void)::sigaction(owned_signals[i], nullptr, &signals_before[i]);
      }
      signals.emplace(strand, SIGINT, SIGTERM, SIGQUIT);
      // SIGHUP (the terminal closed, the ssh session ended) would otherwise end the process at
      // once, accepted writes lost: a graceful shutdown too, but only where it had its default
      // action. An ignored one (nohup) stays ignored, and a handler of the program's own (a
      // reload) is left alone.
      const struct sigaction& hangup_before = signals_before[3];
      if (hangup_before.sa_handler == SIG_DFL && (hangup_before.sa_flags & SA_SIGINFO) == 0) {
        signals->add(SIGHUP);
      }
      for (std::size_t i = 0; i < owned_signals.size(); ++i) {
        (void)::sigaction(owned_signals[i], nullptr, &signals_taken[i]);
      }
      asio::co_spawn(strand, handle_signals(), asio::detached);
    }
    asio::co_spawn(strand, live(), [this, &code, &crashed](std::exception_ptr error, int result) {
      if (error) {
        crashed = error;
      } else {
        code = result;
      }
      flush_logs();
      io.stop();  // abandoned operations stay behind; they are destroyed with the io_context
    });
    std::vector<std::thread> threads;
    for (std::size_t i = 1; i < options.threads; ++i) threads.emplace_back([this] { io.run(); });
    io.run();
    for (auto& thread : threads) thread.join();
    if (crashed) {
      spdlog::critical("{}: the lifecycle itself failed: {}", options.name, describe(crashed));
      code = exit_code::failure;
    }
    // A stop that was abandoned (deadline, budget) or never ran may have left sockets open: the
    // exit handlers run now, while no thread runs the io_context and before spdlog shuts down.
    if (crashed || !every_stop_ran) {
      run_exit_handlers(crashed ? "the lifecycle failed"
                                : "a stop was abandoned or never ran, or a start was cancelled");
    }
    graceful_done = true;  // everything stopped, or the handlers have run: not again at exit
    release_watchdog();    // after the handlers, so that the hard deadline still bounds them
    if (signals) {
      // Nothing listens for signals any more: what they did before run() comes back (the
      // default, most often), so that what main() does after run() can still be ended by Ctrl+C
      // or SIGTERM. (Not before the exit handlers: a signal must not cut them short.)
      // The four are blocked meanwhile (on this thread, where they are sent to the process
      // most often from now on): between asio's reset to SIG_DFL and the restore, one would
      // otherwise take the default action. Blocked, it waits, and then does what it did before.
      sigset_t owned{};
      sigset_t mask_before{};
      sigemptyset(&owned);
      for (int number : owned_signals) sigaddset(&owned, number);
      const bool blocked = ::pthread_sigmask(SIG_BLOCK, &owned, &mask_before) == 0;
      // A disposition the program set during run() (SIGHUP ignored once it has detached, say) is
      // its own choice: it stays, whatever asio's reset and what the signal did before run().
      std::array<std::optional<struct sigaction>, owned_signals.size()> set_by_the_program;
      for (std::size_t i = 0; i < owned_signals.size(); ++i) {
        struct sigaction now {};
        if (::sigaction(owned_signals[i], nullptr, &now) == 0 &&
            (now.sa_handler != signals_taken[i].sa_handler ||
             (now.sa_flags & SA_SIGINFO) != (signals_taken[i].sa_flags & SA_SIGINFO))) {
          set_by_the_program[i] = now;
        }
      }
      signals.reset();
      for (std::size_t i = 0; i < owned_signals.size(); ++i) {
        if (set_by_the_program[i]) {
          (void)::sigaction(owned_signals[i], &*set_by_the_program[i], nullptr);
          continue;
        }
        // Only where asio left the default: a signal_set the program made itself during run()
        // still holds the signal (asio keeps its handler while any set has it), and keeps it.
        struct sigaction now {};
        if (::sigaction(owned_signals[i], nullptr, &now) == 0 && now.sa_handler == SIG_DFL &&
            (now.sa_flags & SA_SIGINFO) == 0) {
          (void)::sigaction(owned_signals[i], &signals_before[i], nullptr);
        }
      }
      if (blocked) (void)::pthread_sigmask(SIG_SETMASK, &mask_before, nullptr);
    }
    if (options.shutdown_logging) {
      spdlog::shutdown();  // flushes every logger, and ends spdlog's async thread pool
      // spdlog::shutdown() leaves no default logger, and spdlog::info() and the like then
      // dereference null: a line that destructors log after run() returns (a PendingWrites
      // abandoned with writes in it, a ChildProcess still running) would crash the process. A
      // plain stderr logger takes its place: late lines still reach someone.
      spdlog::set_default_logger(std::make_shared<spdlog::logger>(
          options.name, std::make_shared<spdlog::sinks::stderr_sink_mt>()));
    }
    return code.value_or(exit_code::failure);
  }

  void run_exit_handlers(const char* why) noexcept {
    if (graceful_done || exit_handlers_ran.exchange(true)) return;
    if (exit_handlers.empty()) return;
    try {
      spdlog::warn("{}: {}; running {} exit handler(s)", options.name, why, exit_handlers.size());
    } catch (...) {  // NOLINT(bugprone-empty-catch): the handlers matter more than the line
    }
    for (const auto& handler : exit_handlers) {
      try {
        handler();
      } catch (...) {  // NOLINT(bugprone-empty-catch): best effort, the next one still runs
      }
    }
    flush_logs();
  }
};

namespace {
void run_exit_handlers_at_exit() {
  std::lock_guard lock(registry_mutex);
  for (auto* manager : live_managers()) {
    manager->run_exit_handlers("the process is exiting without a graceful stop");
  }
}
}  // namespace

// --- Manager -------------------------------------------------------------------------------------

Manager::Manager(ManagerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Manager::~Manager() = default;

void Manager::add_erased(AnyComponent component, std::vector<std::string> dependencies,
                         ComponentLimits limits) {
  impl_->add(std::move(component), std::move(dependencies), limits);
}

void Manager::on_starting(std::function<void()> hook) {
  impl_->starting_hooks.push_back(std::move(hook));
}
void Manager::on_ready(std::function<void()> hook) {
  impl_->ready_hooks.push_back(std::move(hook));
}
void Manager::on_stopping(std::function<void()> hook) {
  impl_->stopping_hooks.push_back(std::move(hook));
}
void Manager::on_stopped(std::function<void()> hook) {
  impl_->stopped_hooks.push_back(std::move(hook));
}
void Manager::on_exit(std::function<void()> handler) {
  impl_->exit_handlers.push_back(std::move(handler));
}

int Manager::run() {
  return impl_->run();
}

void Manager::request_stop(int code, std::string_view reason) noexcept {
  try {
    asio::post(impl_->strand, [impl = impl_.get(), code, reason = std::string(reason)]() mutable {
      impl->on_stop_request(code, std::move(reason));
    });
  } catch (const std::exception& error) {
    spdlog::error("{}: request_stop failed: {}", impl_->options.name, error.what());
  }
}

std::string Manager::stop_reason() const {
  return impl_->stop_reason();
}

State Manager::state() const noexcept {
  return impl_->current_state;
}
bool Manager::ready() const noexcept {
  return impl_->is_ready;
}
ManagerEvents& Manager::events() noexcept {
  return impl_->events;
}
int exit_code::for_error(const std::exception_ptr& error) noexcept {
  if (!error) return failure;
  try {
    std::rethrow_exception(error);
  } catch (const boost::system::system_error& system_error) {
    // A library's own category only: errno's EINVAL (a socket option, a path) is a failure.
    const auto& code = system_error.code();
    const bool errno_category = code.category() == boost::system::generic_category() ||
                                code.category() == boost::system::system_category();
    if (!errno_category && code == boost::system::errc::invalid_argument) return config;
  } catch (const std::system_error& system_error) {
    const auto& code = system_error.code();
    const bool errno_category =
        code.category() == std::generic_category() || code.category() == std::system_category();
    if (!errno_category && code == std::errc::invalid_argument) return config;
  } catch (...) {  // NOLINT(bugprone-empty-catch): any other error is a failure
  }
  return failure;
}

const ManagerOptions& Manager::options() const noexcept {
  return impl_->options;
}

asio::io_context& Manager::io_context() noexcept {
  return impl_->io;
}
asio::any_io_executor Manager::executor() noexcept {
  return impl_->io.get_executor();
}

}  // namespace pgrt::lifecycle
