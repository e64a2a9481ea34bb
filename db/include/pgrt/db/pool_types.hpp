#pragma once

/// @file
/// The small vocabulary types of the pool (pgrt/db/pool.hpp), apart so that code which only names
/// them needs neither Asio nor libpq.

#include <string_view>

namespace pgrt {

/// Who is asking. High-priority acquires are served before normal ones and may use the
/// connections reserved by PoolConfig::reserved_for_priority.
enum class Priority { normal, high };

/// Why a connection left the pool.
enum class DiscardReason {
  broken,        ///< its socket failed or was closed (by the server, a proxy or the user)
  lifetime,      ///< it reached PoolConfig::max_lifetime
  idle_timeout,  ///< it was idle above min_idle for PoolConfig::idle_timeout
  failed_reset,  ///< the ROLLBACK or DISCARD ALL on return, or the check before handout, failed
  mid_query,     ///< its Lease was dropped while a statement ran (the statement is cancelled)
  closing,       ///< the pool is closing
  by_user,       ///< Lease::discard(), or Connection::close() on a leased connection
  rejected,      ///< PoolConfig::before_handout said no
  evicted,       ///< Pool::evict_all() (a failover learned of out of band)
  slot_lost,     ///< under a budget, its slot's advisory lock was released (by hand)
  budget_share,  ///< under a budget, another process waited for a slot and this pool held more
                 ///< than its fair share
};
/// "broken", "lifetime", ...
[[nodiscard]] std::string_view to_string(DiscardReason reason) noexcept;

}  // namespace pgrt
