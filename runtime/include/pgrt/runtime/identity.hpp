#pragma once

/// @file
/// Who this process is: host, pid, boot id, start time and a random incarnation, and the tag
/// every connection carries in `application_name`: `<app>/<instance>/<incarnation>`.

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace pgrt {

/// Computed once, on first use. Thread-safe.
struct ProcessIdentity {
  std::string host;     ///< gethostname(); "unknown-host" if it fails.
  int pid = 0;          ///< getpid() of the process it describes.
  std::string boot_id;  ///< /proc/sys/kernel/random/boot_id; "" where there is none.
  std::chrono::system_clock::time_point started;  ///< When the identity was first used.
  /// Eight random lowercase hex digits, new for every process start: tells this run's connections
  /// from an earlier run's with the same app and instance. Starts with 'f' exactly when the
  /// process could not announce it (see incarnation_on_this_host()).
  std::string incarnation;
};

/// On first use the process also announces its incarnation on this host (see
/// incarnation_on_this_host()); an incarnation that a live process on the host already has is
/// drawn again. A child forked after the parent's first use gets an identity of its own (its pid,
/// a new incarnation, announced) at its own first use, and no longer announces the parent's. The
/// reference stays valid for the life of the process. Thread-safe.
[[nodiscard]] const ProcessIdentity& process_identity();

/// Whether a live process of this user on this host has `incarnation`, whatever its environment
/// (its PGRT_RUNTIME_DIR, XDG_RUNTIME_DIR): every process announces its own on first use of
/// process_identity() by binding a datagram socket named `pgrt/incarnation/<incarnation>` in the
/// abstract unix namespace, which the kernel releases when the process (and any child it forked
/// without exec) ends. An abstract name has no permissions, so the name's owner is checked too
/// (the kernel's socket diagnostics, Linux 5.3 or later; where they cannot say, a bound name
/// counts as running). A process that cannot bind it (no unix sockets: a sandbox) takes an
/// incarnation starting with 'f', which an announced one never does, and which every process
/// answers unknown for. "This host" is the network namespace: a container is a host of its own.
enum class HostPresence {
  running,      ///< A live process of this user (or root) here has it (this one's own included).
  not_running,  ///< No live process here has it.
  other_user,   ///< Another user's socket has the name: a squatter, or the same service run as
                ///< another user; neither proves the incarnation dead nor alive.
  unknown,      ///< Cannot tell: unix sockets are not available (a sandbox), not a valid
                ///< incarnation, or one its process could not announce (it starts with 'f':
                ///< that process, in a sandbox, may be alive).
};

/// See HostPresence. Thread-safe; a few system calls, no blocking.
[[nodiscard]] HostPresence incarnation_on_this_host(std::string_view incarnation);

/// "host db-7, pid 4242, boot id 3f2c..., started 2026-11-23T21:19:07Z, incarnation 1a2b3c4d".
[[nodiscard]] std::string describe_process_identity();

/// The instance name used when none is configured: the host name, reduced to ASCII letters,
/// digits, '.', '-' and '_'. Stable across restarts on the same host (in Kubernetes, the pod name:
/// set PGRT_INSTANCE for a Deployment whose pod names change). Not shortened here: the tag
/// functions below shorten it like any other instance name, keeping it distinct.
[[nodiscard]] std::string default_instance_name();

/// Eight lowercase hex digits: the 32-bit FNV-1a hash (offset basis 2166136261, prime 16777619)
/// of `text`'s bytes. The same on every platform and in every run.
[[nodiscard]] std::string stable_name_hash(std::string_view text);

/// The most bytes the app part of a tag takes, so that it never depends on the instance.
inline constexpr std::size_t max_tag_app_bytes = 24;

/// `app` as it appears in tags, lock file names and pgrt-diag's --app matching: printable ASCII
/// other than '/' and '~' kept as is; when anything had to be replaced ('_' for it) or the name
/// is longer than max_tag_app_bytes, a prefix of it followed by '~' and stable_name_hash() of the
/// name as given. So the same name always gives the same result, and two different names give
/// different results (but for a 32-bit hash collision). Depends on `app` only.
[[nodiscard]] std::string tag_app_name(std::string_view app);

/// `instance` as it appears in the tags of `app` (an empty instance means
/// default_instance_name()), shortened the same way to what the tag leaves for it:
/// 53 - tag_app_name(app).size() bytes (at least 29).
[[nodiscard]] std::string tag_instance_name(std::string_view app, std::string_view instance);

/// `<app>/<instance>/<incarnation>` with tag_app_name() and tag_instance_name(): printable ASCII,
/// at most 63 bytes (PostgreSQL's NAMEDATALEN - 1); the incarnation is always whole.
[[nodiscard]] std::string make_connection_tag(std::string_view app, std::string_view instance);

/// The part of a tag before the incarnation, "<app>/<instance>/", as make_connection_tag() would
/// write it: the prefix shared by every incarnation of one instance, and of nothing else.
[[nodiscard]] std::string connection_tag_prefix(std::string_view app, std::string_view instance);

/// The three parts of a connection tag, as parse_connection_tag() finds them.
struct ConnectionTagParts {
  std::string app;          ///< As tag_app_name() writes it.
  std::string instance;     ///< As tag_instance_name() could have written it.
  std::string incarnation;  ///< Eight lowercase hex digits (ProcessIdentity::incarnation).
};

/// `application_name` split into its parts when it has exactly the form of a tag that
/// make_connection_tag() writes for `app` (as configured, shortened here by tag_app_name()) in
/// some process, for some instance:
/// - tag_app_name(app), then '/';
/// - an instance name as tag_instance_name() writes one: 1 to 53 - tag_app_name(app).size()
///   bytes, either printable ASCII other than '/' and '~', or at least one such byte followed by
///   '~' and eight lowercase hex digits (a shortened name);
/// - '/', then the incarnation: exactly eight lowercase hex digits.
/// Anything else gives std::nullopt: another app, `<app>/console`, `<app>/<instance>/report-job`,
/// an incarnation of another length or in upper case. A pure function: thread-safe.
[[nodiscard]] std::optional<ConnectionTagParts> parse_connection_tag(
    std::string_view app, std::string_view application_name);

}  // namespace pgrt
