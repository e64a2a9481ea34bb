#include "pgrt/runtime/identity.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <random>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <utility>

#include "abstract_socket.hpp"

namespace pgrt {

namespace {

constexpr std::size_t max_tag_bytes = 63;
constexpr std::size_t incarnation_bytes = 8;

std::string read_boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

std::string read_host() {
  std::array<char, 256> name{};
  if (::gethostname(name.data(), name.size() - 1) != 0 || name[0] == '\0') return "unknown-host";
  return name.data();
}

// The first digit of an incarnation its process could not announce (announced_incarnation());
// an announced one never starts with it.
constexpr char unannounced_marker = 'f';

// Eight random lowercase hex digits: an announced incarnation's, 00000000 to efffffff, or (not
// `announced`) an unannounced one's, unannounced_marker and seven random digits.
std::string random_incarnation(bool announced) {
  std::random_device device;
  const auto drawn = static_cast<std::uint32_t>(device());
  const std::uint32_t value = announced ? drawn % 0xF0000000U : 0xF0000000U | (drawn & 0x0FFFFFFFU);
  std::array<char, incarnation_bytes + 1> text{};
  std::snprintf(text.data(), text.size(), "%08x", static_cast<unsigned>(value));
  return text.data();
}

// The abstract unix socket name a live process with `incarnation` binds (the leading NUL marks
// the abstract namespace: no file, no permissions, gone with its last holder).
struct IncarnationAddress {
  sockaddr_un address{};
  socklen_t length = 0;
};

IncarnationAddress incarnation_address(std::string_view incarnation) {
  static constexpr std::string_view prefix = "pgrt/incarnation/";
  IncarnationAddress name;
  name.address.sun_family = AF_UNIX;
  char* path = name.address.sun_path;
  path[0] = '\0';
  std::memcpy(path + 1, prefix.data(), prefix.size());
  std::memcpy(path + 1 + prefix.size(), incarnation.data(), incarnation.size());
  name.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + prefix.size() +
                                       incarnation.size());
  return name;
}

// Draws incarnations until one is announced: bound under its name for the life of the process
// (the descriptor is never closed, and close-on-exec: a program this one executes is another
// process). A name a live process on this host holds is drawn again. Where no unix socket can be
// made or bound (a sandbox: systemd's RestrictAddressFamilies), an unannounced incarnation, marked
// as such by its first digit: incarnation_on_this_host() answers unknown for it in every process,
// so that nobody takes this live process for a dead one because no socket has its name.
// `announcement` receives the bound descriptor (-1 if none).
std::string announced_incarnation(int& announcement) {
  announcement = -1;
  for (int attempt = 0; attempt < 8; ++attempt) {
    std::string incarnation = random_incarnation(true);
    const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) break;
    const auto name = incarnation_address(incarnation);
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&name.address), name.length) == 0) {
      announcement = fd;
      return incarnation;  // NOLINT(clang-analyzer-unix.Stream): kept open on purpose
    }
    const int error = errno;
    ::close(fd);
    if (error != EADDRINUSE) break;
  }
  return random_incarnation(false);
}

constexpr std::size_t hash_suffix_bytes = 1 + 8;  // "~" and stable_name_hash()
// What app and instance share of a tag: 63 bytes less the two '/' and the incarnation.
constexpr std::size_t max_names_bytes = max_tag_bytes - 2 - incarnation_bytes;
static_assert(max_names_bytes > max_tag_app_bytes + hash_suffix_bytes);

// A byte a name keeps in a tag: printable ASCII other than '/' and '~'.
bool plain_tag_byte(char c) {
  const auto byte = static_cast<unsigned char>(c);
  return byte >= 0x20 && byte <= 0x7E && c != '/' && c != '~';
}

// Exactly eight lowercase hex digits, as "%08x" writes them: an incarnation, a name hash.
bool lower_hex(std::string_view text) {
  return text.size() == incarnation_bytes && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Printable ASCII without '/' (the tag's separator) and '~' (the hash marker) is kept; anything
// else, or a name longer than `budget`, gives a prefix and "~<hash of the name as given>", exactly
// `budget` bytes or fewer. A name that needs no change never contains '~', one that was changed
// always does, so the two never meet.
std::string fit_name(std::string_view name, std::size_t budget) {
  std::string clean;
  bool changed = false;
  for (char c : name) {
    const bool plain = plain_tag_byte(c);
    clean += plain ? c : '_';
    changed = changed || !plain;
  }
  if (!changed && clean.size() <= budget) return clean;
  clean.resize(std::min(clean.size(), budget - hash_suffix_bytes));
  return clean + "~" + stable_name_hash(name);
}

}  // namespace

namespace {
// The identity of the process that made it. A child forked after it was made (a prefork server's
// workers) is a process of its own: it gets an identity of its own at its first use, so that its
// connections are told from its parent's and its siblings' (the budget's fair share counts
// processes by tag), and it stops announcing its parent's incarnation. An identity once made is
// never freed (references to it stay valid).
std::atomic<const ProcessIdentity*> current_identity{nullptr};
std::mutex identity_mutex;  // making one; held across fork() (pthread_atfork), so never stuck
int announcement_fd = -1;   // the descriptor that announces the current identity's incarnation

void register_fork_handlers() {
  static std::once_flag registered;
  std::call_once(registered, [] {
    ::pthread_atfork([] { identity_mutex.lock(); }, [] { identity_mutex.unlock(); },
                     [] { identity_mutex.unlock(); });
  });
}
}  // namespace

const ProcessIdentity& process_identity() {
  const int pid = static_cast<int>(::getpid());
  const ProcessIdentity* identity = current_identity.load(std::memory_order_acquire);
  if (identity != nullptr && identity->pid == pid) return *identity;
  register_fork_handlers();
  std::lock_guard lock(identity_mutex);
  identity = current_identity.load(std::memory_order_acquire);
  if (identity != nullptr && identity->pid == pid) return *identity;
  // A forked child: the parent's announcement is the parent's (closing this copy of it leaves
  // the parent's name bound for as long as the parent has it).
  if (announcement_fd >= 0) ::close(std::exchange(announcement_fd, -1));
  std::string incarnation = announced_incarnation(announcement_fd);
  const auto* made = new ProcessIdentity{.host = read_host(),
                                         .pid = pid,
                                         .boot_id = read_boot_id(),
                                         .started = std::chrono::system_clock::now(),
                                         .incarnation = std::move(incarnation)};
  current_identity.store(made, std::memory_order_release);
  return *made;
}

namespace detail {

std::optional<uid_t> abstract_socket_owner(std::string_view path, int type) {
  const int fd = ::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  if (fd < 0) return std::nullopt;
  struct {
    nlmsghdr header;
    unix_diag_req request;
  } message{};
  message.header.nlmsg_len = sizeof message;
  message.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  message.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  message.request.sdiag_family = AF_UNIX;
  message.request.udiag_states = ~0U;
  message.request.udiag_show = UDIAG_SHOW_NAME | UDIAG_SHOW_UID;
  std::optional<uid_t> owner;
  if (::send(fd, &message, sizeof message, 0) != static_cast<ssize_t>(sizeof message)) {
    ::close(fd);
    return std::nullopt;
  }
  // Parsed by hand (netlink's macros are C casts): messages and attributes are 4-byte aligned.
  constexpr auto aligned = [](std::size_t size) { return (size + 3) & ~std::size_t{3}; };
  struct AttributeHeader {  // struct rtattr
    std::uint16_t length;
    std::uint16_t type;
  };
  std::array<char, 32768> buffer{};
  bool done = false;
  while (!done) {
    const ssize_t received = ::recv(fd, buffer.data(), buffer.size(), 0);
    if (received <= 0) break;
    const auto size = static_cast<std::size_t>(received);
    for (std::size_t offset = 0; offset + sizeof(nlmsghdr) <= size;) {
      nlmsghdr header{};
      std::memcpy(&header, buffer.data() + offset, sizeof header);
      if (header.nlmsg_len < sizeof header || offset + header.nlmsg_len > size) break;
      if (header.nlmsg_type == NLMSG_DONE || header.nlmsg_type == NLMSG_ERROR) {
        done = true;
        break;
      }
      const std::size_t end = offset + header.nlmsg_len;
      unix_diag_msg socket_info{};
      if (aligned(sizeof header) + sizeof socket_info > header.nlmsg_len) break;
      std::memcpy(&socket_info, buffer.data() + offset + aligned(sizeof header),
                  sizeof socket_info);
      const bool typed = socket_info.udiag_type == type;
      bool named = false;
      std::optional<uid_t> uid;
      for (std::size_t at = offset + aligned(sizeof header) + aligned(sizeof(unix_diag_msg));
           at + sizeof(AttributeHeader) <= end;) {
        AttributeHeader attribute{};
        std::memcpy(&attribute, buffer.data() + at, sizeof attribute);
        if (attribute.length < sizeof attribute || at + attribute.length > end) break;
        const char* data = buffer.data() + at + sizeof attribute;
        const std::size_t length = attribute.length - sizeof attribute;
        if (attribute.type == UNIX_DIAG_NAME) {
          named = std::string_view(data, length) == path;
        } else if (attribute.type == UNIX_DIAG_UID && length >= sizeof(std::uint32_t)) {
          std::uint32_t value = 0;
          std::memcpy(&value, data, sizeof value);
          uid = static_cast<uid_t>(value);
        }
        at += aligned(attribute.length);
      }
      if (typed && named && uid) owner = uid;
      offset += aligned(header.nlmsg_len);
    }
  }
  ::close(fd);
  return owner;
}

}  // namespace detail

HostPresence incarnation_on_this_host(std::string_view incarnation) {
  // An unannounced incarnation's process has no socket to find, alive or not.
  if (!lower_hex(incarnation) || incarnation.front() == unannounced_marker) {
    return HostPresence::unknown;
  }
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return HostPresence::unknown;
  const auto name = incarnation_address(incarnation);
  // A datagram connect() only looks the name up: nothing is sent, nobody is woken.
  const int connected =
      ::connect(fd, reinterpret_cast<const sockaddr*>(&name.address), name.length);
  const int error = errno;
  ::close(fd);
  if (connected != 0) {
    return error == ECONNREFUSED ? HostPresence::not_running : HostPresence::unknown;
  }
  // An abstract name carries no permissions: any user may bind one. Only a socket of this user
  // (or root) is taken for a live process of this service.
  const std::string_view path(name.address.sun_path, name.length - offsetof(sockaddr_un, sun_path));
  // Where the kernel cannot say (before Linux 5.3, or no AF_NETLINK in a sandbox), the name is
  // taken at its word: a live process is never taken for a dead one.
  // (Abstract names are per socket type: another user's stream or seqpacket socket may have the
  // same name and is not the one a datagram connect() found.)
  const auto owner = detail::abstract_socket_owner(path, SOCK_DGRAM);
  if (!owner) return HostPresence::running;
  return *owner == ::geteuid() || *owner == 0 ? HostPresence::running : HostPresence::other_user;
}

std::string describe_process_identity() {
  const auto& identity = process_identity();
  const std::time_t started = std::chrono::system_clock::to_time_t(identity.started);
  std::tm utc{};
  ::gmtime_r(&started, &utc);
  std::array<char, 32> when{};
  std::strftime(when.data(), when.size(), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return "host " + identity.host + ", pid " + std::to_string(identity.pid) + ", boot id " +
         (identity.boot_id.empty() ? "unknown" : identity.boot_id) + ", started " + when.data() +
         ", incarnation " + identity.incarnation;
}

std::string default_instance_name() {
  std::string name;
  for (char c : process_identity().host) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '.' || c == '-' || c == '_';
    name += plain ? c : '_';
  }
  return name.empty() ? "host" : name;
}

std::string stable_name_hash(std::string_view text) {
  std::uint32_t hash = 2166136261U;
  for (char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 16777619U;
  }
  std::array<char, incarnation_bytes + 1> hex{};
  std::snprintf(hex.data(), hex.size(), "%08x", static_cast<unsigned>(hash));
  return hex.data();
}

std::string tag_app_name(std::string_view app) {
  return fit_name(app, max_tag_app_bytes);
}

std::string tag_instance_name(std::string_view app, std::string_view instance) {
  const std::size_t budget = max_names_bytes - tag_app_name(app).size();
  if (instance.empty()) return fit_name(default_instance_name(), budget);
  return fit_name(instance, budget);
}

std::string make_connection_tag(std::string_view app, std::string_view instance) {
  return connection_tag_prefix(app, instance) + process_identity().incarnation;
}

std::string connection_tag_prefix(std::string_view app, std::string_view instance) {
  return tag_app_name(app) + "/" + tag_instance_name(app, instance) + "/";
}

std::optional<ConnectionTagParts> parse_connection_tag(std::string_view app,
                                                       std::string_view application_name) {
  const std::string app_part = tag_app_name(app);
  if (!application_name.starts_with(app_part) || application_name.size() <= app_part.size() ||
      application_name[app_part.size()] != '/') {
    return std::nullopt;
  }
  const std::string_view rest = application_name.substr(app_part.size() + 1);
  // "<instance>/<incarnation>": the incarnation is the last incarnation_bytes.
  if (rest.size() < 1 + 1 + incarnation_bytes) return std::nullopt;
  const std::string_view incarnation = rest.substr(rest.size() - incarnation_bytes);
  const std::string_view instance = rest.substr(0, rest.size() - incarnation_bytes - 1);
  if (rest[instance.size()] != '/' || !lower_hex(incarnation)) return std::nullopt;
  if (instance.size() > max_names_bytes - app_part.size()) return std::nullopt;
  // Plain, or "<plain prefix>~<hash>" (fit_name()).
  std::string_view plain = instance;
  if (const auto marker = instance.find('~'); marker != std::string_view::npos) {
    if (marker + hash_suffix_bytes != instance.size() || marker == 0 ||
        !lower_hex(instance.substr(marker + 1))) {
      return std::nullopt;
    }
    plain = instance.substr(0, marker);
  }
  if (!std::all_of(plain.begin(), plain.end(), plain_tag_byte)) return std::nullopt;
  return ConnectionTagParts{
      .app = app_part, .instance = std::string(instance), .incarnation = std::string(incarnation)};
}

}  // namespace pgrt
