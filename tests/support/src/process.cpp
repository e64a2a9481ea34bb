#include "process.hpp"

#include <arpa/inet.h>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <stdexcept>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <system_error>
#include <thread>
#include <unistd.h>

#include "pgrt/testing/temp_cluster.hpp"

namespace pgrt::testing::detail {

namespace {

// Only async-signal-safe calls from here on: the parent may have other threads.
[[noreturn]] void exec_child(const SpawnOptions& options, char* const* argv, int error_pipe,
                             pid_t parent) {
  auto fail = [error_pipe](int step_errno) {
    [[maybe_unused]] auto written = ::write(error_pipe, &step_errno, sizeof step_errno);
    ::_exit(127);
  };
  if (options.new_session && ::setsid() < 0) fail(errno);

  sigset_t all_signals;
  ::sigemptyset(&all_signals);
  ::sigprocmask(SIG_SETMASK, &all_signals, nullptr);
  for (int signal_number : {SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2}) {
    ::signal(signal_number, SIG_DFL);
  }

  int null_fd = ::open("/dev/null", O_RDWR);
  if (null_fd < 0) fail(errno);
  int in = options.stdin_fd >= 0 ? options.stdin_fd : null_fd;
  int out = options.output_fd >= 0 ? options.output_fd : null_fd;
  if (::dup2(in, STDIN_FILENO) < 0 || ::dup2(out, STDOUT_FILENO) < 0 ||
      ::dup2(out, STDERR_FILENO) < 0) {
    fail(errno);
  }

  if (options.run_as) {
    auto [uid, gid] = *options.run_as;
    if (::setgroups(1, &gid) < 0 || ::setgid(gid) < 0 || ::setuid(uid) < 0) fail(errno);
  }
  if (!options.working_directory.empty() && ::chdir(options.working_directory.c_str()) < 0) {
    fail(errno);
  }
  // Set after the uid change, which clears it.
  if (options.parent_death_signal != 0) {
    if (::prctl(PR_SET_PDEATHSIG, options.parent_death_signal) < 0) fail(errno);
    if (::getppid() != parent) ::_exit(128 + options.parent_death_signal);
  }
  ::execv(argv[0], argv);
  fail(errno);
  ::_exit(127);
}

}  // namespace

pid_t spawn(const SpawnOptions& options) {
  if (options.argv.empty()) throw std::invalid_argument("spawn: empty argv");
  // Everything the child needs is allocated before fork.
  std::vector<char*> argv;
  argv.reserve(options.argv.size() + 1);
  for (const auto& argument : options.argv) argv.push_back(const_cast<char*>(argument.c_str()));
  argv.push_back(nullptr);

  std::array<int, 2> error_pipe{};
  if (::pipe2(error_pipe.data(), O_CLOEXEC) < 0) {
    throw std::system_error(errno, std::generic_category(), "pipe2");
  }
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int fork_errno = errno;
    ::close(error_pipe[0]);
    ::close(error_pipe[1]);
    throw std::system_error(fork_errno, std::generic_category(), "fork");
  }
  if (pid == 0) {
    ::close(error_pipe[0]);
    exec_child(options, argv.data(), error_pipe[1], parent);
  }
  ::close(error_pipe[1]);
  int child_errno = 0;
  ssize_t got = 0;
  do {
    got = ::read(error_pipe[0], &child_errno, sizeof child_errno);
  } while (got < 0 && errno == EINTR);
  ::close(error_pipe[0]);
  if (got == sizeof child_errno) {
    ::waitpid(pid, nullptr, 0);
    throw std::system_error(child_errno, std::generic_category(),
                            "cannot start " + options.argv.front());
  }
  return pid;
}

std::optional<int> try_reap(pid_t pid) {
  int status = 0;
  pid_t result = 0;
  do {
    result = ::waitpid(pid, &status, WNOHANG);
  } while (result < 0 && errno == EINTR);
  if (result == pid) return status;
  if (result < 0 && errno == ECHILD) return 0;  // reaped elsewhere; treat as gone
  return std::nullopt;
}

std::optional<int> wait_for_exit(pid_t pid, std::chrono::steady_clock::time_point deadline,
                                 const std::stop_token& stop) {
  auto pause = std::chrono::milliseconds(2);
  for (;;) {
    if (auto status = try_reap(pid)) return status;
    if (std::chrono::steady_clock::now() >= deadline || stop.stop_requested()) return std::nullopt;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return "killed by signal " + std::to_string(WTERMSIG(status)) + " (" +
           ::strsignal(WTERMSIG(status)) + ")";
  }
  return "ended with wait status " + std::to_string(status);
}

namespace {
// The state letter and parent pid from /proc/<pid>/stat: "pid (comm) S ppid ...".
std::optional<std::pair<char, pid_t>> read_stat(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return std::nullopt;
  auto after_name = line.rfind(')');
  if (after_name == std::string::npos || after_name + 4 >= line.size()) return std::nullopt;
  char state = line[after_name + 2];
  auto parent = static_cast<pid_t>(std::strtol(line.c_str() + after_name + 4, nullptr, 10));
  return std::pair{state, parent};
}
}  // namespace

bool process_alive(pid_t pid) {
  auto stat = read_stat(pid);
  return stat && stat->first != 'Z' && stat->first != 'X';
}

std::vector<pid_t> child_processes(pid_t parent) {
  std::vector<pid_t> children;
  std::error_code ignored;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ignored)) {
    const auto name = entry.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const auto pid = static_cast<pid_t>(std::stol(name));
    if (auto stat = read_stat(pid); stat && stat->second == parent) children.push_back(pid);
  }
  return children;
}

std::optional<std::pair<uid_t, gid_t>> unprivileged_user_if_root() {
  if (::geteuid() != 0) return std::nullopt;
  const char* from_env = std::getenv("PGRT_PG_USER");
  std::string name = from_env != nullptr && *from_env != '\0' ? from_env : "postgres";
  std::array<char, 4096> buffer{};
  passwd entry{};
  passwd* found = nullptr;
  ::getpwnam_r(name.c_str(), &entry, buffer.data(), buffer.size(), &found);
  if (found == nullptr) {
    throw std::runtime_error(
        "running as root, so PostgreSQL must run as an unprivileged user, but user '" + name +
        "' does not exist. Install postgresql-15 (it creates 'postgres'), set PGRT_PG_USER to "
        "another unprivileged user, or run as a non-root user");
  }
  if (found->pw_uid == 0) {
    throw std::runtime_error("PGRT_PG_USER='" + name +
                             "' is root; PostgreSQL refuses to run as root. Name an unprivileged "
                             "user");
  }
  return std::pair{found->pw_uid, found->pw_gid};
}

std::string file_tail(const std::filesystem::path& path, std::size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  in.seekg(0, std::ios::end);
  auto size = static_cast<std::size_t>(in.tellg());
  std::size_t start = size > max_bytes ? size - max_bytes : 0;
  in.seekg(static_cast<std::streamoff>(start));
  std::string text(size - start, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  return text;
}

// A port that was free a moment ago. The server may still lose a race for it; the caller retries.
int pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    throw ClusterError(std::string("no free TCP port: cannot create a socket: ") +
                       std::strerror(errno));
  }
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof address;
  auto* generic = reinterpret_cast<sockaddr*>(&address);
  if (::bind(fd, generic, sizeof address) < 0 || ::getsockname(fd, generic, &length) < 0) {
    int bind_errno = errno;
    ::close(fd);
    throw ClusterError(
        std::string("no free TCP port on 127.0.0.1: ") + std::strerror(bind_errno) +
        ". Free some ports (ephemeral range: /proc/sys/net/ipv4/ip_local_port_range)");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

int open_log(const std::filesystem::path& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw ClusterError("cannot create " + path.string() + ": " + std::strerror(errno));
  }
  return fd;
}

}  // namespace pgrt::testing::detail
