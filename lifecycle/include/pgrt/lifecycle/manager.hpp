#pragma once

/// @file
/// The lifecycle manager: starts components along their dependencies, waits for a signal or a stop
/// request, stops them in reverse, and exits with a meaningful code. It knows nothing of databases.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "pgrt/lifecycle/component.hpp"
#include "pgrt/lifecycle/state.hpp"
#include "pgrt/runtime/event.hpp"

namespace pgrt::lifecycle {

/// The exit codes run() returns (and the watchdog and second Ctrl+C use).
namespace exit_code {
inline constexpr int ok = 0;             ///< Stopped gracefully (SIGTERM, request_stop()).
inline constexpr int failure = 1;        ///< A start failed (but for config), or a stop failed.
inline constexpr int hard_deadline = 2;  ///< The watchdog ended a shutdown that overran.
/// The configuration is wrong (a malformed value, variable or conninfo): restarting will not
/// help. sysexits.h's EX_CONFIG, so `Restart=on-failure` can be told not to loop on it
/// (`RestartPreventExitStatus=78`).
inline constexpr int config = 78;
/// SIGHUP (the terminal closed): a graceful shutdown, when it had its default action at run().
inline constexpr int hangup = 129;
inline constexpr int interrupted = 130;  ///< SIGINT (graceful on the first, at once on the second).
inline constexpr int quit = 131;         ///< SIGQUIT: exit at once.

/// exit_code::config when `error` says that the configuration is wrong: a boost::system or std
/// system_error whose code, of a library's own category (not errno's generic or system one: an
/// EINVAL from a socket or a path is a failure), is equivalent to errc::invalid_argument, as
/// pgrt::Error(client_errc::invalid_config) is; exit_code::failure for any other error.
[[nodiscard]] int for_error(const std::exception_ptr& error) noexcept;
}  // namespace exit_code

/// The names of the components a component depends on. Build it with after().
struct After {
  std::vector<std::string> names;
};

namespace detail {
template <typename T>
std::string dependency_name(const T& dependency) {
  if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return std::string(std::string_view(dependency));
  } else {
    return std::string(dependency.name());
  }
}
}  // namespace detail

/// Dependencies by component (anything with name()) or by name: `after(pool, "cache")`.
template <typename... Dependencies>
[[nodiscard]] After after(const Dependencies&... dependencies) {
  return After{{detail::dependency_name(dependencies)...}};
}

/// Per-component deadlines; unset ones take the manager's defaults.
struct ComponentLimits {
  std::optional<std::chrono::milliseconds> start_timeout;
  std::optional<std::chrono::milliseconds> stop_timeout;
};

/// How the manager runs. An aggregate: `Manager app({.threads = 2});`
/// A duration too long for the steady clock (about 292 years; milliseconds::max() for one) means
/// no limit.
struct ManagerOptions {
  std::string name = "pgrt";                        ///< For logs.
  std::size_t threads = 1;                          ///< Threads running io_context().
  std::chrono::milliseconds start_timeout{30'000};  ///< Default per-component start deadline.
  std::chrono::milliseconds stop_timeout{10'000};   ///< Default per-component stop deadline.
  /// All stops together. A stop still running at its end is cancelled and given up to 1 s more
  /// to wind down (to say what it gave up on), as one past its own deadline is, but no more than
  /// half the time hard_deadline leaves after the budget (the other half is the exit handlers').
  std::chrono::milliseconds shutdown_budget{30'000};
  /// From the start of a shutdown's stops until the watchdog _exit()s with
  /// exit_code::hard_deadline. Must be longer than shutdown_budget (leave it the time the exit
  /// handlers need, a few seconds), unless it is no limit (too long for the clock). After a failed
  /// start, the starts still in flight are cancelled and waited for first (each up to its stop
  /// deadline): the watchdog gives the rollback that long on top, so that a rollback within its
  /// deadlines is never cut.
  std::chrono::milliseconds hard_deadline{35'000};
  /// From run() until every component has started; if it passes first, the watchdog _exit()s
  /// with exit_code::hard_deadline. It ends a start that blocks its thread, which start_timeout
  /// (a timer on the manager's strand) cannot. Unset: no watchdog during the start-up. A failed
  /// or interrupted start-up switches to hard_deadline when its shutdown begins.
  std::optional<std::chrono::milliseconds> start_hard_deadline;
  /// Own SIGINT, SIGTERM and SIGQUIT while run() runs (one signal_set, until its threads are
  /// joined and the exit handlers have run: then they get back what they did before run(), unless
  /// the program set a disposition of its own meanwhile, which stays), SIGHUP
  /// too if it had its default action then (not if ignored, as under nohup, or handled), and,
  /// from construction, ignore SIGPIPE unless the
  /// program set a handler of its own: a write to a closed pipe (a log reader gone) then fails with
  /// EPIPE rather than killing the process without a shutdown.
  bool handle_signals = true;
  /// run() ends with spdlog::shutdown() (after its threads are joined), then makes a plain
  /// stderr logger the default one (a line logged later, by a destructor, neither crashes nor is
  /// lost). Turn off to keep your own loggers after run() returns.
  bool shutdown_logging = true;
};

/// Lifecycle events as Boost.Signals2 signals (pgrt::Event); connect scoped_connection members.
/// Callbacks run on the manager's strand. An exception a callback throws is logged ("<name>: an
/// event subscriber threw: ...") and ignored: every other subscriber still sees the state, and
/// the start or shutdown goes on.
struct ManagerEvents {
  Event<void(State)> state_changed;
};

/// Orders the start and stop of a process's components.
///
/// Start: components start concurrently along the dependency DAG, each once its dependencies have
/// started, each within its start deadline. If one fails (throws or times out), or a stop is
/// requested meanwhile, the starts in flight are cancelled and only the components that had
/// started are stopped, in reverse dependency order, with a fresh shutdown budget. A failed
/// start always makes run() return exit_code::failure (exit_code::config when the first failure
/// was a configuration error, exit_code::for_error()): a stop request or a SIGTERM during the
/// rollback is logged and ignored.
///
/// Shutdown, in this order: readiness goes false (on_stopping hooks); intake stops (stop_intake()
/// on every started component); the components stop along the reverse DAG, each with its own
/// deadline inside the shutdown budget (so a pending-writes component that depends on the pool is
/// flushed before the pool closes); a stop that throws or hangs is logged and abandoned, the
/// others still run; on_stopped hooks; logs are flushed; the threads are joined; spdlog shuts
/// down; run() returns the exit code. A watchdog thread _exit()s if the hard deadline passes.
///
/// Signals (handle_signals): the first SIGINT or SIGTERM starts a graceful shutdown (exit codes
/// 130 and 0), and so does SIGHUP (129) where it had its default action (which would end the
/// process at once when its terminal closes, accepted writes lost); a repeated SIGTERM, or a
/// SIGHUP during a shutdown, is logged and ignored; a SIGINT during a shutdown, or SIGQUIT,
/// flushes the logs and exits at once (130, 131).
///
/// atexit: if the process exits without a graceful stop (std::exit elsewhere, main returning
/// early), the handlers given to on_exit() run, synchronously and best effort, then the logs are
/// flushed. They never run coroutines. run() also runs them, once its threads are joined, when a
/// stop was cancelled or abandoned (deadline, budget) or never ran, or a start was cancelled,
/// since what that component holds may still be open; they run at most once.
///
/// Thread safety: add(), the hook setters and on_exit() before run() only, from one thread;
/// request_stop(), state() and ready() from any thread at any time.
class Manager {
 public:
  /// Throws std::invalid_argument for options that cannot work: no thread, a negative duration,
  /// a hard_deadline (other than no limit) not longer than the shutdown_budget.
  explicit Manager(ManagerOptions options = {});
  /// Runs the on_exit() handlers if run() was not called or did not return (and they did not run
  /// yet).
  ~Manager();
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;
  Manager(Manager&&) = delete;
  Manager& operator=(Manager&&) = delete;

  /// Adds a component that starts after `dependencies` and stops before them. Dependencies may
  /// name components added later; run() rejects a name that was never added. Throws
  /// std::invalid_argument for a duplicate name, a negative timeout in `limits` or a dependency
  /// cycle (naming the cycle, e.g. "a -> b -> a"). Returns the component, owned by the manager.
  template <Component C>
  C& add(std::shared_ptr<C> component, After dependencies = {}, ComponentLimits limits = {}) {
    C& typed = *component;
    add_erased(AnyComponent(std::move(component)), std::move(dependencies.names), limits);
    return typed;
  }
  template <Component C>
  requires(!std::is_lvalue_reference_v<C>) C& add(C&& component, After dependencies = {},
                                                  ComponentLimits limits = {}) {
    return add(std::make_shared<std::remove_cvref_t<C>>(std::forward<C>(component)),
               std::move(dependencies), limits);
  }

  void on_starting(std::function<void()> hook);
  void on_ready(std::function<void()> hook);
  void on_stopping(std::function<void()> hook);
  void on_stopped(std::function<void()> hook);
  /// A synchronous, best-effort handler for an exit without a graceful stop (see the class
  /// comment), e.g. closing sockets. It must not block for long and must not throw.
  void on_exit(std::function<void()> handler);

  /// Starts everything, waits for a signal or request_stop(), stops everything, and returns the
  /// exit code (see exit_code). Runs io_context() on ManagerOptions::threads threads, this one
  /// included. Call once. Throws std::invalid_argument, before starting anything, if a dependency
  /// names a component that was never added.
  int run();

  /// Starts a graceful shutdown whose exit code is `code` (unless something fails), giving
  /// `reason` for logs and stop_reason(). Before the components are up, it cancels the starts.
  /// Thread-safe; later requests are ignored, and so are requests after a start failed.
  void request_stop(int code = exit_code::ok, std::string_view reason = "stop requested") noexcept;

  /// Why the shutdown began: "SIGINT", "SIGTERM", the reason given to request_stop(), or
  /// "a component failed to start"; "" while none has begun. Thread-safe.
  [[nodiscard]] std::string stop_reason() const;

  [[nodiscard]] State state() const noexcept;
  /// True between on_ready and the start of a shutdown.
  [[nodiscard]] bool ready() const noexcept;
  [[nodiscard]] ManagerEvents& events() noexcept;
  /// The options it was made with.
  [[nodiscard]] const ManagerOptions& options() const noexcept;
  /// The io_context run() runs; components may run their work on it.
  [[nodiscard]] boost::asio::io_context& io_context() noexcept;
  [[nodiscard]] boost::asio::any_io_executor executor() noexcept;

  /// Implementation detail.
  struct Impl;

 private:
  void add_erased(AnyComponent component, std::vector<std::string> dependencies,
                  ComponentLimits limits);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pgrt::lifecycle
