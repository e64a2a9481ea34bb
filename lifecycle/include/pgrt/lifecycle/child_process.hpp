#pragma once

/// @file
/// A supervised child process as a lifecycle component: started by start(), watched on the
/// io_context, restarted with backoff if it fails, and stopped (SIGTERM, grace, SIGKILL, to its
/// whole process group) by stop(). Linux only.
///
/// Why fork()/exec() and a pidfd rather than Boost.Process (Boost 1.81, read in
/// /usr/include/boost/process): the child must run prctl(PR_SET_PDEATHSIG) and getppid() between
/// fork and exec, with nothing in the child that is not async-signal-safe, since the parent has
/// other threads. Boost.Process v1 can run code there (extend::on_exec_setup), but its extension
/// API is marked experimental, it needs the compiled Boost.Filesystem (not installed for 1.81),
/// and it learns of exits through a process-wide SIGCHLD signal_set. Boost.Process v2 has the
/// hooks and a pidfd, but its launcher calls io_context::notify_fork() in the child (not
/// async-signal-safe: it may take a lock another thread held at the fork) and ::exit() when exec
/// fails (running the parent's atexit handlers, the lifecycle manager's among them, in the child),
/// and its process handle kills the pid, not the process group. The fork/exec here is about a
/// hundred lines and does exactly what is listed below.
///
/// The child, between fork and exec: its own process group (setpgid(0, 0)); PR_SET_PDEATHSIG =
/// SIGKILL, then _exit(127) if the parent already died (getppid() is no longer the pid recorded
/// before the fork); signal mask emptied and every signal disposition back to its default (an
/// ignored SIGPIPE or SIGTERM is otherwise inherited through exec); every descriptor but 0, 1 and
/// 2 closed (close_range); chdir to the working directory. Only async-signal-safe calls: argv,
/// envp and the program's path are built before the fork. A failure there or of execve() is
/// written to a close-on-exec pipe, so start() throws it.
///
/// Caveats of PR_SET_PDEATHSIG (see docs/operations.md, "Supervised child processes"):
/// - It fires when the *thread* that forked exits, not the process. The fork runs on the thread
///   that runs start() or the restart, i.e. one of the threads running the executor's io_context:
///   keep those threads alive as long as the component runs (the lifecycle manager's are, until
///   run() returns). Do not run the io_context on a thread that ends earlier.
/// - It reaches the child only, not its own children: a grandchild outlives a SIGKILLed parent
///   (reparented to init) unless it has its own PR_SET_PDEATHSIG, tied to the child (a script
///   can start it with util-linux's `setpriv --pdeathsig KILL`; SIGKILL cannot be trapped).
///   stop() does reach it: the signals go to the whole process group. Making this process a
///   subreaper (PR_SET_CHILD_SUBREAPER) would not help: when it is SIGKILLed, its orphans go on
///   to the next subreaper or init, alive. So it is not done.
/// - It is cleared when the child execs a set-user-ID or set-group-ID program (or one with file
///   capabilities): such a child is not killed with the parent.
/// - A grandchild that leaves the process group (setsid(), a daemon) is beyond reach of stop().

#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

#include "pgrt/runtime/event.hpp"

namespace pgrt::lifecycle {

/// When a child that exited on its own is started again.
enum class RestartPolicy {
  never,       ///< Never: it stays down.
  on_failure,  ///< When it exited with a non-zero code or was killed by a signal.
  always,      ///< Whenever it exits, with code 0 too.
};

/// What to run and how to supervise it. An aggregate:
/// `ChildProcess worker({.name = "worker", .argv = {"/usr/bin/worker", "--fast"}});`
struct ChildProcessOptions {
  /// Component name, for logs and the manager; empty: argv[0]'s last path element.
  std::string name;
  /// The program and its arguments; argv[0] is the program. With a '/' it is a path (relative
  /// ones to working_directory if set, else to the parent's); without, it is looked up in the
  /// PATH of the child's environment (or "/usr/bin:/bin" if it has none), as execvp() does.
  /// Each start logs it (info), with what may be a password replaced by "***": the value after a
  /// key that names one (`password=`, `sslpassword=`, `PGPASSWORD=`, `MYSQL_PWD=`, `--passw=`,
  /// `oauth_client_secret=`, JSON's `"password": "s3cret"`, YAML's `password: s3cret`, a URL's
  /// `?pass%77ord=`, `os.environ['PGPASSWORD'] = ...`, `setenv("PGPASSWORD", ...)`; after an empty
  /// `--password=`, the next word), the password of any URL's credentials (or of `app:s3cret@db`
  /// without a scheme), SQL's `PASSWORD 's3cret'`, XML's `<password>s3cret</password>`, the word
  /// after a word that is only "password" (a .netrc's `password s3cret`, mysqladmin's `password
  /// s3cret`; not SQL's NULL), the argument after an option that names one (`--password s3cret`,
  /// `--db-password`, an abbreviation down to `--pass`; not after `--no-password`, nor an option
  /// after the value-less `--password` or `-W` of psql, pg_dump and libpq's other client programs,
  /// which make them prompt for one), and the password option of mysql's and MariaDB's tools,
  /// sshpass and the mongo tools (`-p`) and redis-cli (`-a`), as `-ps3cret` or `-p s3cret`,
  /// openssl's `-passin pass:s3cret`, `-k` and `-K`, the `-P` of sqlcmd, bcp, mosquitto's clients
  /// and ipmitool, the LDAP tools' `-w`, ldappasswd's `-s` and `-a`, curl's `-u user:s3cret`,
  /// Samba's `-U user%s3cret` and htpasswd's password argument after `-b`; `--pw`, `--token`
  /// (`--api-token`) and `--auth` (not initdb's; an option after them is shown); a key spelled with
  /// escapes (JSON's `"pass\u0077ord"`, XML's `&#119;`); XML's
  /// `<add key="password" value="s3cret"/>` and `<entry key="password">s3cret</entry>`; all of it
  /// within a `sh -c` script too, in time linear in the command line's length. Any other program's
  /// `-p` is shown: psql's, pg_dump's, ssh's is a port. Still, prefer passing secrets in the
  /// environment: any user on the host can read a process's arguments
  /// (/proc/PID/cmdline).
  std::vector<std::string> argv;
  /// Variables set in the child's environment, on top of the parent's when inherit_environment
  /// (replacing a variable of the same name), or alone when not. The parent's environment is read
  /// (environ) at each start and restart; do not setenv() meanwhile on another thread. Inherited,
  /// the parent's DATABASE_URL, PGPASSWORD and other secrets reach the child too: turn
  /// inherit_environment off (and list what it needs in env) for a child that should not have
  /// them.
  std::map<std::string, std::string> env;
  bool inherit_environment = true;
  /// The child's working directory; empty: the parent's.
  std::string working_directory;

  RestartPolicy restart = RestartPolicy::on_failure;
  /// Delay before the first restart after a failure; each further consecutive restart waits twice
  /// as long, up to backoff_max (restart_delay()).
  std::chrono::milliseconds backoff_initial{500};
  std::chrono::milliseconds backoff_max{30'000};
  /// A run that lasted at least this long resets the delay to backoff_initial.
  std::chrono::milliseconds backoff_reset_after{60'000};
  /// At most this many restarts within any restart_window (zero window: since start()). When the
  /// next restart would exceed it the child stays down: logged as an error and
  /// ChildProcessEvents::stayed_down. Zero max_restarts: never restart.
  std::size_t max_restarts = 10;
  std::chrono::milliseconds restart_window{600'000};

  /// stop(): how long the process group has after SIGTERM before it gets SIGKILL. Keep
  /// stop_grace + kill_wait within the manager's stop_timeout (10 s by default).
  std::chrono::milliseconds stop_grace{5'000};
  /// stop(): how long to wait for the child to be reaped after SIGKILL before giving up (it is
  /// then in an uninterruptible sleep; the destructor tries again). Also bounds a cancelled
  /// stop(), and the destructor's own wait for a killed child (see "Lifetime" below).
  std::chrono::milliseconds kill_wait{5'000};
};

/// How one run of the child ended.
struct ChildExit {
  pid_t pid = 0;
  /// The exit code if it exited; empty if it was killed by a signal, or if the status was lost
  /// (another part of the process reaped it: waitpid(-1), SIGCHLD ignored).
  std::optional<int> exit_code;
  std::optional<int> signal;  ///< The signal that killed it.
  bool core_dumped = false;
  std::chrono::milliseconds ran_for{0};          ///< From the exec to the reap.
  std::chrono::steady_clock::time_point reaped;  ///< When it was reaped.
  bool stop_requested = false;                   ///< It ended after stop() signalled it.

  /// Exited with code 0.
  [[nodiscard]] bool succeeded() const noexcept { return exit_code == 0; }
  /// "exited with code 1", "killed by signal 9 (SIGKILL)", "status lost ...".
  [[nodiscard]] std::string describe() const;
};

/// A restart that is scheduled: the child is started again after `delay`.
struct ChildRestart {
  std::size_t restart = 0;  ///< 1 for the first restart since start(), and so on.
  std::chrono::milliseconds delay{0};
};

/// Lifecycle events as Boost.Signals2 signals (pgrt::Event); connect scoped_connection members.
/// Callbacks run on the executor start() was awaited on (the manager's strand), never
/// concurrently. An exception a callback throws is logged ("child <name>: an event subscriber
/// threw: ...") and ignored: every other subscriber is still called, and the supervision goes on
/// as if nothing had been thrown (the start, the restarts, the exit reports).
struct ChildProcessEvents {
  /// A child started: its pid (also its process group id).
  Event<void(pid_t)> started;
  /// A child was reaped, whatever the reason (emitted for every run, stop()'s included).
  Event<void(const ChildExit&)> exited;
  Event<void(const ChildRestart&)> restart_scheduled;
  /// The child exited on its own and will not be started again: the reason ("restart policy
  /// never", "exited with code 0", "restart limit reached: ...").
  Event<void(const std::string&)> stayed_down;
};

/// The delay before restart number `restart` (1-based) of a run of consecutive failures:
/// backoff_initial * 2^(restart-1), at most backoff_max. A pure function.
[[nodiscard]] std::chrono::milliseconds restart_delay(std::chrono::milliseconds backoff_initial,
                                                      std::chrono::milliseconds backoff_max,
                                                      std::size_t restart) noexcept;

/// One supervised child process; a lifecycle Component.
///
/// start() forks and execs the child and returns once it has exec'd (it blocks its thread for
/// that moment). The child is then watched on the executor start() ran on, through a pidfd
/// (pidfd_open; where the kernel has none, by polling waitid() every 50 ms): no thread, no
/// SIGCHLD handler. Each exit is reaped at once (waitid(WEXITED): no zombie is left), logged and
/// reported through events().exited. Whatever is left of the child's process group when the
/// child itself exits is SIGKILLed (its pid, and so the group id, cannot be reused until it is
/// reaped), so a restart leaves no orphans behind. Then, by RestartPolicy, the child is started
/// again after restart_delay(), unless max_restarts within restart_window would be exceeded:
/// then it stays down, which is logged as an error and reported through events().stayed_down.
/// A child that fails to exec on a restart counts as a failed run.
///
/// stop(): no more restarts; SIGTERM to the child's process group (grandchildren included), up
/// to stop_grace for the group to end (the child, and then whatever it left in the group), then
/// SIGKILL to the group, then up to kill_wait for the
/// reap. Returns at once if no child runs. Bounded by stop_grace + kill_wait.
///
/// Cancellation: stop() supports terminal per-operation cancellation (the awaitable default
/// filter; the manager sends it when a stop deadline passes): the group is SIGKILLed at once (no
/// grace) and stop() still waits, up to kill_wait and not cancellable, for the reap, then returns
/// normally. start() does not suspend (it blocks its thread while the child execs), so there is
/// nothing to cancel.
///
/// Errors: the constructor throws std::invalid_argument for options that cannot work (empty argv,
/// a NUL byte in an argument, an environment name that is empty or has '=', backoff_initial
/// above backoff_max, negative durations). start() throws std::system_error naming the program
/// and the errno when the program is not found in PATH (ENOENT), the working directory cannot be
/// entered, execve() fails (ENOENT, EACCES, ENOEXEC...) or fork(), pipe2() fail; it throws
/// std::logic_error if the component is already running. No child is left behind by a throw.
///
/// Thread safety: start(), stop() and the accessors not marked otherwise run on one executor at
/// a time (the manager's strand, or an io_context run by one thread), one call in flight at a
/// time. pid(), restarts() and supervising() may be read from any thread.
///
/// Lifetime: the component may be destroyed once no start()/stop() is in flight, and before its
/// io_context (it holds timers and a descriptor of it; the manager destroys its components first).
/// If a child still runs then, the destructor SIGKILLs its group and no restart follows; the child
/// is reaped when the watch sees it exit, or, if the io_context no longer runs, when the watch is
/// destroyed (blocking at most kill_wait, 1 s at least: a child in uninterruptible sleep that has
/// not exited by then is logged and left for init to reap once this process exits, a zombie until
/// then if it ends first). The process must not reap children it did not start (waitpid(-1),
/// SIGCHLD set to SIG_IGN): the exit status would be lost.
class ChildProcess {
 public:
  /// Throws std::invalid_argument for options that cannot work (see the class comment).
  explicit ChildProcess(ChildProcessOptions options);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ChildProcess(ChildProcess&&) noexcept = default;
  ChildProcess& operator=(ChildProcess&&) = delete;

  [[nodiscard]] std::string name() const;
  /// Starts the child and its supervision (see the class comment). Throws std::system_error if
  /// the child cannot be started, std::logic_error if already running.
  [[nodiscard]] boost::asio::awaitable<void> start();
  /// Stops the child and its supervision (see the class comment). Does not throw.
  [[nodiscard]] boost::asio::awaitable<void> stop();

  /// The running child's pid (= its process group id); empty between runs and when stopped.
  /// Thread-safe.
  [[nodiscard]] std::optional<pid_t> pid() const noexcept;
  /// Restarts since start(). Thread-safe.
  [[nodiscard]] std::size_t restarts() const noexcept;
  /// True from start() until the supervision ends (stop(), or the child stayed down).
  [[nodiscard]] bool supervising() const noexcept;
  [[nodiscard]] ChildProcessEvents& events() noexcept;
  [[nodiscard]] const ChildProcessOptions& options() const noexcept;

  /// Implementation detail.
  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace pgrt::lifecycle
