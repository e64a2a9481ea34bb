#pragma once

// What the pool needs of a Connection beyond its public API: a leased connection is bound to its
// pool, so that a close() by its user hands the open connection back (the slot then comes back as
// soon as the backend has ended, not when the Lease is dropped), and the pool can cut a leased
// connection through its implementation, which stays put while the Connection object moves with
// its Lease.

#include <chrono>

#include "pgrt/db/connection.hpp"

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

struct ConnectionAccess {
  // Binds `connection` to a lease (null: unbinds it), and returns its implementation: the same
  // object wherever the Connection is moved (null, and nothing bound, when it is empty).
  static Connection::Impl* bind(Connection& connection, LeaseBinding* binding) noexcept;
  // Forgets the statements query_prepared() cached (the server is about to deallocate them).
  static void forget_statements(Connection& connection) noexcept;
  // Connection::interrupt() on an implementation: thread-safe, as that is.
  static void interrupt(Connection::Impl& impl, std::chrono::milliseconds wait_for_cancel) noexcept;
};

}  // namespace pgrt::detail
