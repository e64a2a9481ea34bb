#pragma once

/// @file
/// One running process per app and instance on a host: an flock() on a pid file, and a guard that
/// holds when the file is removed (an abstract unix socket).

#include <chrono>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace pgrt {

struct InstanceLockOptions {
  std::string application;  ///< The app name (PoolConfig::application).
  std::string instance;     ///< The instance name; empty: default_instance_name().
  /// Where the lock files live; empty: default_lock_directory().
  std::filesystem::path directory;
  /// Take over from a running holder: SIGTERM it, wait up to takeover_grace for the lock, then
  /// SIGKILL it and wait up to min(takeover_grace, takeover_kill_wait) more.
  bool force = false;
  /// From 0 to max_takeover_grace: InstanceLock::acquire() refuses another value with
  /// std::invalid_argument.
  std::chrono::milliseconds takeover_grace{10'000};
};

/// The longest takeover_grace InstanceLock::acquire() takes.
inline constexpr std::chrono::milliseconds max_takeover_grace{24 * 60 * 60 * 1'000};

/// How long a takeover waits for the lock after SIGKILL (the kernel releases a killed holder's
/// lock as soon as it is gone; longer means it is stuck in the kernel).
inline constexpr std::chrono::milliseconds takeover_kill_wait{5'000};

/// The longest InstanceLock::acquire() can block on a takeover: 0 without force, else
/// takeover_grace + min(takeover_grace, takeover_kill_wait) + 1 s (reading the holder's pid, and
/// waiting for its guard to go). A start deadline around it must be longer.
[[nodiscard]] std::chrono::milliseconds max_takeover_time(const InstanceLockOptions& options);

/// Thrown when another process holds the lock (without force), or a takeover failed.
class InstanceLockError : public std::runtime_error {
 public:
  InstanceLockError(const std::string& message, int holder_pid)
      : std::runtime_error(message), holder_pid_(holder_pid) {}
  /// The holder's pid as written in the lock file, 0 if unknown.
  [[nodiscard]] int holder_pid() const noexcept { return holder_pid_; }

 private:
  int holder_pid_;
};

/// $PGRT_RUNTIME_DIR, else $XDG_RUNTIME_DIR/pgrt, else /run/pgrt when root, else /tmp/pgrt-<uid>.
/// InstanceLock::acquire() creates it with mode 0700 and uses it only if it is a directory (not a
/// symbolic link) owned by this user; one that others may write into is made 0700 first.
[[nodiscard]] std::filesystem::path default_lock_directory();

/// Holds the lock until destroyed (the kernel releases it if the process dies, so a crash never
/// leaves a stale lock). Move-only. Blocking: with force, acquire() may wait up to
/// max_takeover_time(). Not for use across threads at once.
///
/// The lock is two things, both needed to hold it: the flock() on the lock file, and the guard, a
/// unix stream socket bound to an abstract name derived from the lock file's path and this user's
/// uid (guard_name()). The file names the holder; the guard holds when the file is removed under
/// its holder (systemd-tmpfiles cleaning /tmp/pgrt-<uid>, an operator's rm), as nothing in the
/// file system can remove an abstract name. Both are close-on-exec (a program the holder executes
/// does not hold them) and released by the kernel with their last descriptor (a child forked by
/// the holder keeps them while it lives). Abstract names are per network namespace: a process in
/// another one (a container with its own network) has its own guard, and is kept out by the lock
/// file only. Where no unix socket can be made (a sandbox: systemd's RestrictAddressFamilies
/// without AF_UNIX), or another user's socket squats the name (an abstract name has no
/// permissions; no instance of this user's is another user's socket), the lock file alone guards
/// and guard_name() is empty.
class InstanceLock {
 public:
  /// Takes the lock for options.application/instance: creates the directory (0700; an existing
  /// one that is a symbolic link or another user's is refused; this user's own is made 0700) and
  /// `<app>.<instance>.lock` (0600, opened without following a symbolic link; anything but a
  /// regular file of this user's with one name is refused) (tag_app_name() and tag_instance_name(),
  /// so exactly one lock per tag prefix; bytes other than letters, digits, '-', '_' and '~' written
  /// as %XX), locks it (flock, non-blocking) and writes this process's pid, host and incarnation
  /// (and the earlier holders' incarnations) into it, after taking the guard (the file first,
  /// then the guard, waiting up to 1 s for a holder that is letting go of it: one that gets the
  /// file and not the guard lets go of the file and has written nothing into it). Throws
  /// InstanceLockError naming the holder's pid when another process holds it ("another
  /// pgrt-demo/eu-1 is running as pid 1234 ..."), or when a takeover fails, saying why: the pid in
  /// the file does not have the lock file open (it is never signalled: only a process that
  /// verifiably holds this very file is), it is another user's, it is gone while another process
  /// still holds the lock, or it keeps the lock after SIGKILL. Throws InstanceLockError too when
  /// another process holds the guard but not the lock file (the file was removed or replaced under
  /// it: "the lock file ... was removed while another pgrt-demo/eu-1 still holds the instance lock
  /// ..."; naming its pid if the file names one that holds the guard, as far as /proc tells), with
  /// force as well: such a holder cannot be verified, so it is never signalled. Throws
  /// std::system_error when the directory or file cannot be created or is refused, or the guard's
  /// socket cannot be made for another reason than a sandbox (too many open files).
  [[nodiscard]] static InstanceLock acquire(const InstanceLockOptions& options);

  InstanceLock(InstanceLock&& other) noexcept;
  InstanceLock& operator=(InstanceLock&& other) noexcept;
  InstanceLock(const InstanceLock&) = delete;
  InstanceLock& operator=(const InstanceLock&) = delete;
  ~InstanceLock();

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  /// The guard's abstract socket name (without the leading NUL; `ss -xap` shows it with a
  /// leading '@'): "pgrt/lock/<uid>" and the lock file's path, or a hash of it if too long.
  /// Empty when no guard could be taken (see above) or after a move.
  [[nodiscard]] const std::string& guard_name() const noexcept { return guard_name_; }
  /// The pid that was stopped to take the lock over (force), if any.
  [[nodiscard]] std::optional<int> took_over_from() const noexcept { return took_over_from_; }
  /// The incarnations (ProcessIdentity::incarnation) of the processes that held this lock
  /// before, newest first, at most 16, as the lock file tells (the file carries them over from
  /// holder to holder). None of them holds it any more: each exited, died or released it.
  [[nodiscard]] const std::vector<std::string>& earlier_incarnations() const noexcept {
    return earlier_incarnations_;
  }

 private:
  InstanceLock(int fd, int guard, std::filesystem::path path, std::string guard_name,
               std::optional<int> took_over_from,
               std::vector<std::string> earlier_incarnations) noexcept
      : fd_(fd),
        guard_(guard),
        path_(std::move(path)),
        guard_name_(std::move(guard_name)),
        took_over_from_(took_over_from),
        earlier_incarnations_(std::move(earlier_incarnations)) {}
  void release() noexcept;
  int fd_ = -1;     // the locked lock file
  int guard_ = -1;  // the bound guard socket, -1 if none
  std::filesystem::path path_;
  std::string guard_name_;
  std::optional<int> took_over_from_;
  std::vector<std::string> earlier_incarnations_;
};

}  // namespace pgrt
