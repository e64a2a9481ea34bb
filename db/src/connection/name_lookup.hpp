// Host name lookups for connect(): each name is looked up on a thread of its own, shared by every
// connect that needs the same name while the lookup runs.
//
// getaddrinfo() blocks and cannot be cancelled. asio's resolver runs every lookup of an
// io_context on one background thread, one after the other, and joins that thread when the
// io_context is destroyed: a DNS server that does not answer would hold up the lookups of every
// other name (the healthy hosts of a multi-host conninfo included) and the io_context's
// destruction, for as long as the resolver's own timeouts (seconds to minutes). Here a lookup that
// hangs holds up only the connects that wait for that name, each until its own deadline; its
// thread is detached, and an answer that comes after every waiter gave up is dropped.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace pgrt::detail {

// What a lookup found: numeric addresses in getaddrinfo()'s order, or why there are none.
struct HostAddresses {
  std::vector<std::string> addresses;
  std::string error;  // getaddrinfo()'s message; "" when it answered
};

// The blocking lookup the threads run: getaddrinfo() (TCP, AI_ADDRCONFIG, as asio's resolver
// asks) unless a test has put another in its place. Must not throw.
using BlockingLookup = HostAddresses (*)(const std::string& host);

// Puts `lookup` in place of the blocking lookup for the lookups started from now on; returns the
// one it replaces. For tests: a lookup that hangs, or that counts its calls.
BlockingLookup replace_blocking_lookup(BlockingLookup lookup) noexcept;

enum class LookupEnd {
  answered,   // `answer` holds what the lookup found (addresses or an error)
  timed_out,  // `deadline` passed first
  cancelled,  // the caller's cancellation came first
};

// Looks `host` up: starts a lookup, or joins the one already running for that name, and waits on
// the calling coroutine's executor until it answers, `deadline` passes (none: no deadline) or the
// caller's cancellation slot fires. A lookup running for longer than a few seconds is not joined:
// a fresh one starts (DNS may be back). Throws (std::system_error, boost::system::system_error,
// std::bad_alloc) when no thread, descriptor or memory can be had. Thread-safe: any number of
// coroutines on any executors (a multi-threaded io_context included) may look names up at once.
boost::asio::awaitable<LookupEnd> look_up_host(
    const std::string& host, std::optional<std::chrono::steady_clock::time_point> deadline,
    HostAddresses& answer);

}  // namespace pgrt::detail
