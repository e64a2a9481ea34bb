#include "pgrt/lifecycle/child_process.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <deque>
#include <exception>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <span>
#include <spdlog/spdlog.h>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <utility>

#include "await_helpers.hpp"
#include "command_line_log.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration): POSIX declares it nowhere

namespace pgrt::lifecycle {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

// How often a child is polled for where the kernel has no pidfd_open (before Linux 5.3).
constexpr milliseconds poll_interval{50};

// --- what the child needs, built before the fork ------------------------------------------------

// The program's path and the NULL-terminated argv and envp arrays, which point into the strings
// held here: nothing is allocated between fork and exec.
struct LaunchPlan {
  std::string program;
  std::vector<std::string> arguments;
  std::vector<std::string> environment;
  std::string working_directory;
  std::vector<char*> argv;
  std::vector<char*> envp;

  void point_arrays() {
    argv.clear();
    for (auto& argument : arguments) argv.push_back(argument.data());
    argv.push_back(nullptr);
    envp.clear();
    for (auto& variable : environment) envp.push_back(variable.data());
    envp.push_back(nullptr);
  }
};

[[noreturn]] void throw_errno(int error, const std::string& what) {
  throw std::system_error(error, std::system_category(), what);
}

// execvp()'s lookup, done in the parent: the first executable regular file named `program` in
// the directories of `path` (an empty entry is the working directory).
std::string find_in_path(const std::string& child_name, const std::string& program,
                         const std::string& path) {
  bool denied = false;
  std::size_t begin = 0;
  while (begin <= path.size()) {
    std::size_t end = path.find(':', begin);
    if (end == std::string::npos) end = path.size();
    std::string directory = path.substr(begin, end - begin);
    std::string candidate = (directory.empty() ? std::string(".") : directory) + "/" + program;
    struct stat info {};
    if (::stat(candidate.c_str(), &info) == 0 && S_ISREG(info.st_mode)) {
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
      denied = true;
    }
    begin = end + 1;
  }
  throw_errno(denied ? EACCES : ENOENT, "child '" + child_name + "': cannot run '" + program +
                                            "': " + (denied ? "not executable" : "not found") +
                                            " in PATH \"" + path + "\"");
}

LaunchPlan make_plan(const ChildProcessOptions& options) {
  LaunchPlan plan;
  plan.arguments = options.argv;
  plan.working_directory = options.working_directory;
  std::optional<std::string> path;
  if (options.inherit_environment && environ != nullptr) {
    for (char** entry = environ; *entry != nullptr; ++entry) {
      std::string_view variable(*entry);
      std::string_view key = variable.substr(0, variable.find('='));
      if (options.env.contains(std::string(key))) continue;
      if (key == "PATH") path = std::string(variable.substr(key.size() + 1));
      plan.environment.emplace_back(variable);
    }
  }
  for (const auto& [key, value] : options.env) {
    plan.environment.push_back(key + "=" + value);
    if (key == "PATH") path = value;
  }
  const std::string& program = options.argv.front();
  plan.program = program.find('/') != std::string::npos
                     ? program
                     : find_in_path(options.name, program, path.value_or("/usr/bin:/bin"));
  plan.point_arrays();
  return plan;
}

// --- fork and exec
// --------------------------------------------------------------------------------

// What the child writes to the parent when it cannot exec.
struct ChildFailure {
  enum Step : int { setpgid = 1, pdeathsig, chdir, exec };
  int step = 0;
  int error = 0;
};

// In the child: only async-signal-safe calls, since the parent may have other threads (one may
// have held the allocator's lock at the fork). No allocation, no logging, no exceptions.
[[noreturn]] void become_child(const LaunchPlan& plan, int error_pipe, pid_t parent) noexcept {
  auto fail = [error_pipe](ChildFailure::Step step) {
    ChildFailure failure{step, errno};
    [[maybe_unused]] auto written = ::write(error_pipe, &failure, sizeof failure);
    ::_exit(127);
  };
  if (::setpgid(0, 0) != 0) fail(ChildFailure::setpgid);
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail(ChildFailure::pdeathsig);
  // The parent died before the prctl: nobody would kill this child with it.
  if (::getppid() != parent) ::_exit(127);

  // Every signal was blocked across the fork (launch()): the parent's handlers (asio's, which
  // write to the parent's signal pipe) must never run here. Back to the defaults first, then
  // unblocked. Ignored signals would stay ignored through exec; handlers are reset by exec
  // anyway. glibc refuses its two internal signals and the kernel SIGKILL and SIGSTOP: harmless.
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  ::sigemptyset(&default_action.sa_mask);
  for (int signal_number = 1; signal_number < NSIG; ++signal_number) {
    ::sigaction(signal_number, &default_action, nullptr);
  }
  sigset_t no_signals;
  ::sigemptyset(&no_signals);
  ::sigprocmask(SIG_SETMASK, &no_signals, nullptr);

  // Every descriptor but stdin, stdout, stderr and the error pipe (close-on-exec) goes.
  const auto pipe_fd = static_cast<unsigned>(error_pipe);
  bool closed = true;
  if (pipe_fd < 3) {  // the parent had a standard descriptor closed: the pipe took its number
    closed = ::syscall(SYS_close_range, 3U, ~0U, 0U) == 0;
  } else {
    if (pipe_fd > 3) closed = ::syscall(SYS_close_range, 3U, pipe_fd - 1, 0U) == 0;
    if (closed) closed = ::syscall(SYS_close_range, pipe_fd + 1, ~0U, 0U) == 0;
  }
  if (!closed) {  // before Linux 5.9
    const long max_fd = ::sysconf(_SC_OPEN_MAX);
    for (long fd = 3; fd < std::min(max_fd, 65536L); ++fd) {
      if (fd != error_pipe) ::close(static_cast<int>(fd));
    }
  }

  if (!plan.working_directory.empty() && ::chdir(plan.working_directory.c_str()) != 0) {
    fail(ChildFailure::chdir);
  }
  ::execve(plan.program.c_str(), plan.argv.data(), plan.envp.data());
  fail(ChildFailure::exec);
  ::_exit(127);  // not reached
}

void close_quietly(int fd) noexcept {
  if (fd >= 0) ::close(fd);
}

void reap_blocking(pid_t pid) noexcept {
  siginfo_t info{};
  while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED) != 0 && errno == EINTR) {
  }
}

// Reaps a child just sent SIGKILL, waiting at most `limit`. A process in uninterruptible sleep
// (a hung network file system, a stuck device) dies only when that sleep ends, and a destructor
// must not wait for it for ever. True once reaped (or not ours to reap); false if it had not
// exited by then: init reaps it once this process has exited (a zombie until then, if it ends
// first).
bool reap_killed(pid_t pid, std::chrono::milliseconds limit) noexcept {
  const auto give_up_at = deadline_after(std::chrono::steady_clock::now(), limit);
  auto pause = std::chrono::microseconds(100);
  for (;;) {
    siginfo_t info{};
    const int result = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG);
    if (result == 0 && info.si_pid == pid) return true;
    if (result != 0 && errno != EINTR) return true;  // (ECHILD: reaped already)
    if (std::chrono::steady_clock::now() >= give_up_at) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(20'000));
  }
}

// Forks and execs the plan; returns the child's pid once it has exec'd. Throws std::system_error.
pid_t launch(const std::string& child_name, const LaunchPlan& plan) {
  int pipe_fds[2] = {-1, -1};
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    throw_errno(errno, "child '" + child_name + "': pipe2() failed");
  }
  const pid_t parent = ::getpid();
  // No signal handler of this process may run in the child between fork and exec (as
  // posix_spawn does): every signal is blocked across the fork, and restored here at once.
  sigset_t all_signals;
  sigset_t previous;
  ::sigfillset(&all_signals);
  ::pthread_sigmask(SIG_SETMASK, &all_signals, &previous);
  const pid_t pid = ::fork();
  if (pid == 0) become_child(plan, pipe_fds[1], parent);
  const int fork_error = errno;
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (pid < 0) {
    close_quietly(pipe_fds[0]);
    close_quietly(pipe_fds[1]);
    throw_errno(fork_error, "child '" + child_name + "': fork() failed");
  }

  close_quietly(pipe_fds[1]);
  // Also in the child; whichever comes first. EACCES once the child has exec'd: harmless.
  ::setpgid(pid, pid);
  ChildFailure failure;
  ssize_t got = 0;
  do {
    got = ::read(pipe_fds[0], &failure, sizeof failure);
  } while (got < 0 && errno == EINTR);
  const int read_error = errno;
  close_quietly(pipe_fds[0]);
  if (got == 0) return pid;  // the pipe closed on exec

  reap_blocking(pid);
  if (got != static_cast<ssize_t>(sizeof failure)) {
    throw_errno(got < 0 ? read_error : EIO,
                "child '" + child_name + "': lost track of '" + plan.program + "' at its start");
  }
  std::string what = "child '" + child_name + "': ";
  switch (failure.step) {
    case ChildFailure::setpgid:
      what += "setpgid() failed before running '" + plan.program + "'";
      break;
    case ChildFailure::pdeathsig:
      what += "prctl(PR_SET_PDEATHSIG) failed before running '" + plan.program + "'";
      break;
    case ChildFailure::chdir:
      what += "cannot enter the working directory '" + plan.working_directory + "' to run '" +
              plan.program + "'";
      break;
    default:
      what += "cannot execute '" + plan.program + "'";
      break;
  }
  throw_errno(failure.error, what);
}

bool is_blank(char c) {
  return std::isspace(static_cast<unsigned char>(c)) != 0;
}

bool is_quote(char c) {
  return c == '\'' || c == '"';
}

// A character of a key before '=' or ':' (`PGPASSWORD`, `--db-password`, `"password"`'s inside,
// a URL's `pass%77ord`, a JSON key's `pass\u0077ord`).
bool is_key_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_' || c == '-' || c == '.' ||
         c == '%' || c == '\\';
}

// `key` in lower case, its escapes decoded, as whoever reads the key reads it: a URL's %XX (libpq
// decodes a URL query parameter's name as well as its value: `?pass%77ord=...` is the password),
// JSON's \uXXXX (`"pass\u0077ord"` is "password" to any JSON reader), Python's and YAML's \xXX,
// \UXXXXXXXX and \ooo, a backslash before any other character (`\/`), and XML's &#NNN; and
// &#xXX; (`key="pass&#119;ord"`). A character beyond ASCII is read as '?'.
std::string decoded_lower(std::string_view key) {
  const auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
  };
  // The number in `digits` hexadecimal (or octal) digits at `at`, if all are; it moves `at` past.
  const auto number = [&](std::size_t& at, std::size_t digits, int base) -> std::optional<long> {
    if (at + digits > key.size()) return std::nullopt;
    long value = 0;
    for (std::size_t i = 0; i < digits; ++i) {
      const int digit = hex(key[at + i]);
      if (digit < 0 || digit >= base) return std::nullopt;
      value = value * base + digit;
    }
    at += digits;
    return value;
  };
  const auto ascii = [](long value) {
    return value > 0 && value < 0x80 ? static_cast<char>(value) : '?';
  };
  std::string decoded;
  for (std::size_t i = 0; i < key.size(); ++i) {
    char c = key[i];
    std::size_t next = i + 1;
    if (c == '%') {
      if (const auto value = number(next, 2, 16)) c = static_cast<char>(*value);
    } else if (c == '\\' && next < key.size()) {
      const char kind = key[next++];
      std::optional<long> value;
      if (kind == 'u') value = number(next, 4, 16);
      if (kind == 'U') value = number(next, 8, 16);
      if (kind == 'x') value = number(next, 2, 16);
      if (kind >= '0' && kind <= '7') {
        --next;
        for (std::size_t digits = 3; digits > 0 && !value; --digits)
          value = number(next, digits, 8);
      }
      c = value ? ascii(*value) : kind;
      if (!value && (kind == 'u' || kind == 'U' || kind == 'x')) next = i + 2;
    } else if (c == '&' && next < key.size() && key[next] == '#') {
      const bool hexadecimal =
          next + 1 < key.size() && (key[next + 1] == 'x' || key[next + 1] == 'X');
      std::size_t digits_end = next + (hexadecimal ? 2 : 1);
      std::size_t end = digits_end;
      while (end < key.size() && hex(key[end]) >= 0 && (hexadecimal || key[end] <= '9')) ++end;
      if (end > digits_end && end - digits_end <= 8 && end < key.size() && key[end] == ';') {
        c = ascii(*number(digits_end, end - digits_end, hexadecimal ? 16 : 10));
        next = end + 1;
      }
    }
    decoded += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    i = next - 1;
  }
  return decoded;
}

// Whether `key` (lower case) names a password: it ends with "password", "passwd", an
// abbreviation of "password" down to "pass" (getopt_long takes `--passw=` for `--password=`),
// "pwd" (MYSQL_PWD), "secret" (libpq 18's oauth_client_secret), "passin" or "passout" (openssl's
// `-passin pass:s3cret`).
bool names_a_password(std::string_view key) {
  static constexpr std::string_view password = "password";
  if (key.ends_with("passwd") || key.ends_with("pwd") || key.ends_with("secret") ||
      key.ends_with("passin") || key.ends_with("passout")) {
    return true;
  }
  for (std::size_t length = 4; length <= password.size(); ++length) {
    if (key.ends_with(password.substr(0, length))) return true;
  }
  return false;
}

// Where a quoted value that starts at `at` (its opening quote) ends: past its closing quote (a
// backslash escapes the next character), or the end of `text`.
std::size_t end_of_quoted(std::string_view text, std::size_t at) {
  const char quote = text[at];
  std::size_t end = at + 1;
  while (end < text.size() && text[end] != quote) end += text[end] == '\\' ? 2 : 1;
  return std::min(end + 1, text.size());
}

// A part of a text to hide: [first, second).
using Ranges = std::vector<std::pair<std::size_t, std::size_t>>;

// Where a SQL string constant that starts at `at` ends: '...' (a quote doubled within), E'...'
// (backslash escapes too) or $tag$...$tag$; `at` itself when none starts there.
std::size_t end_of_sql_string(std::string_view text, std::size_t at) {
  if (at >= text.size()) return at;
  if (text[at] == '$') {
    const std::size_t tag_end = text.find('$', at + 1);
    if (tag_end == std::string_view::npos ||
        !std::all_of(text.begin() + static_cast<std::ptrdiff_t>(at + 1),
                     text.begin() + static_cast<std::ptrdiff_t>(tag_end), [](char c) {
                       return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
                     })) {
      return at;
    }
    const std::string_view tag = text.substr(at, tag_end + 1 - at);
    const std::size_t close = text.find(tag, tag_end + 1);
    return close == std::string_view::npos ? text.size() : close + tag.size();
  }
  const bool escapes = text[at] == 'E' || text[at] == 'e';
  std::size_t end = at + (escapes ? 1 : 0);
  if (end >= text.size() || text[end] != '\'') return at;
  for (++end; end < text.size(); ++end) {
    if (escapes && text[end] == '\\') {
      ++end;
    } else if (text[end] == '\'') {
      if (end + 1 < text.size() && text[end + 1] == '\'') {
        ++end;
      } else {
        return end + 1;
      }
    }
  }
  return text.size();
}

// The string constant after each word PASSWORD (any case, or a word ending in it) and blanks: a
// password in SQL (`ALTER ROLE app PASSWORD 's3cret'`, E'...', $$...$$).
Ranges sql_password_ranges(std::string_view text) {
  Ranges ranges;
  const auto word_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
  };
  for (std::size_t at = 0; at < text.size(); ++at) {
    if (!word_char(text[at]) || (at > 0 && word_char(text[at - 1]))) continue;
    std::size_t end = at;
    while (end < text.size() && word_char(text[end])) ++end;
    const std::string word = decoded_lower(text.substr(at, end - at));
    at = end - 1;
    if (!word.ends_with("password")) continue;
    std::size_t constant = end;
    while (constant < text.size() && is_blank(text[constant])) ++constant;
    if (constant == end) continue;
    const std::size_t constant_end = end_of_sql_string(text, constant);
    if (constant_end == constant) continue;
    ranges.emplace_back(constant, constant_end);
    at = constant_end - 1;  // (what is in the constant is hidden: not read again)
  }
  return ranges;
}

// A password in an XML element's attributes beside a key that names it: the `value` attribute of
// .NET's `<add key="password" value="s3cret"/>` and of Spring's `<property name="db.password"
// value="s3cret"/>` (the value with its quotes; in any order, any case), else the element's text,
// up to the next '<', as in Java's `<entry key="password">s3cret</entry>`. The key's entities are
// decoded (`pass&#119;ord`). Each tag is read once, from its '<' on.
Ranges xml_key_value_ranges(std::string_view text) {
  Ranges ranges;
  const auto lowered = [](std::string_view name) {
    std::string lower(name);
    std::transform(lower.begin(), lower.end(), lower.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return lower;
  };
  const auto is_name_char = [](char c) { return (is_key_char(c) && c != '\\') || c == ':'; };
  const auto skip_blanks = [&](std::size_t at) {
    while (at < text.size() && is_blank(text[at])) ++at;
    return at;
  };
  std::size_t at = text.find('<');
  while (at < text.size()) {
    // (The tag's name, then its attributes: name, '=', a quoted value.)
    at = skip_blanks(at + 1);
    while (at < text.size() && is_name_char(text[at])) ++at;
    bool names_a_password_key = false;
    std::optional<std::pair<std::size_t, std::size_t>> value;
    for (;;) {
      at = skip_blanks(at);
      const std::size_t name_start = at;
      while (at < text.size() && is_name_char(text[at])) ++at;
      if (at == name_start) break;
      const std::string name = lowered(text.substr(name_start, at - name_start));
      at = skip_blanks(at);
      if (at >= text.size() || text[at] != '=') break;
      at = skip_blanks(at + 1);
      if (at >= text.size() || !is_quote(text[at])) break;
      const std::size_t close = text.find(text[at], at + 1);
      if (close == std::string_view::npos) {
        at = text.size();
        break;
      }
      if ((name == "key" || name == "name") &&
          names_a_password(decoded_lower(text.substr(at + 1, close - at - 1)))) {
        names_a_password_key = true;
      }
      if (name == "value") value.emplace(at, close + 1);
      at = close + 1;
    }
    if (names_a_password_key) {
      if (value) {
        ranges.push_back(*value);
      } else if (at < text.size() && text[at] == '>') {
        ranges.emplace_back(at + 1, std::min(text.find('<', at + 1), text.size()));
      }
    }
    at = std::min(text.find('<', at), text.size());
  }
  return ranges;
}

// What looks like a password in `text`: the value after each key that names a password (any case,
// so PGPASSWORD= too) and '=', or ':' after a quoted key or before a blank (JSON's `"password":
// "s3cret"`, YAML's `password: s3cret`); blanks around either allowed. The value is quoted (with
// backslash escapes), or runs up to the next blank that no backslash escapes, as libpq reads
// `s3c\ ret`, or, in a URL's query, whose parameter names libpq decodes (`pass%77ord=`), to the
// next '&'. Also the password of each URL's credentials (`scheme://user:password@host`; as for
// libpq, only a '/' ends them before the '@', so a '?', a '#', a blank or a quote may be part of
// the password), and of credentials without a scheme (`app:s3cret@db`). And a password in SQL
// (sql_password_ranges()), and in XML (`<password>s3cret</password>`, xml_key_value_ranges()).
Ranges password_ranges(std::string_view text) {
  constexpr std::size_t npos = std::string_view::npos;
  Ranges ranges;
  // Each scan below remembers what it has seen (the last '?', the end of the value or word it
  // read last) instead of looking back to the start, or on to the end, at each candidate: the
  // time stays linear in `text` (a long argument full of '=', '@' or "://" took seconds).
  const std::size_t first_scheme = text.find("://");
  std::size_t last_query = npos;  // the last '?' up to `scanned`
  std::size_t scanned = 0;
  std::size_t next_ampersand = 0;  // the first '&' at or after the last value read in a query
  std::size_t last_value_end = 0;  // where the last unquoted value ended
  for (std::size_t separator = 0; separator < text.size(); ++separator) {
    const char kind = text[separator];
    if (kind != '=' && kind != ':' && kind != ',') continue;
    std::size_t key_end = separator;
    while (key_end > 0 && is_blank(text[key_end - 1])) --key_end;
    // (An index, os.environ['PGPASSWORD'] = ..., and a call, setenv("PGPASSWORD", ...).)
    const bool indexed = key_end > 1 && text[key_end - 1] == ']' && is_quote(text[key_end - 2]);
    if (indexed) --key_end;
    const bool quoted_key = key_end > 0 && is_quote(text[key_end - 1]);
    if (quoted_key) --key_end;
    if (kind == ',' && (!quoted_key || indexed)) continue;
    std::size_t key_start = key_end;
    while (key_start > 0 && is_key_char(text[key_start - 1])) --key_start;
    if (key_start == key_end) continue;
    // (An option's ':' too: `--password:s3cret`.)
    if (kind == ':' && !quoted_key && text[key_start] != '-' &&
        (separator + 1 >= text.size() || !is_blank(text[separator + 1]))) {
      continue;
    }
    if (!names_a_password(decoded_lower(text.substr(key_start, key_end - key_start)))) continue;
    std::size_t value = separator + 1;
    if (kind == '=' && value < text.size() && text[value] == '>') ++value;  // (`password => ...`)
    while (value < text.size() && is_blank(text[value])) ++value;
    // (`value` only grows from one separator to the next: what lies between is a '>' or blanks.)
    for (; scanned <= value && scanned < text.size(); ++scanned) {
      if (text[scanned] == '?') last_query = scanned;
    }
    const bool in_url_query =
        last_query != npos && first_scheme != npos && first_scheme < last_query;
    std::size_t end = value;
    if (in_url_query) {
      // (In a URL's query only the next '&' ends it: libpq takes a blank or a quote as part of
      // it.)
      if (next_ampersand < value) next_ampersand = std::min(text.find('&', value), text.size());
      end = next_ampersand;
    } else if (value < text.size() && is_quote(text[value])) {
      end = end_of_quoted(text, value);
    } else if (value < last_value_end) {
      // (Within the value read last, whose reading passed `value` itself (a separator, a '>' or
      // a blank is before it, and a backslash can only have skipped the separator): it ends
      // where that one did.)
      end = last_value_end;
    } else {
      // (libpq's backslash escapes: `password=s3c\ ret` is "s3c ret".)
      while (end < text.size() && !is_blank(text[end])) end += text[end] == '\\' ? 2 : 1;
      end = std::min(end, text.size());
      last_value_end = end;
    }
    ranges.emplace_back(value, end);
  }
  // (The word the last scheme's credentials were looked for in: its end and its last '@'.)
  std::size_t word_end = 0;
  std::size_t word_last_at = npos;
  for (std::size_t scheme = first_scheme; scheme != npos; scheme = text.find("://", scheme + 3)) {
    const std::size_t start = scheme + 3;
    // (Only a '/' ends them: a blank or a quote before the '@' is part of the password. The
    // next "://" has a '/': the searches up to the '/' cover the text once in all.)
    const std::size_t authority_end = std::min(text.find('/', start), text.size());
    std::size_t at_sign = text.substr(start, authority_end - start).rfind('@');
    if (at_sign != npos) at_sign += start;
    // A '/' in the password (unencoded: libpq reads the rest as the database name) moves the '@'
    // after it: up to the last '@' of the word then.
    if (at_sign == npos) {
      if (start >= word_end) {
        word_end = start;
        while (word_end < text.size() && !is_blank(text[word_end])) ++word_end;
        word_last_at = text.substr(start, word_end - start).rfind('@');
        if (word_last_at != npos) word_last_at += start;
      }
      if (word_last_at == npos || word_last_at < start) continue;
      at_sign = word_last_at;
    }
    const std::size_t colon = text.substr(start, at_sign - start).find(':');
    if (colon == npos) continue;
    ranges.emplace_back(start + colon + 1, at_sign);
  }
  // Credentials without a scheme, user:password@host (a Go MySQL DSN `app:s3cret@tcp(db)/x`, a
  // URL with its scheme left out): from the word's first ':' to the '@' (not `user@host:path`).
  // (A word ends at a blank or a quote; its first ':' and first "://" are remembered.)
  std::size_t word_colon = npos;
  std::size_t word_scheme = npos;
  for (std::size_t at = 0; at < text.size(); ++at) {
    const char c = text[at];
    if (is_blank(c) || is_quote(c)) {
      word_colon = npos;
      word_scheme = npos;
    } else if (c == ':') {
      if (word_colon == npos) word_colon = at;
      if (word_scheme == npos && text.compare(at, 3, "://") == 0) word_scheme = at;
    } else if (c == '@' && word_colon != npos && (word_scheme == npos || word_scheme + 3 > at)) {
      ranges.emplace_back(word_colon + 1, at);
    }
  }
  // XML's <password>s3cret</password>: up to the next '<'.
  for (std::size_t close = text.find('>'); close != std::string_view::npos;
       close = text.find('>', close + 1)) {
    std::size_t key_start = close;
    while (key_start > 0 && is_key_char(text[key_start - 1])) --key_start;
    if (key_start == close || key_start == 0 || text[key_start - 1] != '<') continue;
    if (!names_a_password(decoded_lower(text.substr(key_start, close - key_start)))) continue;
    ranges.emplace_back(close + 1, std::min(text.find('<', close + 1), text.size()));
  }
  const Ranges sql = sql_password_ranges(text);
  ranges.insert(ranges.end(), sql.begin(), sql.end());
  const Ranges xml = xml_key_value_ranges(text);
  ranges.insert(ranges.end(), xml.begin(), xml.end());
  return ranges;
}

// `text` with each of `ranges` (merged where they overlap or touch) replaced by "***".
std::string hide(std::string_view text, Ranges ranges) {
  std::sort(ranges.begin(), ranges.end());
  std::string shown;
  std::size_t at = 0;
  for (std::size_t i = 0; i < ranges.size();) {
    const std::size_t begin = std::max(ranges[i].first, at);
    std::size_t end = ranges[i].second;
    for (++i; i < ranges.size() && ranges[i].first <= end; ++i) {
      end = std::max(end, ranges[i].second);
    }
    if (end <= begin) continue;
    shown.append(text.substr(at, begin - at));
    shown += "***";
    at = end;
  }
  shown.append(text.substr(std::min(at, text.size())));
  return shown;
}

// Whether `option` (lower case, its dashes included) of `program` names a secret by a name that
// names one only as an option: `--pw` or `-pw` (`--db-pw`), `--token` or `-token` (`--api-token`,
// `--auth-token`), `--auth` (not initdb's: a method, `--auth=trust`).
bool option_names_a_secret(std::string_view option, std::string_view program) {
  const std::size_t dashes = std::min(option.find_first_not_of('-'), option.size());
  if (dashes == 0 || dashes > 2) return false;
  const std::string_view name = option.substr(dashes);
  for (const std::string_view secret : {std::string_view("pw"), std::string_view("token")}) {
    if (name == secret) return true;
    if (name.size() > secret.size() && name.ends_with(secret) &&
        (name[name.size() - secret.size() - 1] == '-' ||
         name[name.size() - secret.size() - 1] == '_')) {
      return true;
    }
  }
  return option == "--auth" && program != "initdb";
}

// The options of `program` whose next argument is a secret though their names do not say so:
// openssl's `-k s3cret` (enc's password) and `-K` (its key, in hexadecimal), ldappasswd's `-s`
// (the new password) and `-a` (the old one).
bool takes_a_secret_next(std::string_view option, std::string_view program) {
  return (program == "openssl" && (option == "-k" || option == "-K")) ||
         (program == "ldappasswd" && (option == "-s" || option == "-a"));
}

// Whether `word` is an option of `program` that names a password and takes it as the next
// argument: `--password s3cret`, `-password`, `--db-password`, `--passwd`, and an abbreviation
// that getopt_long would take for --password, down to `--pass` (any case; not `--password=...`,
// whose value password_ranges() hides); `--pw`, `--token`, `--auth` (option_names_a_secret()),
// and openssl's -k and -K. `--passfile` and shorter abbreviations (`--pa`: --path?) name no
// password.
bool takes_a_password_next(std::string_view word, std::string_view program) {
  if (!word.starts_with('-') || word.find('=') != std::string_view::npos) return false;
  if (takes_a_secret_next(word, program)) return true;
  std::string lowered(word);
  std::transform(lowered.begin(), lowered.end(), lowered.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // (--no-password says there is none: it takes no value.)
  const std::size_t name = lowered.find_first_not_of('-');
  if (name == std::string::npos || lowered.compare(name, 3, "no-") == 0 ||
      lowered.compare(name, 3, "no_") == 0) {
    return false;
  }
  return names_a_password(lowered) || option_names_a_secret(lowered, program);
}

std::string_view file_name(std::string_view program) {
  const std::size_t slash = program.find_last_of('/');
  return slash == std::string_view::npos ? program : program.substr(slash + 1);
}

// Whether `program` (its file name) is one of libpq's client programs, whose -W / --password
// takes no value (it makes them prompt for the password): the argument after it is no password.
bool password_flag_takes_no_value(std::string_view program) {
  static constexpr std::array<std::string_view, 16> tools = {
      "psql",           "pg_dump",    "pg_dumpall", "pg_restore", "pg_basebackup", "pg_receivewal",
      "pg_recvlogical", "pg_amcheck", "createdb",   "dropdb",     "createuser",    "dropuser",
      "clusterdb",      "reindexdb",  "vacuumdb",   "vacuumlo"};
  return std::find(tools.begin(), tools.end(), program) != tools.end();
}

// A program's one-letter option that is a password (or, libpq's -W, asks for one).
struct ShortPasswordOption {
  char letter = 0;
  bool value_may_follow = false;  // `-p s3cret` as well as `-ps3cret`
  // The program's one-letter options that take a value, which is the rest of their word: the
  // letter after one of them is part of that value (mysql's `-uapp` is no -p).
  std::string_view taking_values;
};

// The programs whose short options hold a password, and that letter. Any other program's -p is
// not hidden: for psql, pg_dump, ssh, pgbouncer and most others it is a port.
std::optional<ShortPasswordOption> short_password_option(std::string_view program) {
  static constexpr std::array<std::string_view, 20> mysql_tools = {
      "mysql",        "mysqldump",    "mysqladmin",     "mysqlcheck",    "mysqlimport",
      "mysqlshow",    "mysqlslap",    "mysqlpump",      "mysqlbinlog",   "mysqlsh",
      "mariadb",      "mariadb-dump", "mariadb-admin",  "mariadb-check", "mariadb-import",
      "mariadb-show", "mariadb-slap", "mariadb-binlog", "mysql_upgrade", "mariadb-upgrade"};
  static constexpr std::array<std::string_view, 9> mongo_tools = {
      "mongo",       "mongosh",   "mongodump", "mongorestore", "mongoexport",
      "mongoimport", "mongostat", "mongotop",  "mongofiles"};
  static constexpr std::array<std::string_view, 3> redis_tools = {"redis-cli", "valkey-cli",
                                                                  "keydb-cli"};
  static constexpr std::array<std::string_view, 3> sql_server_tools = {"sqlcmd", "bcp", "osql"};
  static constexpr std::array<std::string_view, 3> mosquitto_tools = {
      "mosquitto_pub", "mosquitto_sub", "mosquitto_rr"};
  static constexpr std::array<std::string_view, 9> ldap_tools = {
      "ldapsearch",  "ldapadd",    "ldapmodify", "ldapdelete", "ldapmodrdn",
      "ldapcompare", "ldapwhoami", "ldappasswd", "ldapexop"};
  const auto among = [&](const auto& names) {
    return std::find(names.begin(), names.end(), program) != names.end();
  };
  // (mysql's -p takes its value only in the same word: `-p orders` asks for the password, and
  // orders is the database; hidden all the same unless an option, as for libpq's -W.)
  if (among(mysql_tools)) return ShortPasswordOption{'p', false, "DehPSuT#OFcr"};
  if (program == "sshpass") return ShortPasswordOption{'p', true, "fdP"};
  if (among(redis_tools)) return ShortPasswordOption{'a', true, "hpsurindD"};
  if (among(mongo_tools)) return ShortPasswordOption{'p', true, "uhd"};
  // (-P: SQL Server's tools, mosquitto's clients, ipmitool; -w: the LDAP tools. mysql's -P is a
  // port.)
  if (among(sql_server_tools)) return ShortPasswordOption{'P', true, "SUHdltshwaioqQcvfYyKMFeLbr"};
  if (among(mosquitto_tools)) return ShortPasswordOption{'P', true, "hpuitmfqAkLMIVDTeCWRNo"};
  if (program == "ipmitool") return ShortPasswordOption{'P', true, "IHUpLfoOtbBmTeCNRzlkKyY"};
  if (among(ldap_tools)) return ShortPasswordOption{'w', true, "bDHhpfysSlzaeEoORUXYTPcA"};
  if (password_flag_takes_no_value(program)) {
    return ShortPasswordOption{'W', false, "cdfhLoPpRTUvFjnNtSEZ"};
  }
  return std::nullopt;
}

// A program's options that take credentials, `user` then a separator then the password: curl's
// `-u user:password`, Samba's `-U user%password`.
struct CredentialsOption {
  std::span<const std::string_view> options;
  char separator = ':';
};

std::optional<CredentialsOption> credentials_option(std::string_view program) {
  static constexpr std::array<std::string_view, 4> curl = {"-u", "--user", "-U", "--proxy-user"};
  static constexpr std::array<std::string_view, 2> samba = {"-U", "--user"};
  // (Not Samba's `net`: too common a word, a docker network's or a path's, to take for the
  // program.)
  static constexpr std::array<std::string_view, 7> samba_tools = {
      "smbclient", "rpcclient", "smbcacls", "smbcquotas", "smbtree", "smbget", "smbspool"};
  if (program == "curl") return CredentialsOption{curl, ':'};
  if (std::find(samba_tools.begin(), samba_tools.end(), program) != samba_tools.end()) {
    return CredentialsOption{samba, '%'};
  }
  return std::nullopt;
}

// Whether the command `words` runs htpasswd (its file name is `program`, at `words[first]`) with
// -b, which takes the password as an argument (`htpasswd -b file user s3cret`, `htpasswd -nb user
// s3cret`); then where that argument is: the third after the options, the second with -n (no
// file), a shell's redirections left out (`> file`, `2>/dev/null`). Options come first, as htpasswd
// reads them, one letter each or together (`-bcB`); -C and -r take a value (in the same word or
// the next). With fewer arguments than that, the last one.
std::optional<std::size_t> htpasswd_password(const std::vector<std::string>& words,
                                             std::size_t first) {
  bool batch = false;
  bool no_file = false;
  std::size_t at = first + 1;
  for (; at < words.size() && words[at].size() > 1 && words[at][0] == '-'; ++at) {
    const std::string& word = words[at];
    for (std::size_t letter = 1; letter < word.size(); ++letter) {
      if (word[letter] == 'b') batch = true;
      if (word[letter] == 'n') no_file = true;
      if (word[letter] == 'C' || word[letter] == 'r') {
        if (letter + 1 == word.size()) ++at;  // (its value is the next word)
        break;
      }
    }
  }
  if (!batch || at >= words.size()) return std::nullopt;
  std::vector<std::size_t> arguments;
  for (; at < words.size(); ++at) {
    const std::string_view word = words[at];
    const std::string_view rest =
        word.substr(std::min(word.find_first_not_of("0123456789"), word.size()));
    if (rest.starts_with('>') || rest.starts_with('<') || rest.starts_with("&>")) {
      if (rest.find_first_not_of("<>|&") == std::string_view::npos) ++at;  // (`>`: its file next)
      continue;
    }
    arguments.push_back(at);
  }
  const std::size_t wanted = no_file ? 2 : 3;
  return arguments.size() >= wanted ? arguments[wanted - 1] : words.size() - 1;
}

// How the log shows one word of a command: as it is (but what secret_ranges() finds), as "***", or
// as its first `kept` characters then "***".
struct Shown {
  enum Kind { as_is, hidden, hidden_after } kind = as_is;
  std::size_t kept = 0;
};

bool is_assignment(std::string_view word) {
  const std::size_t equals = word.find('=');
  return equals != std::string_view::npos && equals > 0 &&
         std::all_of(word.begin(), word.begin() + static_cast<std::ptrdiff_t>(equals), [](char c) {
           return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
         });
}

// Which words of one command (a program and its arguments) hold a password: the argument after
// an option that names a password (after a value-less one, libpq's --password and -W, mysql's
// -p, an option is shown; any other word is still hidden, as a password given there by mistake
// would be one), the value in the same word of a program's one-letter password option (`-ps3cret`,
// also after other letters: `-vps3cret`) and of `--passw=` or `PGPASSWORD=` (however quoted in a
// script: `shell_words`, each word as the shell reads it). The program is the first word that names
// a program whose options pgrt knows to take a password (mysql, sshpass, psql, ...), wherever it
// stands: behind a wrapper and the wrapper's own options and values (`sudo -u app mysql -ps3cret`,
// `docker exec db mysql ...`, `timeout 30 redis-cli -a ...`), which are not told apart from a
// program's; else the first word that is no variable assignment, no option and no `env`, `exec`,
// `sudo`, ...
std::vector<Shown> password_words(const std::vector<std::string>& words, bool shell_words) {
  static constexpr std::array<std::string_view, 9> wrappers = {
      "env", "exec", "command", "nohup", "sudo", "nice", "setsid", "time", "xargs"};
  std::string_view program;
  std::size_t program_at = 0;
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string& word = words[i];
    const std::string_view name = file_name(word);
    // (A tool's name in an option or a value with ':' or '=', `-v /sys/class/net:/sys/class/net`,
    // names no program.)
    const bool may_name_a_program =
        !word.starts_with('-') && word.find_first_of(":=") == std::string::npos;
    if (may_name_a_program &&
        (short_password_option(name) || password_flag_takes_no_value(name) ||
         credentials_option(name) || name == "htpasswd" || name == "openssl" || name == "initdb")) {
      program = name;
      program_at = i;
      break;
    }
    if (program.empty() && !is_assignment(word) && !word.starts_with('-') &&
        std::find(wrappers.begin(), wrappers.end(), name) == wrappers.end()) {
      program = name;  // (unless a known one comes later)
      program_at = i;
    }
  }
  const bool libpq_tool = password_flag_takes_no_value(program);
  const auto short_option = short_password_option(program);
  const auto credentials_options = credentials_option(program);
  std::vector<Shown> shown(words.size());
  if (program == "htpasswd") {
    if (const auto password = htpasswd_password(words, program_at))
      shown[*password].kind = Shown::hidden;
  }
  bool secret_next = false;
  bool option_may_follow = false;     // the word before was a value-less password flag
  bool credentials_next = false;      // the word before was curl's -u: user:password
  bool password_word_before = false;  // the word before was "password"
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string& word = words[i];
    std::string lowered = word;
    std::transform(lowered.begin(), lowered.end(), lowered.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    // (After the word "password", a '=' or ':' on its own is shown and the word after it
    // hidden; SQL's NULL is shown.)
    const bool separator_after_password_word = password_word_before && (word == "=" || word == ":");
    if (secret_next && !(option_may_follow && word.starts_with('-')) &&
        !separator_after_password_word && !(password_word_before && lowered == "null")) {
      shown[i].kind = Shown::hidden;
    }
    password_word_before = false;
    if (separator_after_password_word) continue;
    const bool credentials = credentials_next && !secret_next;
    secret_next = false;
    option_may_follow = false;
    credentials_next = false;
    if (credentials) {
      if (const std::size_t separator = word.find(credentials_options->separator);
          separator != std::string::npos) {
        shown[i] = {Shown::hidden_after, separator + 1};
        continue;
      }
    }
    if (takes_a_password_next(word, program)) {
      secret_next = true;
      const std::string_view name(word);
      // (getopt_long takes `--passw` for --password: value-less too. An option that names a
      // secret only as an option, `--auth`, `--token`, may be a flag of its program's: `mongod
      // --auth --bind_ip_all`.)
      option_may_follow = (libpq_tool && name.starts_with("--") && name.size() >= 6 &&
                           std::string_view("password").starts_with(name.substr(2))) ||
                          !names_a_password(lowered);
      continue;
    }
    if (shown[i].kind == Shown::hidden) continue;
    if (const std::size_t equals = word.find('='); equals != std::string::npos) {
      std::string key = word.substr(0, equals);
      std::transform(key.begin(), key.end(), key.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      // (An argument with a blank after libpq's own keyword is a conninfo, and after -c a
      // script, which secret_ranges() reads as libpq and the shell do: `password=s3cret
      // user=app`, `PGPASSWORD=s3cret psql`. A shell word, or `env`'s `PGPASSWORD=s3 cret`, is
      // one value.)
      const bool read_as_text =
          !shell_words && word.find_first_of(" \t\n") != std::string::npos &&
          (word.starts_with("password=") || word.starts_with("sslpassword=") ||
           (i > 0 && words[i - 1] == "-c"));
      if (!read_as_text && std::all_of(key.begin(), key.end(), is_key_char) &&
          (names_a_password(key) || option_names_a_secret(key, program))) {
        shown[i] = {Shown::hidden_after, equals + 1};
        // (`--password= s3cret`: an empty value, and the password given as the next word.)
        secret_next = equals + 1 == word.size();
        continue;
      }
    }
    // (A word that is only "password": mysqladmin's command, whose next word is the new
    // password, a .netrc's `login app password s3cret`, SQL's PASSWORD before a constant.)
    if (lowered == "password" || lowered == "passwd") {
      secret_next = true;
      password_word_before = true;
      continue;
    }
    if (credentials_options) {
      // curl's and Samba's credentials, `-u user:password`, `-U user%password` (without the
      // password they ask for one).
      for (const std::string_view option : credentials_options->options) {
        if (word == option) {
          credentials_next = true;
          break;
        }
        if (word.starts_with(option) && word.size() > option.size() &&
            (option.size() == 2 || word[option.size()] == '=')) {
          if (const std::size_t separator = word.find(credentials_options->separator);
              separator != std::string::npos) {
            shown[i] = {Shown::hidden_after, separator + 1};
          }
          break;
        }
      }
      continue;
    }
    if (short_option && word.size() >= 2 && word[0] == '-' && word[1] != '-') {
      for (std::size_t at = 1; at < word.size(); ++at) {
        if (short_option->taking_values.find(word[at]) != std::string_view::npos) break;
        if (word[at] != short_option->letter) continue;
        if (at + 1 < word.size()) {
          shown[i] = {Shown::hidden_after, at + 1};
        } else {
          secret_next = true;
          option_may_follow = !short_option->value_may_follow;
        }
        break;
      }
    }
  }
  return shown;
}

// A word of a shell script: where it is in the script, its text without quotes and escapes, and
// where each character of that text is in the script.
struct ShellWord {
  std::size_t begin = 0;
  std::size_t end = 0;
  std::string value;
  std::vector<std::size_t> places;

  void add(char c, std::size_t place) {
    value += c;
    places.push_back(place);
  }
  // Where the character at `index` of `value` is in the script; past its last character (not
  // past a closing quote) for the end of `value`.
  [[nodiscard]] std::size_t place(std::size_t index) const {
    if (index < places.size()) return places[index];
    return places.empty() ? end : places.back() + 1;
  }
};

bool ends_a_command(char c) {
  return c == '\n' || c == ';' || c == '&' || c == '|' || c == '(' || c == ')' || c == '`';
}

// The simple commands of a shell script (as `sh -c` takes it), each a list of words, split at
// ; & | ( ) ` and line breaks; quotes and backslashes are read as the shell reads them.
std::vector<std::vector<ShellWord>> shell_commands(std::string_view script) {
  std::vector<std::vector<ShellWord>> commands(1);
  std::size_t at = 0;
  while (at < script.size()) {
    if (ends_a_command(script[at])) {
      if (!commands.back().empty()) commands.emplace_back();
      ++at;
      continue;
    }
    if (is_blank(script[at])) {
      ++at;
      continue;
    }
    ShellWord word;
    word.begin = at;
    while (at < script.size() && !is_blank(script[at]) && !ends_a_command(script[at])) {
      const char c = script[at];
      if (c == '\'') {
        for (++at; at < script.size() && script[at] != '\''; ++at) word.add(script[at], at);
        at = std::min(at + 1, script.size());
      } else if (c == '"') {
        for (++at; at < script.size() && script[at] != '"'; ++at) {
          if (script[at] == '\\' && at + 1 < script.size()) ++at;
          word.add(script[at], at);
        }
        at = std::min(at + 1, script.size());
      } else if (c == '\\' && at + 1 < script.size()) {
        word.add(script[at + 1], at + 1);
        at += 2;
      } else {
        word.add(c, at);
        ++at;
      }
    }
    word.end = at;
    commands.back().push_back(std::move(word));
  }
  return commands;
}

// What to hide in `text`: password_ranges(), and, when it is a shell script or a command line in
// one argument (`sh -c "exec mysql -ps3cret"`), the words password_words() finds in each of its
// commands, and what is to hide in each word's text (a script or a conninfo quoted in it, a few
// levels deep). Shell and libpq quote differently (`password='it\'s a b'` is one value for libpq,
// not for the shell): both readings are hidden.
Ranges secret_ranges(std::string_view text, int depth) {
  Ranges ranges = password_ranges(text);
  const bool script = std::any_of(text.begin(), text.end(),
                                  [](char c) { return is_blank(c) || ends_a_command(c); });
  if (!script || depth >= 4) return ranges;
  for (const auto& command : shell_commands(text)) {
    std::vector<std::string> values;
    values.reserve(command.size());
    for (const auto& word : command) values.push_back(word.value);
    const std::vector<Shown> shown = password_words(values, true);
    for (std::size_t i = 0; i < command.size(); ++i) {
      const ShellWord& word = command[i];
      if (shown[i].kind == Shown::hidden) {
        ranges.emplace_back(word.begin, word.end);
      } else if (shown[i].kind == Shown::hidden_after) {
        ranges.emplace_back(word.place(shown[i].kept), word.end);  // (a closing quote too)
      }
      for (const auto& [begin, end] : secret_ranges(word.value, depth + 1)) {
        ranges.emplace_back(word.place(begin), word.place(end));
      }
    }
  }
  return ranges;
}

std::string without_secrets(std::string_view text) {
  return hide(text, secret_ranges(text, 0));
}

// The command line for the log, without passwords: password_words() of the whole command, and
// without_secrets() of each word it shows.
std::string join(const std::vector<std::string>& words) {
  const std::vector<Shown> shown = password_words(words, false);
  std::string joined;
  for (std::size_t i = 0; i < words.size(); ++i) {
    if (i > 0) joined += ' ';
    switch (shown[i].kind) {
      case Shown::hidden:
        joined += "***";
        break;
      case Shown::hidden_after:  // (what is kept is a key and '=', or '-' and letters)
        joined += words[i].substr(0, shown[i].kept) + "***";
        break;
      case Shown::as_is:
        joined += without_secrets(words[i]);
        break;
    }
  }
  return joined;
}

void validate(ChildProcessOptions& options) {
  if (options.argv.empty()) throw std::invalid_argument("ChildProcessOptions::argv is empty");
  if (options.argv.front().empty()) {
    throw std::invalid_argument("ChildProcessOptions::argv[0] (the program) is empty");
  }
  if (options.name.empty()) {
    const std::string& program = options.argv.front();
    const auto slash = program.find_last_of('/');
    options.name = slash == std::string::npos ? program : program.substr(slash + 1);
    if (options.name.empty()) options.name = program;
  }
  const std::string prefix = "child '" + options.name + "': ";
  for (std::size_t i = 0; i < options.argv.size(); ++i) {
    if (options.argv[i].find('\0') != std::string::npos) {
      throw std::invalid_argument(prefix + "argv[" + std::to_string(i) + "] has a NUL byte");
    }
  }
  for (const auto& [key, value] : options.env) {
    if (key.empty() || key.find('=') != std::string::npos || key.find('\0') != std::string::npos) {
      throw std::invalid_argument(prefix + "environment variable name '" + key +
                                  "' is empty or has '=' or a NUL byte");
    }
    if (value.find('\0') != std::string::npos) {
      throw std::invalid_argument(prefix + "environment variable " + key + " has a NUL byte");
    }
  }
  if (options.working_directory.find('\0') != std::string::npos) {
    throw std::invalid_argument(prefix + "working_directory has a NUL byte");
  }
  for (auto [duration, label] : {std::pair{options.backoff_initial, "backoff_initial"},
                                 {options.backoff_max, "backoff_max"},
                                 {options.backoff_reset_after, "backoff_reset_after"},
                                 {options.restart_window, "restart_window"},
                                 {options.stop_grace, "stop_grace"},
                                 {options.kill_wait, "kill_wait"}}) {
    if (duration.count() < 0) throw std::invalid_argument(prefix + label + " is negative");
  }
  if (options.backoff_initial > options.backoff_max) {
    throw std::invalid_argument(prefix + "backoff_initial is above backoff_max");
  }
}

}  // namespace

std::string detail::logged_command_line(const std::vector<std::string>& argv) {
  return join(argv);
}

// --- public helpers ----------------------------------------------------------------------------

std::string ChildExit::describe() const {
  if (exit_code) return "exited with code " + std::to_string(*exit_code);
  if (signal) {
    const char* abbreviation = ::sigabbrev_np(*signal);  // thread-safe, unlike strsignal()
    std::string text = "killed by signal " + std::to_string(*signal);
    if (abbreviation != nullptr) text += std::string(" (SIG") + abbreviation + ")";
    if (core_dumped) text += ", core dumped";
    return text;
  }
  return "status lost (reaped elsewhere)";
}

milliseconds restart_delay(milliseconds backoff_initial, milliseconds backoff_max,
                           std::size_t restart) noexcept {
  milliseconds delay = backoff_initial;
  for (std::size_t i = 1; i < restart && delay < backoff_max; ++i) {
    delay =
        delay.count() > std::numeric_limits<milliseconds::rep>::max() / 2 ? backoff_max : delay * 2;
  }
  return std::min(delay, backoff_max);
}

// --- the supervision
// -------------------------------------------------------------------------------

struct ChildProcess::Impl {
  explicit Impl(ChildProcessOptions options_in) : options(std::move(options_in)) {
    const pgrt::detail::EverySubscriber combiner{"child " + options.name};
    events.started.set_combiner(combiner);
    events.exited.set_combiner(combiner);
    events.restart_scheduled.set_combiner(combiner);
    events.stayed_down.set_combiner(combiner);
  }

  // The watch's coroutine frame holds this too: when it goes (the io_context stopped and was
  // destroyed) with a child still running, the child is killed and reaped here.
  ~Impl() {
    const pid_t pid = child.load();
    if (pid > 0) {
      ::kill(-pid, SIGKILL);
      ::kill(pid, SIGKILL);
      if (!reap_killed(pid, killed_child_wait())) {
        spdlog::warn(
            "child {}: pid {} has not exited {} ms after SIGKILL (in uninterruptible sleep?); "
            "left for init to reap once this process exits",
            options.name, pid, killed_child_wait().count());
      }
    }
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  Impl(Impl&&) = delete;
  Impl& operator=(Impl&&) = delete;

  ChildProcessOptions options;
  ChildProcessEvents events;

  // How long the destructor, or a failed start, waits for a child it killed: kill_wait, and a
  // second at least whatever that says (a killable child takes a few milliseconds).
  [[nodiscard]] std::chrono::milliseconds killed_child_wait() const noexcept {
    return std::max(options.kill_wait, std::chrono::milliseconds(1000));
  }
  std::atomic<pid_t> child{0};  // the running child, not yet reaped
  std::atomic<std::size_t> restart_count{0};
  std::atomic<bool> stop_requested{false};
  // Until when the process group has, after stop()'s SIGTERM, to end on its own (grandchildren
  // included, once the child is gone): steady_clock ticks; min() while no SIGTERM was sent.
  std::atomic<Clock::rep> group_grace_until{std::numeric_limits<Clock::rep>::min()};
  std::atomic<bool> watching{false};

  // On the executor only:
  Clock::time_point child_started{};
  std::optional<asio::posix::stream_descriptor> pidfd;
  std::optional<asio::steady_timer> restart_timer;
  std::optional<asio::steady_timer> watch_ended;  // a condition: cancelled when the watch ends
  std::deque<Clock::time_point> restart_times;    // within restart_window
  std::size_t consecutive_restarts = 0;

  // Starts a run of the child (on the executor). Throws std::system_error.
  void start_child(const asio::any_io_executor& executor) {
    const LaunchPlan plan = make_plan(options);
    const pid_t pid = launch(options.name, plan);
    child_started = Clock::now();
    child = pid;
    // Destroyed meanwhile (on another thread): the destructor may have read no child.
    if (stop_requested) ::kill(-pid, SIGKILL);
    try {
      const long fd = ::syscall(SYS_pidfd_open, pid, 0);
      pidfd.reset();
      if (fd >= 0) {
        asio::posix::stream_descriptor watched(executor);
        boost::system::error_code error;
        watched.assign(static_cast<int>(fd), error);  // epoll_ctl may fail (max_user_watches)
        if (error) {
          ::close(static_cast<int>(fd));
        } else {
          pidfd.emplace(std::move(watched));
        }
      }
      if (!pidfd) {
        spdlog::debug("child {}: no pidfd to watch; polling pid {} every {} ms", options.name, pid,
                      poll_interval.count());
      }
      spdlog::info("child {}: started pid {}: {}", options.name, pid,
                   detail::logged_command_line(options.argv));
      events.started(pid);
    } catch (...) {
      // Nobody would watch it: it goes, and is reaped, before the failure is reported.
      ::kill(-pid, SIGKILL);
      (void)reap_killed(pid, killed_child_wait());
      pidfd.reset();
      child = 0;
      throw;
    }
  }

  // Whether a live process other than the leader `group` itself is in process group `group`
  // (/proc/<pid>/stat: its pgrp; zombies do not count).
  static bool group_has_others(pid_t group) {
    std::error_code error;
    std::filesystem::directory_iterator entries("/proc", error);
    for (; !error && entries != std::filesystem::directory_iterator(); entries.increment(error)) {
      const auto& entry = *entries;
      const std::string name = entry.path().filename().string();
      if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
      if (std::stol(name) == group) continue;
      std::ifstream stat(entry.path() / "stat");
      const std::string line{std::istreambuf_iterator<char>(stat), {}};  // a name may hold '\n'
      if (line.empty()) continue;
      const auto after_name = line.rfind(')');  // the command may hold spaces and parentheses
      if (after_name == std::string::npos) continue;
      std::istringstream fields(line.substr(after_name + 1));
      std::string state;
      long parent = 0;
      long process_group = 0;
      if (fields >> state >> parent >> process_group && process_group == group && state != "Z") {
        return true;
      }
    }
    return false;
  }

  // Waits until the child exits, kills what is left of its process group, reaps it.
  asio::awaitable<ChildExit> wait_for_exit() {
    const pid_t pid = child.load();
    bool exited = false;
    if (pidfd) {
      auto [error] = co_await pidfd->async_wait(asio::posix::descriptor_base::wait_read, no_throw);
      exited = !error;
      if (error) {
        spdlog::warn("child {}: watching pid {} failed ({}); polling it", options.name, pid,
                     error.message());
      }
    }
    if (!exited) {
      asio::steady_timer timer(co_await asio::this_coro::executor);
      for (;;) {
        siginfo_t info{};
        const int result =
            ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
        if (result == 0 && info.si_pid != 0) break;
        if (result != 0 && errno != EINTR) break;  // ECHILD: reaped elsewhere
        timer.expires_after(poll_interval);
        co_await timer.async_wait(no_throw);
      }
    }
    // stop()'s SIGTERM went to the whole group: a grandchild winding down (a worker under a
    // `sh -c` that died at once) has what is left of stop_grace too, before the SIGKILL below.
    // The unreaped child pins the group id meanwhile.
    if (stop_requested) {
      asio::steady_timer pause(co_await asio::this_coro::executor);
      while (Clock::now().time_since_epoch().count() < group_grace_until.load() &&
             group_has_others(pid)) {
        pause.expires_after(std::chrono::milliseconds(50));
        co_await pause.async_wait(no_throw);
      }
    }
    // While the child is our unreaped zombie its pid, and so its process group id, cannot be
    // reused: kill what is left of the group. Not if another part of the process reaped it.
    siginfo_t zombie{};
    if (::waitid(P_PID, static_cast<id_t>(pid), &zombie, WEXITED | WNOHANG | WNOWAIT) == 0 &&
        zombie.si_pid == pid) {
      ::kill(-pid, SIGKILL);
    }

    ChildExit exit;
    exit.pid = pid;
    siginfo_t info{};
    int result = 0;
    do {
      result = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED);
    } while (result != 0 && errno == EINTR);
    exit.reaped = Clock::now();
    exit.ran_for = std::chrono::duration_cast<milliseconds>(exit.reaped - child_started);
    exit.stop_requested = stop_requested;
    if (result == 0) {
      if (info.si_code == CLD_EXITED) {
        exit.exit_code = info.si_status;
      } else {
        exit.signal = info.si_status;
        exit.core_dumped = info.si_code == CLD_DUMPED;
      }
    }
    child = 0;
    pidfd.reset();
    co_return exit;
  }

  void report(const ChildExit& exit) {
    if (exit.succeeded() || exit.stop_requested) {
      spdlog::info("child {}: pid {} {} after {} ms{}", options.name, exit.pid, exit.describe(),
                   exit.ran_for.count(), exit.stop_requested ? " (stopping)" : "");
    } else {
      spdlog::warn("child {}: pid {} {} after {} ms", options.name, exit.pid, exit.describe(),
                   exit.ran_for.count());
    }
    events.exited(exit);
  }

  // Why the child must not be started again after a run that `failed` and lasted `ran_for`;
  // nullopt if it may. Keeps the backoff and the restart window's bookkeeping.
  std::optional<std::string> refuse_restart(bool failed, milliseconds ran_for) {
    if (options.restart == RestartPolicy::never) return "restart policy never";
    if (!failed && options.restart == RestartPolicy::on_failure) return "exited with code 0";
    const auto now = Clock::now();
    if (ran_for >= options.backoff_reset_after) consecutive_restarts = 0;
    if (options.restart_window.count() > 0) {
      // (In milliseconds: compared in the clock's nanoseconds, a restart_window of
      // milliseconds::max() would overflow, and every restart fall out of the window at once.)
      while (!restart_times.empty() && std::chrono::duration_cast<milliseconds>(
                                           now - restart_times.front()) >= options.restart_window) {
        restart_times.pop_front();
      }
    }
    if (restart_times.size() >= options.max_restarts) {
      return "restart limit reached: " + std::to_string(restart_times.size()) + " restarts " +
             (options.restart_window.count() > 0
                  ? "within " + std::to_string(options.restart_window.count()) + " ms"
                  : std::string("since start()"));
    }
    return std::nullopt;
  }

  void stay_down(const std::string& reason, bool failed) {
    if (failed) {
      spdlog::error("child {}: stays down: {}", options.name, reason);
    } else {
      spdlog::info("child {}: stays down: {}", options.name, reason);
    }
    events.stayed_down(reason);
  }

  void end_watch() {
    watching = false;
    if (watch_ended) watch_ended->cancel();
  }

  // Waits (on the executor) until the watch has ended or `deadline` passed; true if it ended.
  asio::awaitable<bool> wait_for_watch(Clock::time_point deadline, bool cancellable) {
    if (!watching) co_return true;
    watch_ended->expires_at(deadline);
    if (cancellable) {
      co_await watch_ended->async_wait(no_throw);
    } else {
      co_await watch_ended->async_wait(
          asio::bind_cancellation_slot(asio::cancellation_slot(), no_throw));
    }
    co_return !watching;
  }

  void signal_group(int signal_number) const {
    const pid_t pid = child.load();
    if (pid > 0) ::kill(-pid, signal_number);
  }
};

namespace {

// The watch: waits for each exit, reports it, restarts the child or lets it stay down.
asio::awaitable<void> watch(std::shared_ptr<ChildProcess::Impl> self) {
  const auto executor = co_await asio::this_coro::executor;
  bool watching = true;
  while (watching) {
    const ChildExit exit = co_await self->wait_for_exit();
    self->report(exit);
    if (self->stop_requested) break;
    bool failed = !exit.succeeded();
    milliseconds ran_for = exit.ran_for;
    for (;;) {  // until a restart has started the child
      if (auto reason = self->refuse_restart(failed, ran_for)) {
        self->stay_down(*reason, failed);
        watching = false;
        break;
      }
      const std::size_t restart = ++self->restart_count;
      self->restart_times.push_back(Clock::now());
      const milliseconds delay = restart_delay(
          self->options.backoff_initial, self->options.backoff_max, ++self->consecutive_restarts);
      spdlog::info("child {}: restart {} in {} ms", self->options.name, restart, delay.count());
      self->events.restart_scheduled(ChildRestart{.restart = restart, .delay = delay});
      self->restart_timer->expires_after(delay);
      co_await self->restart_timer->async_wait(no_throw);
      if (self->stop_requested) {
        watching = false;
        break;
      }
      try {
        self->start_child(executor);
        break;
      } catch (const std::exception& error) {
        spdlog::error("child {}: restart {} failed: {}", self->options.name, restart, error.what());
        failed = true;
        ran_for = milliseconds(0);
      }
    }
  }
  self->end_watch();
}

}  // namespace

// --- ChildProcess
// ------------------------------------------------------------------------------------

ChildProcess::ChildProcess(ChildProcessOptions options) {
  validate(options);
  impl_ = std::make_shared<Impl>(std::move(options));
}

ChildProcess::~ChildProcess() {
  if (!impl_) return;
  impl_->stop_requested = true;
  const pid_t pid = impl_->child.load();
  if (pid > 0) {
    spdlog::warn("child {}: destroyed while pid {} runs; killing its process group",
                 impl_->options.name, pid);
    ::kill(-pid, SIGKILL);
  }
}

std::string ChildProcess::name() const {
  return impl_->options.name;
}

asio::awaitable<void> ChildProcess::start() {
  auto self = impl_;
  if (self->watching) {
    throw std::logic_error("child '" + self->options.name + "': start() while it runs");
  }
  const auto executor = co_await asio::this_coro::executor;
  self->stop_requested = false;
  self->restart_count = 0;
  self->restart_times.clear();
  self->consecutive_restarts = 0;
  self->start_child(executor);  // throws: nothing to undo
  self->restart_timer.emplace(executor);
  self->watch_ended.emplace(executor, Clock::time_point::max());
  self->watching = true;
  asio::co_spawn(executor, watch(self), [self](const std::exception_ptr& error) {
    if (!error) return;
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& exception) {
      spdlog::error("child {}: the watch ended with an exception: {}", self->options.name,
                    exception.what());
    } catch (...) {
      spdlog::error("child {}: the watch ended with an exception", self->options.name);
    }
    self->signal_group(SIGKILL);  // reaped by ~Impl() at the latest
    self->end_watch();
  });
}

asio::awaitable<void> ChildProcess::stop() {
  auto self = impl_;
  co_await asio::this_coro::throw_if_cancelled(false);
  self->stop_requested = true;
  if (!self->watching) co_return;
  if (self->restart_timer) self->restart_timer->cancel();
  const auto began = Clock::now();
  const bool cancelled_already =
      (co_await asio::this_coro::cancellation_state).cancelled() != asio::cancellation_type::none;
  bool ended = false;
  if (!cancelled_already) {
    if (const pid_t pid = self->child.load(); pid > 0) {
      spdlog::info("child {}: stopping: SIGTERM to process group {}", self->options.name, pid);
      self->group_grace_until =
          deadline_after(began, self->options.stop_grace).time_since_epoch().count();
      self->signal_group(SIGTERM);
    }
    ended = co_await self->wait_for_watch(deadline_after(began, self->options.stop_grace), true);
  }
  if (!ended) {
    self->group_grace_until = std::numeric_limits<Clock::rep>::min();  // no more waiting
    const bool cancelled =
        (co_await asio::this_coro::cancellation_state).cancelled() != asio::cancellation_type::none;
    if (const pid_t pid = self->child.load(); pid > 0) {
      spdlog::warn("child {}: {}: SIGKILL to process group {}", self->options.name,
                   cancelled ? "stop() cancelled"
                             : "still running " + std::to_string(elapsed_ms(began).count()) +
                                   " ms after SIGTERM",
                   pid);
      self->signal_group(SIGKILL);
    }
    ended =
        co_await self->wait_for_watch(deadline_after(Clock::now(), self->options.kill_wait), false);
    if (!ended) {
      spdlog::error("child {}: pid {} not reaped {} ms after SIGKILL; giving up",
                    self->options.name, self->child.load(), self->options.kill_wait.count());
    }
  }
}

std::optional<pid_t> ChildProcess::pid() const noexcept {
  const pid_t pid = impl_->child.load();
  if (pid > 0) return pid;
  return std::nullopt;
}

std::size_t ChildProcess::restarts() const noexcept {
  return impl_->restart_count.load();
}

bool ChildProcess::supervising() const noexcept {
  return impl_->watching.load();
}

ChildProcessEvents& ChildProcess::events() noexcept {
  return impl_->events;
}

const ChildProcessOptions& ChildProcess::options() const noexcept {
  return impl_->options;
}

}  // namespace pgrt::lifecycle
