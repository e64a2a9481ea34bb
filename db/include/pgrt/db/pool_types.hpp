#pragma once

/// @file
/// The small vocabulary types of the pool (pgrt/db/pool.hpp), apart so that code which only names
/// them needs neither Asio nor libpq.

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
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
  server_role,   ///< its server no longer serves what target_session_attrs asks (read-write,
                 ///< read-only, primary, standby): a primary turned read-only, a standby
                 ///< promoted (seen on return, from what the server reports: PostgreSQL 14+)
};
/// "broken", "lifetime", ...
[[nodiscard]] std::string_view to_string(DiscardReason reason) noexcept;
/// How many DiscardReason values there are (PoolStats::discarded_by_reason is indexed by them).
inline constexpr std::size_t discard_reason_count =
    static_cast<std::size_t>(DiscardReason::server_role) + 1;

/// Durations counted into fixed buckets, as a Prometheus histogram exposes them: the pool keeps
/// one each for waits, uses and connects (PoolStats), cheap enough for every acquire (a few
/// integer compares, no allocation). Not thread-safe by itself: the pool records under its lock.
struct DurationHistogram {
  /// The buckets' upper bounds (inclusive), in seconds: 100 us to 10 s, roughly 1-2.5-5 per
  /// decade (a pool's waits are microseconds when it keeps up and seconds when it does not).
  static constexpr std::array<double, 16> upper_bounds_seconds{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
      0.05,   0.1,     0.25,   0.5,   1.0,    2.5,   5.0,  10.0};
  /// Per bucket, not cumulative: counts[i] counts the durations in (bound[i-1], bound[i]];
  /// the last one, counts[16], those above 10 s.
  std::array<std::uint64_t, upper_bounds_seconds.size() + 1> counts{};
  std::uint64_t count = 0;
  std::chrono::nanoseconds sum{0};

  void record(std::chrono::nanoseconds duration) noexcept {
    if (duration.count() < 0) duration = std::chrono::nanoseconds(0);
    ++counts[bucket_of(duration)];
    ++count;
    sum += duration;
  }
  /// The index in `counts` of the bucket that counts `duration`.
  [[nodiscard]] static std::size_t bucket_of(std::chrono::nanoseconds duration) noexcept {
    std::size_t bucket = 0;
    while (bucket < upper_bounds_nanoseconds.size() &&
           duration.count() > upper_bounds_nanoseconds[bucket]) {
      ++bucket;
    }
    return bucket;
  }

 private:
  static constexpr std::array<std::int64_t, 16> upper_bounds_nanoseconds{
      100'000,       250'000,       500'000,       1'000'000,     2'500'000,   5'000'000,
      10'000'000,    25'000'000,    50'000'000,    100'000'000,   250'000'000, 500'000'000,
      1'000'000'000, 2'500'000'000, 5'000'000'000, 10'000'000'000};
};

}  // namespace pgrt
