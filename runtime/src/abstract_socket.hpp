#pragma once

// Private to pgrt_runtime: the kernel's word on abstract unix socket names.

#include <optional>
#include <string_view>
#include <sys/types.h>

namespace pgrt::detail {

/// Who owns the unix socket of `type` (SOCK_DGRAM, SOCK_STREAM, ...) bound to the abstract name
/// `path` (its sun_path bytes, the leading NUL included; abstract names are per socket type), as
/// the kernel's socket diagnostics (NETLINK_SOCK_DIAG, UNIX_DIAG_UID: Linux 5.3 and later) tell:
/// the user that created it. Nullopt when no socket has the name or the kernel cannot tell. Reads
/// every unix socket of this network namespace once.
[[nodiscard]] std::optional<uid_t> abstract_socket_owner(std::string_view path, int type);

}  // namespace pgrt::detail
