// Test helper shared by the unit and process tests: another local user squatting on an
// incarnation's host-wide name (runtime/identity announces each incarnation as an abstract unix
// socket, and an abstract name has no permissions).
#pragma once

#include <cstddef>
#include <cstring>
#include <string>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

namespace pgrt::test {

// Binds `incarnation`'s name (pgrt/incarnation/<incarnation>, abstract unix namespace) in a
// forked child running as the user `nobody`, until the child is killed (SIGKILL it and reap it).
// Returns the child's pid once the name is bound, or -1 (no fork, no setuid: not root, or the
// name already bound).
inline pid_t squat_incarnation_name(const std::string& incarnation) {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  const pid_t squatter = ::fork();
  if (squatter == 0) {
    if (::setuid(65534) != 0) ::_exit(2);
    const int fd = ::socket(AF_UNIX, SOCK_DGRAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string name = std::string(1, '\0') + "pgrt/incarnation/" + incarnation;
    std::memcpy(address.sun_path, name.data(), name.size());
    const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&address), length) != 0) ::_exit(3);
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char byte = 0;
  const bool bound = squatter > 0 && ::read(ready[0], &byte, 1) == 1;
  ::close(ready[0]);
  return bound ? squatter : -1;
}

}  // namespace pgrt::test
