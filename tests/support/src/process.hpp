#pragma once

// Starting and reaping child processes for the test harness (fork/exec, no shell).

#include <chrono>
#include <filesystem>
#include <optional>
#include <stop_token>
#include <string>
#include <sys/types.h>
#include <utility>
#include <vector>

namespace pgrt::testing::detail {

struct SpawnOptions {
  std::vector<std::string> argv;                  // argv[0] is the program's path
  std::optional<std::pair<uid_t, gid_t>> run_as;  // drop to this user before exec
  int stdin_fd = -1;                              // -1: /dev/null
  int output_fd = -1;                             // stdout and stderr; -1: /dev/null
  bool new_session = false;                       // setsid(): out of reach of the terminal's Ctrl+C
  int parent_death_signal = 0;                    // PR_SET_PDEATHSIG, 0 for none
  std::filesystem::path working_directory;
};

// Starts a process. Signal mask and dispositions are reset to defaults in the child. Throws
// std::system_error when fork or exec fails (exec failures are reported by the child).
pid_t spawn(const SpawnOptions& options);

// The exit status (as from waitpid) if the child has exited, reaping it; nullopt if still running.
std::optional<int> try_reap(pid_t pid);

// Waits for the child to exit, polling so that `stop` can interrupt. Returns nullopt when the
// deadline passes or stop is requested (the child is then still running).
std::optional<int> wait_for_exit(pid_t pid, std::chrono::steady_clock::time_point deadline,
                                 const std::stop_token& stop = {});

// "exited with status 1", "killed by signal 9 (Killed)".
std::string describe_status(int status);

// Whether the process exists and has not exited (a zombie counts as exited).
bool process_alive(pid_t pid);

// The processes whose parent is `parent` (from /proc), e.g. a postmaster's backends. PostgreSQL
// puts each backend in a process group of its own, so process groups cannot find them.
std::vector<pid_t> child_processes(pid_t parent);

// The user PostgreSQL must run as when we are root ($PGRT_PG_USER or "postgres"); nullopt when not
// root. Throws std::runtime_error when that user does not exist.
std::optional<std::pair<uid_t, gid_t>> unprivileged_user_if_root();

// The last `max_bytes` of a file, or "" if unreadable.
std::string file_tail(const std::filesystem::path& path, std::size_t max_bytes);

// A 127.0.0.1 port that was free a moment ago (a server may still lose a race for it). Throws
// ClusterError.
int pick_free_port();

// Opens (creates, appends to) a log file for a child's output. Throws ClusterError.
int open_log(const std::filesystem::path& path);

}  // namespace pgrt::testing::detail
