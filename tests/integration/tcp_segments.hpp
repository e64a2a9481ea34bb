#pragma once
// How many TCP segments carrying data a socket has sent (the kernel's tcpi_data_segs_out), for
// tests that check how many writes a burst took. In a file of its own: <linux/tcp.h>, which has
// the field, clashes with <netinet/tcp.h>, which asio includes.
#include <cstdint>
#include <optional>

namespace pgrt::testing {

// Nothing if `descriptor` is not a TCP socket or the kernel does not report it (before 4.6).
std::optional<std::uint32_t> tcp_data_segments_sent(int descriptor);

}  // namespace pgrt::testing
