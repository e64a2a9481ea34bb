#include "pgrt/runtime/instance_lock.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "abstract_socket.hpp"
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

// The pid on the file's first line, 0 if none.
int holder_pid_in(int fd) {
  char text[32] = {};
  const ssize_t size = ::pread(fd, text, sizeof text - 1, 0);
  if (size > 0) {
    char* end = nullptr;
    const long pid = std::strtol(text, &end, 10);
    if (end != text && *end == '\n' && pid > 0 && pid <= std::numeric_limits<int>::max()) {
      return static_cast<int>(pid);
    }
  }
  return 0;
}

// The holder writes its pid right after locking: read it from the file (briefly retrying an
// empty one).
int read_holder_pid(int fd) {
  for (int attempt = 0; attempt < 20; ++attempt) {
    if (const int pid = holder_pid_in(fd); pid > 0) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

// The guard: the lock file alone does not hold once the file is removed under its holder
// (systemd-tmpfiles cleaning /tmp/pgrt-<uid>, an operator's rm): the next process would create
// a new file and lock that one. So the holder also binds a unix socket to an abstract name
// derived from the lock file's path. Such a name is not in the file system (nothing can remove
// it), is unique per socket type in the network namespace, and the kernel releases it with the
// socket's last descriptor, so a crash never leaves it behind.
constexpr std::size_t max_guard_name_bytes = sizeof(sockaddr_un::sun_path) - 1;  // the NUL first

// 64-bit FNV-1a, in hex: the guard names of two long lock file paths differ unless their hashes
// collide (then one instance refuses to start beside the other: nothing runs twice).
std::string long_name_hash(std::string_view text) {
  std::uint64_t hash = 14695981039346656037ULL;
  for (char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 1099511628211ULL;
  }
  char hex[17] = {};
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash));
  return hex;
}

// The guard's abstract name for the lock file `path`: "pgrt/lock/<uid>" followed by the lock
// file's absolute path (its directory's symbolic links resolved, so that two spellings of one
// directory share a guard), or, when that is longer than an abstract name can be (107 bytes),
// "pgrt/lock/<uid>/~<hash of that path>/" and as much of the file name as fits. A lock file in
// another directory has another guard, as it is another lock.
std::string guard_name_of(const std::filesystem::path& path) {
  std::error_code error;
  auto directory = std::filesystem::weakly_canonical(path.parent_path(), error);
  if (error) directory = std::filesystem::absolute(path.parent_path(), error).lexically_normal();
  if (error) directory = path.parent_path().lexically_normal();
  const std::string full = (directory / path.filename()).string();
  std::string name = "pgrt/lock/" + std::to_string(::geteuid());
  if (name.size() + 1 + full.size() <= max_guard_name_bytes) {
    return name + (full.front() == '/' ? "" : "/") + full;
  }
  name += "/~" + long_name_hash(full) + "/";
  return name + path.filename().string().substr(0, max_guard_name_bytes - name.size());
}

// The links ("socket:[<inode>]") of the stream sockets bound to the abstract name `name`, as
// /proc/net/unix lists them (this network namespace's); nullopt when it cannot be read or lists
// none.
std::optional<std::vector<std::string>> guard_socket_links(const std::string& name) {
  std::ifstream table("/proc/net/unix");
  if (!table) return std::nullopt;
  const std::string listed = "@" + name;  // (an abstract name's leading NUL shows as '@')
  std::vector<std::string> links;         // "socket:[<inode>]"
  std::string line;
  std::getline(table, line);  // Num RefCount Protocol Flags Type St Inode Path
  while (std::getline(table, line)) {
    std::istringstream fields(line);
    std::string number, references, protocol, flags, type, state, inode;
    if (!(fields >> number >> references >> protocol >> flags >> type >> state >> inode)) continue;
    std::string path;
    std::getline(fields, path);
    if (!path.empty() && path.front() == ' ') path.erase(0, 1);
    if (type == "0001" && path == listed) links.push_back("socket:[" + inode + "]");
  }
  if (links.empty()) return std::nullopt;
  return links;
}

// Whether process `pid` has the guard's socket open, as /proc tells (nullopt when it cannot).
std::optional<bool> process_holds_guard(int pid, const std::string& name) {
  const auto links = guard_socket_links(name);
  if (!links) return std::nullopt;
  std::error_code listing;
  std::filesystem::directory_iterator descriptors("/proc/" + std::to_string(pid) + "/fd", listing);
  if (listing) return std::nullopt;
  try {  // (a process that ends meanwhile can fail the listing)
    for (const auto& descriptor : descriptors) {
      std::error_code reading;
      const auto target = std::filesystem::read_symlink(descriptor.path(), reading);
      if (!reading && std::find(links->begin(), links->end(), target.string()) != links->end()) {
        return true;
      }
    }
  } catch (const std::filesystem::filesystem_error&) {
    return std::nullopt;
  }
  return false;
}

// Where the kernel's socket diagnostics cannot say whose the stream socket bound to the abstract
// name `name` is (no AF_NETLINK in a sandbox: systemd's RestrictAddressFamilies=AF_UNIX AF_INET
// AF_INET6; Linux before 5.3), /proc may: the socket's inode from /proc/net/unix (this network
// namespace's), then a descriptor of it among those of the processes that can be read here (this
// user's; all, for root), whose owner (stat) is the socket's creator. True when that is this
// user, false when it is another, or when no process of this user's has it and every one of them
// could be read (another user's socket, or one of a process in another pid namespace), nullopt
// when /proc cannot tell (no /proc/net/unix, the name not listed, a process of this user's whose
// descriptors cannot be read).
std::optional<bool> scan_for_guard_owner(const std::string& name);

std::optional<bool> held_by_this_user(const std::string& name) {
  try {  // (a process that ends meanwhile can fail a listing)
    return scan_for_guard_owner(name);
  } catch (const std::filesystem::filesystem_error&) {
    return std::nullopt;
  }
}

std::optional<bool> scan_for_guard_owner(const std::string& name) {
  const auto found = guard_socket_links(name);
  if (!found) return std::nullopt;
  const std::vector<std::string>& links = *found;
  // A process's effective uid, as its status says ("" once it is gone).
  const auto effective_uid_of = [](const std::filesystem::path& process) {
    std::ifstream status(process / "status");
    std::string effective;
    for (std::string field; std::getline(status, field);) {
      if (field.starts_with("Uid:")) {
        std::istringstream uids(field.substr(4));
        std::string real;
        uids >> real >> effective;
        break;
      }
    }
    return effective;
  };
  const uid_t uid = ::geteuid();
  bool unreadable = false;  // a process of this user's whose descriptors cannot be read
  std::error_code error;
  for (const auto& process : std::filesystem::directory_iterator("/proc", error)) {
    if (process.path().filename().string().find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    std::error_code listing;
    std::filesystem::directory_iterator descriptors(process.path() / "fd", listing);
    if (listing) {
      // (Another user's process cannot be read, and needs not be: an instance of this user's is
      // a process of this user's, which might be one that cannot be read.)
      unreadable = unreadable || (listing != std::errc::no_such_file_or_directory &&
                                  effective_uid_of(process.path()) == std::to_string(uid));
      continue;
    }
    for (const auto& descriptor : descriptors) {
      std::error_code reading;
      const auto target = std::filesystem::read_symlink(descriptor.path(), reading);
      if (reading || std::find(links.begin(), links.end(), target.string()) == links.end()) {
        continue;
      }
      // The socket's owner, who created it (as the kernel's diagnostics would say), whoever the
      // process is now (one that dropped privileges since, another user's that was handed it).
      struct stat socket_status {};
      if (::stat(descriptor.path().c_str(), &socket_status) != 0) continue;
      return socket_status.st_uid == uid;
    }
  }
  if (error || unreadable) return std::nullopt;
  return false;
}

struct GuardAttempt {
  int fd = -1;        // bound: the guard is taken
  bool held = false;  // another process of this user holds it
  // Neither: no guard can be taken here, the lock file alone guards.
};

// Binds a stream socket (close-on-exec; never listening, so nothing can connect or send to it) to
// the abstract name `name`. No guard (and no error) where no unix socket can be made (a sandbox:
// systemd's RestrictAddressFamilies without AF_UNIX) or where the name is another user's (an
// abstract name has no permissions, so any user may bind it: a squatter must not keep this
// service from starting; a socket named after this uid is never another user's instance). Where
// the kernel cannot tell whose the socket is, /proc is asked (held_by_this_user()); where neither
// can, it is taken for a holder's.
GuardAttempt try_guard(const std::string& name) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  address.sun_path[0] = '\0';
  std::memcpy(address.sun_path + 1, name.data(), name.size());
  const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    if (errno == EAFNOSUPPORT || errno == EPERM || errno == EACCES) return {};
    throw std::system_error(errno, std::generic_category(),
                            "cannot make the instance lock's guard socket");
  }
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&address), length) == 0) return {fd, false};
  const int error = errno;
  ::close(fd);
  if (error == EPERM || error == EACCES) return {};  // refused by a security module
  if (error != EADDRINUSE) {
    throw std::system_error(error, std::generic_category(),
                            "cannot bind the instance lock's guard @" + name);
  }
  const auto owner = detail::abstract_socket_owner(
      std::string_view(address.sun_path, 1 + name.size()), SOCK_STREAM);
  if (owner && *owner != ::geteuid()) return {};
  // (The kernel cannot tell: /proc may. A squatter must not keep the service out there either.)
  if (!owner && held_by_this_user(name) == false) return {};
  return {-1, true};
}

// Takes the guard, waiting up to `patience` for a holder that is letting go: a process that dies
// closes its lock file and its guard one after the other, so a successor can lock the file a
// moment before the guard is free.
GuardAttempt take_guard(const std::string& name, std::chrono::milliseconds patience) {
  const auto deadline = Clock::now() + patience;
  for (;;) {
    GuardAttempt attempt = try_guard(name);
    if (!attempt.held || Clock::now() >= deadline) return attempt;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

[[noreturn]] void refuse_directory(const std::filesystem::path& directory, const std::string& why) {
  throw std::system_error(
      std::make_error_code(std::errc::permission_denied),
      "refusing the instance lock directory " + directory.string() + ": " + why +
          ". Another user could use it to redirect the lock file or plant a pid; remove it, or set "
          "PGRT_RUNTIME_DIR to a directory of your own (mode 0700)");
}

struct LockDirectory {
  int fd = -1;
  std::filesystem::path path;  // where the lock file goes
};

LockDirectory open_private_subdirectory(int shared_fd, const std::filesystem::path& shared);

// Why the directory open as `fd` (`status`: its fstat) cannot hold the lock file, or "" when it
// can: it must be this user's. This user's own directory that others may write into (made under a
// loose umask, or re-moded since) is made private again: what others may have put in it is
// harmless, as the lock file is opened without following links and checked.
std::string make_private(int fd, const struct stat& status) {
  if (status.st_uid != ::geteuid()) {
    return "it belongs to uid " + std::to_string(status.st_uid) + ", not to this user (uid " +
           std::to_string(::geteuid()) + ")";
  }
  if ((status.st_mode & (S_IWGRP | S_IWOTH)) != 0 && ::fchmod(fd, 0700) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(status.st_mode & 07777));
    return std::string("other users may write into it (mode ") + mode +
           ") and it cannot be made private (" + std::strerror(errno) + ")";
  }
  return {};
}

// The lock directory, created with mode 0700 if it is missing, as an O_DIRECTORY descriptor. It
// must be a directory itself (not a symbolic link), owned by this user and writable by nobody else:
// a directory under /tmp can have been made in advance by another user. A shared directory (world-
// or group-writable with the sticky bit: /tmp, /dev/shm, a Kubernetes emptyDir) is never re-moded:
// the lock goes into a private directory of this user's inside it (pgrt-<uid>), which the sticky
// bit keeps others from renaming or removing: all but the shared directory's owner, so one is only
// used when root or this user owns it.
LockDirectory open_lock_directory(const std::filesystem::path& directory) {
  if (directory.has_parent_path()) std::filesystem::create_directories(directory.parent_path());
  if (::mkdir(directory.c_str(), 0700) != 0 && errno != EEXIST) {
    throw std::system_error(errno, std::generic_category(),
                            "cannot create the instance lock directory " + directory.string());
  }
  const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    if (error == ELOOP || error == ENOTDIR) {
      refuse_directory(directory, "it is a symbolic link or not a directory");
    }
    throw std::system_error(error, std::generic_category(),
                            "cannot open the instance lock directory " + directory.string());
  }
  struct stat status {};
  if (::fstat(fd, &status) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::system_error(error, std::generic_category(), "fstat " + directory.string());
  }
  if ((status.st_mode & S_ISVTX) != 0 && (status.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    if (status.st_uid != 0 && status.st_uid != ::geteuid()) {
      ::close(fd);
      refuse_directory(directory, "it is shared (sticky, writable by others) and belongs to uid " +
                                      std::to_string(status.st_uid) +
                                      ", who may rename or remove what others keep in it (the "
                                      "sticky bit does not hold against its owner)");
    }
    return open_private_subdirectory(fd, directory);
  }
  if (const std::string why = make_private(fd, status); !why.empty()) {
    ::close(fd);
    refuse_directory(directory, why);
  }
  return {fd, directory};
}

LockDirectory open_private_subdirectory(int shared_fd, const std::filesystem::path& shared) {
  const std::string name = "pgrt-" + std::to_string(::geteuid());
  const std::filesystem::path directory = shared / name;
  if (::mkdirat(shared_fd, name.c_str(), 0700) != 0 && errno != EEXIST) {
    const int error = errno;
    ::close(shared_fd);
    refuse_directory(shared, std::string("it is shared (sticky, writable by others) and a private "
                                         "directory cannot be made in it (") +
                                 std::strerror(error) + ")");
  }
  const int fd = ::openat(shared_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  const int open_error = errno;
  ::close(shared_fd);
  if (fd < 0) {
    if (open_error == ELOOP || open_error == ENOTDIR) {
      refuse_directory(directory, "it is a symbolic link or not a directory");
    }
    throw std::system_error(open_error, std::generic_category(),
                            "cannot open the instance lock directory " + directory.string());
  }
  struct stat status {};
  const std::string why = ::fstat(fd, &status) != 0
                              ? std::string("fstat failed (") + std::strerror(errno) + ")"
                              : make_private(fd, status);
  if (!why.empty()) {
    ::close(fd);
    refuse_directory(directory, why);
  }
  return {fd, directory};
}

// The lock file inside the directory: never through a symbolic link, and only a regular file of
// this user's with no other name.
int open_lock_file(int directory_fd, const std::filesystem::path& path) {
  const std::string name = path.filename().string();
  const int fd =
      ::openat(directory_fd, name.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    const int error = errno;
    throw std::system_error(error, std::generic_category(),
                            "cannot open the instance lock file " + path.string() +
                                (error == ELOOP ? " (it is a symbolic link: remove it)" : ""));
  }
  struct stat status {};
  if (::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode) || status.st_uid != ::geteuid() ||
      status.st_nlink != 1) {
    ::close(fd);
    throw std::system_error(std::make_error_code(std::errc::permission_denied),
                            "refusing the instance lock file " + path.string() +
                                ": it is not a regular file of this user's with a single name; "
                                "remove it");
  }
  return fd;
}

// Whether process `pid` has the lock file (`lock`'s device and inode) open: only a process that
// holds the very file is a holder to stop. A pid written into the file by anything else, or a pid
// reused since, is never signalled. Throws InstanceLockError when /proc cannot tell (another
// user's process, or no /proc).
bool has_file_open(int pid, const struct stat& lock, const std::string& who) {
  const std::filesystem::path descriptors = "/proc/" + std::to_string(pid) + "/fd";
  std::error_code error;
  std::filesystem::directory_iterator entries(descriptors, error);
  if (error) {
    if (error == std::errc::no_such_file_or_directory) return false;
    throw InstanceLockError("cannot take over " + who + ": cannot tell whether pid " +
                                std::to_string(pid) + " is the holder (" + descriptors.string() +
                                ": " + error.message() +
                                "; a process of another user cannot be stopped from here)",
                            pid);
  }
  for (const auto& entry : entries) {
    struct stat status {};
    if (::stat(entry.path().c_str(), &status) == 0 && status.st_dev == lock.st_dev &&
        status.st_ino == lock.st_ino) {
      return true;
    }
  }
  return false;
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

std::chrono::milliseconds max_takeover_time(const InstanceLockOptions& options) {
  if (!options.force) return std::chrono::milliseconds{0};
  // (Within the range acquire() takes, so that the sum never overflows.)
  const auto grace =
      std::clamp(options.takeover_grace, std::chrono::milliseconds{0}, max_takeover_grace);
  // read_holder_pid() may wait up to 1 s for a holder that has not written its pid yet, and
  // take_guard() what is left of that second for a holder that has not let go of its guard yet.
  return grace + std::min(grace, takeover_kill_wait) + std::chrono::milliseconds(1'000);
}

InstanceLock InstanceLock::acquire(const InstanceLockOptions& options) {
  if (options.takeover_grace < std::chrono::milliseconds{0} ||
      options.takeover_grace > max_takeover_grace) {
    throw std::invalid_argument("InstanceLockOptions::takeover_grace (" +
                                std::to_string(options.takeover_grace.count()) +
                                " ms) must be from 0 to 24 hours");
  }
  const auto requested = options.directory.empty() ? default_lock_directory() : options.directory;
  const std::string instance =
      options.instance.empty() ? default_instance_name() : options.instance;
  const LockDirectory opened = open_lock_directory(requested);
  const int directory_fd = opened.fd;
  const auto path =
      opened.path /
      (file_name_part(tag_app_name(options.application)) + "." +
       file_name_part(tag_instance_name(options.application, options.instance)) + ".lock");
  int fd = -1;
  try {
    fd = open_lock_file(directory_fd, path);
  } catch (...) {
    ::close(directory_fd);
    throw;
  }
  ::close(directory_fd);
  std::optional<int> took_over_from;
  std::vector<std::string> earlier;
  const std::string who = options.application + "/" + instance;
  // max_takeover_time()'s last second: for reading the holder's pid, and what is left of it for
  // the guard (a holder that dies lets go of its lock file and its guard one after the other).
  auto slack = std::chrono::milliseconds(1'000);
  int guard = -1;
  std::string guard_name;
  try {
    if (!try_lock(fd)) {
      const auto reading = Clock::now();
      const int holder = read_holder_pid(fd);
      slack -= std::min(
          slack, std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - reading));
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
      if (holder == ::getpid()) {
        // This process holds the lock already (through an earlier acquire): taking over would
        // signal itself.
        throw InstanceLockError("this process already holds the instance lock of " + who +
                                    " (lock file " + path.string() +
                                    "): one instance lock per app and instance in a process",
                                holder);
      }
      struct stat lock_file {};
      if (::fstat(fd, &lock_file) != 0) {
        throw std::system_error(errno, std::generic_category(), "fstat " + path.string());
      }
      const std::string gone_text = "pid " + std::to_string(holder) +
                                    " named in the lock file is gone, and another process (one "
                                    "that inherited its descriptor?) still holds " +
                                    path.string();
      // Returns once the signal is sent, or the lock taken. The holder is pinned by a pidfd
      // first, then verified (it has this very file open), then signalled through the pidfd: a
      // pid that anything else wrote into the file, or one reused meanwhile, gets no signal.
      // Every failure is an error, never ignored.
      auto stop = [&](int signal, const char* name, std::chrono::milliseconds patience) {
        const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, holder, 0));
        const int pidfd_error = pidfd < 0 ? errno : 0;
        struct Closer {
          int fd;
          ~Closer() {
            if (fd >= 0) ::close(fd);
          }
        } closer{pidfd};
        bool gone = pidfd_error == ESRCH;
        if (!gone && !has_file_open(holder, lock_file, who)) {
          if (try_lock(fd)) return;  // it let go meanwhile
          gone = ::kill(holder, 0) != 0 && errno == ESRCH;
          if (!gone) {
            throw InstanceLockError(
                "cannot take over " + who + ": pid " + std::to_string(holder) +
                    " named in the lock file does not have it open, so it is not the holder and "
                    "gets no signal; the lock " +
                    path.string() + " is held by another process (fuser shows which)",
                holder);
          }
        }
        int sent = -1;
        if (!gone) {
          sent = pidfd >= 0
                     ? static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0))
                     : ::kill(holder, signal);  // no pidfd_open here (seccomp, old kernel)
          gone = sent != 0 && errno == ESRCH;
        }
        if (sent == 0) return;
        const std::error_code error(errno, std::generic_category());
        if (gone) {
          if (wait_for_lock(fd, patience)) return;
          throw InstanceLockError("cannot take over " + who + ": " + gone_text, holder);
        }
        throw InstanceLockError("cannot take over " + who + ": sending " + name + " to pid " +
                                    std::to_string(holder) + " failed (" + error.message() +
                                    "), so it keeps " + path.string(),
                                holder);
      };
      const auto kill_wait = std::min(options.takeover_grace, takeover_kill_wait);
      stop(SIGTERM, "SIGTERM", options.takeover_grace);
      if (!wait_for_lock(fd, options.takeover_grace)) {
        stop(SIGKILL, "SIGKILL", kill_wait);
        if (!wait_for_lock(fd, kill_wait)) {
          throw InstanceLockError("could not take over " + who + " from pid " +
                                      std::to_string(holder) + ": it still holds " + path.string() +
                                      " after SIGTERM and SIGKILL",
                                  holder);
        }
      }
      took_over_from = holder;
    }
    // The lock file is this process's now; the guard must be too. Taken after the file, always:
    // with the file held by this process, the guard can only be held by a holder whose lock file
    // was removed (or replaced) under it, and by one letting go. Nothing is written into the file
    // before: a process that gets no guard leaves it as it found it.
    guard_name = guard_name_of(path);
    const GuardAttempt attempt = take_guard(guard_name, slack);
    if (attempt.held) {
      const int named = holder_pid_in(fd);
      // (Named only if it holds the guard, where /proc can tell: the file may name a live process
      // that holds nothing, a restored copy's or the last holder's, and "stop it first" must not
      // send the operator after it.)
      const bool alive = named > 0 && (::kill(named, 0) == 0 || errno == EPERM) &&
                         process_holds_guard(named, guard_name) != false;
      const std::string force_text =
          options.force ? "; force does not stop a holder it cannot verify through its lock file"
                        : "";
      if (alive) {  // (the file was replaced by one naming its holder: a restored copy?)
        throw InstanceLockError("another " + who + " holds the instance lock's guard @" +
                                    guard_name + " but not the lock file " + path.string() +
                                    ", which names pid " + std::to_string(named) +
                                    " (was the file replaced under it?); stop it first" +
                                    force_text,
                                named);
      }
      throw InstanceLockError("the lock file " + path.string() + " was removed while another " +
                                  who +
                                  " still holds the instance lock (its guard, the abstract unix "
                                  "socket @" +
                                  guard_name +
                                  "): that instance runs on without a lock file; stop it first "
                                  "(ss -xap | grep " +
                                  guard_name + " shows its pid)" + force_text,
                              0);
    }
    guard = attempt.fd;
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
    if (guard >= 0) ::close(guard);
    ::close(fd);
    throw;
  }
  return InstanceLock(fd, guard, path, guard >= 0 ? std::move(guard_name) : std::string(),
                      took_over_from, std::move(earlier));
}

InstanceLock::InstanceLock(InstanceLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      guard_(std::exchange(other.guard_, -1)),
      path_(std::move(other.path_)),
      guard_name_(std::exchange(other.guard_name_, {})),
      took_over_from_(other.took_over_from_),
      earlier_incarnations_(std::move(other.earlier_incarnations_)) {}

InstanceLock& InstanceLock::operator=(InstanceLock&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = std::exchange(other.fd_, -1);
    guard_ = std::exchange(other.guard_, -1);
    path_ = std::move(other.path_);
    guard_name_ = std::exchange(other.guard_name_, {});
    took_over_from_ = other.took_over_from_;
    earlier_incarnations_ = std::move(other.earlier_incarnations_);
  }
  return *this;
}

InstanceLock::~InstanceLock() {
  release();
}

void InstanceLock::release() noexcept {
  // Closing the descriptors releases the lock: the guard first, then the file (the reverse of
  // taking them), so that whoever locks the file next finds the guard free. The file stays:
  // removing it could let a third process lock a new file while a second still waits on the old
  // one.
  if (guard_ >= 0) ::close(std::exchange(guard_, -1));
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
}

}  // namespace pgrt
