// Lease: a connection borrowed from a pool, returned (or discarded) when it ends.
#include "driver.hpp"

namespace pgrt {

namespace asio = boost::asio;
using detail::Clock;
using detail::coarse_now;
using detail::throw_pool_error;

// --- Lease ---------------------------------------------------------------------------------------

Lease::Lease(std::shared_ptr<detail::PoolState> pool, detail::pool::Node* node) noexcept
    : pool_(std::move(pool)), node_(node), connection_(pool_->hand_out_locked(*node_)) {}
Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    pool_ = std::move(other.pool_);
    node_ = std::exchange(other.node_, nullptr);
    connection_ = std::move(other.connection_);
  }
  return *this;
}

Connection& Lease::operator*() const {
  if (node_ == nullptr) {
    throw_pool_error(client_errc::not_connected,
                     "this Lease is empty (default-constructed, moved from, released or "
                     "discarded): it has no connection",
                     "acquire a new lease with co_await pool.acquire() or pgrt::connection()");
  }
  return connection_;
}
Connection* Lease::operator->() const {
  return &**this;
}

void Lease::release() noexcept {
  if (node_ != nullptr) pool_->release(*std::exchange(node_, nullptr), &connection_, false);
  pool_.reset();
}

void Lease::discard() noexcept {
  if (node_ != nullptr) pool_->release(*std::exchange(node_, nullptr), &connection_, true);
  pool_.reset();
}

}  // namespace pgrt
