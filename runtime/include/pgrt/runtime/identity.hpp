#pragma once

/// @file
/// Who this process is: host, pid, boot id, start time and a random incarnation, and the tag
/// every connection carries in `application_name`: `<app>/<instance>/<incarnation>`.

#include <chrono>
#include <string>
#include <string_view>

namespace pgrt {

/// Computed once, on first use. Thread-safe.
struct ProcessIdentity {
  std::string host;     ///< gethostname(); "unknown-host" if it fails.
  int pid = 0;          ///< getpid() at first use.
  std::string boot_id;  ///< /proc/sys/kernel/random/boot_id; "" where there is none.
  std::chrono::system_clock::time_point started;  ///< When the identity was first used.
  /// Eight random hex digits, new for every process start: tells this run's connections from an
  /// earlier run's with the same app and instance.
  std::string incarnation;
};

[[nodiscard]] const ProcessIdentity& process_identity();

/// "host db-7, pid 4242, boot id 3f2c..., started 2026-11-23T21:19:07Z, incarnation 1a2b3c4d".
[[nodiscard]] std::string describe_process_identity();

/// The instance name used when none is configured: the host name, reduced to ASCII letters,
/// digits, '.', '-' and '_' (at most 40 bytes). Stable across restarts on the same host (in
/// Kubernetes, the pod name: set PGRT_INSTANCE for a Deployment whose pod names change).
[[nodiscard]] std::string default_instance_name();

/// `<app>/<instance>/<incarnation>` in printable ASCII without '/' inside the names ('_' replaces
/// anything else), at most 63 bytes (PostgreSQL's NAMEDATALEN - 1): the longer of app and instance
/// is shortened first; the incarnation is always whole. An empty instance means
/// default_instance_name().
[[nodiscard]] std::string make_connection_tag(std::string_view app, std::string_view instance);

/// The part of a tag before the incarnation, "<app>/<instance>/", as make_connection_tag() would
/// write it: the prefix shared by every incarnation of one instance.
[[nodiscard]] std::string connection_tag_prefix(std::string_view app, std::string_view instance);

}  // namespace pgrt
