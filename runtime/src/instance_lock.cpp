#include "pgrt/runtime/instance_lock.hpp"

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <fcntl.h>
#include <fstream>
#include <sstream>
#include <sys/file.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "pgrt/runtime/identity.hpp"

namespace pgrt {

namespace {

using Clock = std::chrono::steady_clock;

// A tag name (tag_app_name(), tag_instance_name(): printable ASCII without '/') as a file name
// part: letters, digits, '-', '_' and '~' as they are, any other byte as %XX. There is no '.' left
// in it, so "<app>.<instance>.lock" names exactly one app and instance.
std::string file_name_part(const std::string& text) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string clean;
  for (char c : text) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '-' || c == '_' || c == '~';
    if (plain) {
      clean += c;
    } else {
      const auto byte = static_cast<unsigned char>(c);
      clean += '%';
      clean += hex[byte >> 4];
      clean += hex[byte & 0xF];
    }
  }
  return clean.empty() ? "%" : clean;
}

constexpr std::size_t max_earlier_incarnations = 16;

// The incarnations the earlier holders wrote into the file, newest first: the last holder's
// (line 3), then the ones it carried over (line 5 on; line 4 is its description).
std::vector<std::string> read_earlier_incarnations(int fd) {
  std::string text(8192, '\0');
  const ssize_t size = ::pread(fd, text.data(), text.size(), 0);
  std::vector<std::string> incarnations;
  if (size <= 0) return incarnations;
  text.resize(static_cast<std::size_t>(size));
  std::istringstream in(text);
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    const bool incarnation =
        line.size() == 8 && line.find_first_not_of("0123456789abcdef") == std::string::npos;
    if ((number == 3 || number >= 5) && incarnation) incarnations.push_back(line);
    if (incarnations.size() == max_earlier_incarnations) break;
  }
  return incarnations;
}

bool try_lock(int fd) {
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) return false;
    throw std::system_error(errno, std::generic_category(), "flock");
  }
  return true;
}

// The holder writes its pid right after locking: read it (briefly retrying an empty file).
int read_holder_pid(const std::filesystem::path& path) {
  for (int attempt = 0; attempt < 20; ++attempt) {
    std::ifstream in(path);
    int pid = 0;
    if (in >> pid && pid > 0) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

bool wait_for_lock(int fd, std::chrono::milliseconds patience) {
  const auto deadline = Clock::now() + patience;
  while (!try_lock(fd)) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return true;
}

}  // namespace

std::filesystem::path default_lock_directory() {
  if (const char* dir = std::getenv("PGRT_RUNTIME_DIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  if (const char* dir = std::getenv("XDG_RUNTIME_DIR"); dir != nullptr && *dir != '\0') {
    return std::filesystem::path(dir) / "pgrt";
  }
  if (::geteuid() == 0) return "/run/pgrt";
  return "/tmp/pgrt-" + std::to_string(::geteuid());
}

InstanceLock InstanceLock::acquire(const InstanceLockOptions& options) {
  const auto directory = options.directory.empty() ? default_lock_directory() : options.directory;
  std::filesystem::create_directories(directory);
  const auto path =
      directory /
      (file_name_part(tag_app_name(options.application)) + "." +
       file_name_part(tag_instance_name(options.application, options.instance)) + ".lock");
  const std::string instance =
      options.instance.empty() ? default_instance_name() : options.instance;
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw std::system_error(errno, std::generic_category(),
                            "cannot open the instance lock file " + path.string());
  }
  std::optional<int> took_over_from;
  std::vector<std::string> earlier;
  try {
    if (!try_lock(fd)) {
      const int holder = read_holder_pid(path);
      const std::string who = options.application + "/" + instance;
      const std::string holder_text = holder > 0 ? "pid " + std::to_string(holder) : "a process";
      if (!options.force) {
        throw InstanceLockError("another " + who + " is running as " + holder_text +
                                    " (lock file " + path.string() +
                                    "); stop it first, or start with force (PGRT_FORCE=1) to "
                                    "stop it and take over",
                                holder);
      }
      if (holder <= 0) {
        throw InstanceLockError(
            "cannot take over " + who + ": the lock file " + path.string() + " names no pid", 0);
      }
      // kill() failing is never ignored: EPERM (a process of another user) means it cannot be
      // stopped from here; ESRCH means the named process is gone while something else (a child
      // that inherited the descriptor) still holds the lock, which no signal to it can release.
      auto stop = [&](int signal, const char* name) {
        if (::kill(holder, signal) == 0) return;
        const std::error_code error(errno, std::generic_category());
        const bool gone = error.value() == ESRCH;
        if (gone && wait_for_lock(fd, options.takeover_grace)) return;
        throw InstanceLockError(
            "cannot take over " + who + ": sending " + name + " to pid " + std::to_string(holder) +
                " failed (" + error.message() + ")" +
                (gone ? ", and another process (one that inherited its descriptor?) still holds "
                      : ", so it keeps ") +
                path.string(),
            holder);
      };
      stop(SIGTERM, "SIGTERM");
      if (!wait_for_lock(fd, options.takeover_grace)) {
        stop(SIGKILL, "SIGKILL");
        if (!wait_for_lock(fd, options.takeover_grace)) {
          throw InstanceLockError("could not take over " + who + " from pid " +
                                      std::to_string(holder) + ": it still holds " + path.string() +
                                      " after SIGTERM and SIGKILL",
                                  holder);
        }
      }
      took_over_from = holder;
    }
    earlier = read_earlier_incarnations(fd);
    const auto& identity = process_identity();
    std::ostringstream content;
    content << ::getpid() << '\n'
            << identity.host << '\n'
            << identity.incarnation << '\n'
            << describe_process_identity() << '\n';
    for (const auto& incarnation : earlier) content << incarnation << '\n';
    const std::string text = content.str();
    if (::ftruncate(fd, 0) != 0 ||
        ::pwrite(fd, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
      throw std::system_error(errno, std::generic_category(),
                              "cannot write the instance lock file " + path.string());
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  return InstanceLock(fd, path, took_over_from, std::move(earlier));
}

InstanceLock::InstanceLock(InstanceLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      path_(std::move(other.path_)),
      took_over_from_(other.took_over_from_),
      earlier_incarnations_(std::move(other.earlier_incarnations_)) {}

InstanceLock& InstanceLock::operator=(InstanceLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    took_over_from_ = other.took_over_from_;
    earlier_incarnations_ = std::move(other.earlier_incarnations_);
  }
  return *this;
}

InstanceLock::~InstanceLock() {
  // Closing the descriptor releases the lock. The file stays: removing it could let a third
  // process lock a new file while a second still waits on the old one.
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace pgrt
