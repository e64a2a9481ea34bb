#pragma once

// An acquire from a pool held by its state (detail::pool_state_of()), not by the Pool object: for
// what may go on after the Pool object is gone (PendingWrites' flusher), which must then get
// pool_closed instead of using it.

#include <boost/asio/awaitable.hpp>
#include <memory>
#include <source_location>

#include "pgrt/db/pool.hpp"

namespace pgrt::detail {

// Pool::acquire(priority) on the pool whose state is `state` (the default consumer). Fails with
// client_errc::pool_closed once the pool is closed (its Pool object destroyed included).
boost::asio::awaitable<Lease> acquire_from(
    const std::shared_ptr<PoolState>& state, Priority priority,
    std::source_location site = std::source_location::current());

}  // namespace pgrt::detail
