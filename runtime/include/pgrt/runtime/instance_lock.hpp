#pragma once

/// @file
/// One running process per app and instance on a host: an flock() on a pid file.

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
  /// SIGKILL it and wait as long again.
  bool force = false;
  std::chrono::milliseconds takeover_grace{10'000};
};

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
[[nodiscard]] std::filesystem::path default_lock_directory();

/// Holds the lock until destroyed (the kernel releases it if the process dies, so a crash never
/// leaves a stale lock). Move-only. Blocking: acquire() may wait up to twice takeover_grace with
/// force. Not for use across threads at once.
class InstanceLock {
 public:
  /// Takes the lock for options.application/instance: creates the directory and
  /// `<app>.<instance>.lock` (tag_app_name() and tag_instance_name(), so exactly one lock per tag
  /// prefix; bytes other than letters, digits, '-', '_' and '~' written as %XX), locks it (flock,
  /// non-blocking) and writes this process's pid, host and incarnation (and the earlier holders'
  /// incarnations) into it. Throws InstanceLockError naming the holder's pid when another process
  /// holds it ("another pgrt-demo/eu-1 is running as pid 1234 ..."), or when a takeover fails
  /// (kill() fails: the holder is another user's, or it is gone while another process still holds
  /// the lock; or it keeps the lock after SIGKILL; the message says which), and std::system_error
  /// when the directory or file cannot be created.
  [[nodiscard]] static InstanceLock acquire(const InstanceLockOptions& options);

  InstanceLock(InstanceLock&& other) noexcept;
  InstanceLock& operator=(InstanceLock&& other) noexcept;
  InstanceLock(const InstanceLock&) = delete;
  InstanceLock& operator=(const InstanceLock&) = delete;
  ~InstanceLock();

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  /// The pid that was stopped to take the lock over (force), if any.
  [[nodiscard]] std::optional<int> took_over_from() const noexcept { return took_over_from_; }
  /// The incarnations (ProcessIdentity::incarnation) of the processes that held this lock
  /// before, newest first, at most 16, as the lock file tells (the file carries them over from
  /// holder to holder). None of them holds it any more: each exited, died or released it.
  [[nodiscard]] const std::vector<std::string>& earlier_incarnations() const noexcept {
    return earlier_incarnations_;
  }

 private:
  InstanceLock(int fd, std::filesystem::path path, std::optional<int> took_over_from,
               std::vector<std::string> earlier_incarnations) noexcept
      : fd_(fd),
        path_(std::move(path)),
        took_over_from_(took_over_from),
        earlier_incarnations_(std::move(earlier_incarnations)) {}
  int fd_ = -1;
  std::filesystem::path path_;
  std::optional<int> took_over_from_;
  std::vector<std::string> earlier_incarnations_;
};

}  // namespace pgrt
