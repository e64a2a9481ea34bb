#pragma once

// What the pool needs of a Connection beyond its public API: a leased connection is bound to its
// pool, so that a close() by its user hands the open connection back (the slot then comes back as
// soon as the backend has ended, not when the Lease is dropped), and the pool can cut a leased
// connection through its implementation, which stays put while the Connection object moves with
// its Lease.

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <string>

#include "pgrt/db/connection.hpp"
#include "pgrt/db/pool_types.hpp"

namespace pgrt::detail {

class LeaseBinding {
 public:
  // The user closed a leased connection: `live` is the connection, still open, for the pool to
  // close. Called inside Connection::close(), on the user's thread; the Connection the user holds
  // is empty by then.
  virtual void closed_in_lease(Connection live) noexcept = 0;

 protected:
  LeaseBinding() = default;
  LeaseBinding(const LeaseBinding&) = default;
  LeaseBinding& operator=(const LeaseBinding&) = default;
  LeaseBinding(LeaseBinding&&) = default;
  LeaseBinding& operator=(LeaseBinding&&) = default;
  ~LeaseBinding() = default;
};

// Statement durations, recorded by every connection of a pool, on any thread (relaxed atomics:
// a snapshot may be a statement behind, never torn).
class StatementTimes {
 public:
  void record(std::chrono::nanoseconds duration) noexcept {
    if (duration.count() < 0) duration = std::chrono::nanoseconds(0);
    counts_[DurationHistogram::bucket_of(duration)].fetch_add(1, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(duration.count(), std::memory_order_relaxed);
  }
  [[nodiscard]] DurationHistogram snapshot() const noexcept {
    DurationHistogram copy;
    for (std::size_t i = 0; i < counts_.size(); ++i) {
      copy.counts[i] = counts_[i].load(std::memory_order_relaxed);
      copy.count += copy.counts[i];
    }
    copy.sum = std::chrono::nanoseconds(sum_.load(std::memory_order_relaxed));
    return copy;
  }

 private:
  std::array<std::atomic<std::uint64_t>, DurationHistogram::upper_bounds_seconds.size() + 1>
      counts_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::int64_t> sum_{0};
};

struct ConnectionAccess {
  // From now on, `connection` records how long each statement takes into `times`.
  static void time_statements(Connection& connection,
                              std::shared_ptr<StatementTimes> times) noexcept;
  // Binds `connection` to a lease (null: unbinds it), and returns its implementation: the same
  // object wherever the Connection is moved (null, and nothing bound, when it is empty).
  static Connection::Impl* bind(Connection& connection, LeaseBinding* binding) noexcept;
  // The implementation of an open connection (null when empty), for the pool's shared
  // connections (pool/multiplexer.cpp), which drive libpq themselves.
  static Connection::Impl* impl_of(Connection& connection) noexcept;
  // Whether a connect given up on left a descriptor to watch its backend end by
  // (Connection::Impl::abandon_connect()).
  static bool has_lingering_socket(const Connection& connection) noexcept;
  // The server and database the connection reached ("host:port (database ..., user ...)"), as
  // in its messages; "" when it is not open.
  static std::string server_of(const Connection& connection);
  // Whether the connection goes through a pooler, configured as a transaction pooler or noticed
  // at connect (Connection::Impl::one_segment_in_flight()).
  static bool behind_pooler(const Connection& connection) noexcept;
  // The gentle first step of a cut (Connection::Impl::cut_writing()): thread-safe.
  static void cut_writing(Connection& connection) noexcept;
  // ConnectOptions::cancel_timeout of the connection (0 when empty).
  static std::chrono::milliseconds cancel_timeout(const Connection& connection) noexcept;
  // Forgets the statements query_prepared() cached (the server is about to deallocate them).
  static void forget_statements(Connection& connection) noexcept;
  // Connection::interrupt() on an implementation: thread-safe, as that is.
  static void interrupt(Connection::Impl& impl, std::chrono::milliseconds wait_for_cancel) noexcept;
  // The same in two steps (Connection::Impl::start_interrupt()), for many connections at once.
  static std::shared_future<void> start_interrupt(Connection::Impl& impl) noexcept;
  static void finish_interrupt(Connection::Impl& impl) noexcept;
};

}  // namespace pgrt::detail
