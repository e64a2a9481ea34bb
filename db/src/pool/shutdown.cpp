// Closing a pool, in order (docs/architecture.md, "The shutdown order"):
//   1. the core refuses new acquires, fails the waiters, closes the idle connections and
//      abandons connects in progress (PoolState::begin_close());
//   2. close(grace) waits, on a condition the driver notifies, until every connection is gone
//      or the grace period has passed;
//   3. what is still out is interrupted (a cancel request, then the socket shut down); each of
//      those comes back when its Lease is dropped and its backend has ended.
// close_now() is the same without waiting, for exit handlers.
#include "driver.hpp"
#include "multiplexer.hpp"

namespace pgrt {

namespace detail {

// The synchronous, best-effort close for a process that exits without a graceful stop: runs no
// coroutine. Idle connections are closed here (Terminate, then the socket); leased and
// background ones are interrupted; their capacity is left counted.
void PoolState::close_now() noexcept {
  try {
    std::optional<asio::any_io_executor> pool_executor;
    std::size_t closed = 0, interrupted = 0;
    {
      std::lock_guard lock(mutex);
      pool_executor = executor;
      for_each_locked({pool::NodeState::idle}, [&](const pool::Node& node) {
        connection_of(const_cast<pool::Node&>(node)).close(CloseMode::graceful);
        ++closed;
      });
      // Every cancel request goes out at once, then they are waited for together (at most
      // exit_cancel_wait in all, not each), then the sockets are shut down.
      std::vector<Connection::Impl*> cut;
      for_each_locked(
          {pool::NodeState::leased, pool::NodeState::resetting, pool::NodeState::pinging},
          [&](const pool::Node& node) {
            if (Connection::Impl* impl = interruptible_locked(node)) cut.push_back(impl);
            ++interrupted;
          });
      std::vector<std::shared_future<void>> requests;
      requests.reserve(cut.size());
      for (Connection::Impl* impl : cut)
        requests.push_back(ConnectionAccess::start_interrupt(*impl));
      const auto give_up_at = std::chrono::steady_clock::now() + exit_cancel_wait;
      for (const auto& delivered : requests) {
        if (delivered.valid()) delivered.wait_until(give_up_at);
      }
      for (Connection::Impl* impl : cut) ConnectionAccess::finish_interrupt(*impl);
      // New acquires are refused from now on, on every thread (closed() says so): the rest of the
      // core's close may have to wait for an io thread (below), and the idle connections closed
      // above must never be handed out meanwhile.
      core.refuse_acquires();
      spdlog::warn(
          "pgrt pool {}: closed at exit: {} idle connection(s) closed, {} in use or "
          "being reset interrupted",
          application_name, closed, interrupted);
    }
    if (!pool_executor) {
      std::lock_guard lock(mutex);
      auto& actions = fresh_actions_locked();
      core.close(actions);  // no waiter, timer or connect was ever made
      return;
    }
    // The waiters, the timer and the connects belong to the io threads, which may still be
    // running (std::exit called from one of them): the core's close is carried out there.
    // dispatch() runs it at once when the calling thread runs the io_context; when no thread
    // does, it never runs, and nothing waits on those timers any more.
    asio::dispatch(*pool_executor, [self = shared_from_this()] { self->begin_close(); });
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool {}: closing at exit failed: {}", application_name, error.what());
  }
}

// Refuses new acquires, fails the waiters, closes the idle connections and abandons connects.
void PoolState::begin_close() {
  Deferred deferred;
  // The upkeep's timer belongs to the io_context, which must not outlive it: a closed pool needs
  // no upkeep (upkeep() ends once the core is closed), so it goes now, after the lock (its wait,
  // if any, completes as cancelled).
  std::shared_ptr<asio::steady_timer> upkeep_timer_released;
  std::lock_guard lock(mutex);
  if (core.close_done()) return;
  auto& actions = fresh_actions_locked();
  core.close(actions);
  execute_locked(actions, deferred);
  if (upkeep_timer) upkeep_timer->cancel();
  upkeep_timer_released = std::move(upkeep_timer);
  if (multiplexer) multiplexer->close();  // (its lock is taken under ours, never the reverse)
}

// Pool::close(): see pool.hpp. `self` keeps the state alive if the Pool goes meanwhile.
asio::awaitable<std::vector<std::string>> PoolState::close(std::shared_ptr<PoolState> self,
                                                           std::chrono::milliseconds grace) {
  self->begin_close();
  {
    // (A grace too long to add, milliseconds::max() for one, waits without a limit: the sum
    // would overflow into the past, and cut every lease at once.)
    const auto now = Clock::now();
    const auto deadline = grace.count() < 0 ? now
                          : std::chrono::duration_cast<std::chrono::milliseconds>(
                                Clock::time_point::max() - now) <= grace
                              ? Clock::time_point::max()
                              : now + grace;
    std::unique_lock lock(self->mutex);
    // (No co_await inside a `&&`: g++ 12 evaluates it even when the left side is false, and a
    // pool already drained then waited out its whole grace period.)
    while (!self->core.drained()) {
      if (co_await self->drained.wait(lock, deadline) != async::Woken::notified) break;
    }
  }
  std::vector<std::string> outstanding;
  // The multiplexer holds a strand of the pool's io_context, which must not outlive it: the pool
  // lets go of it here (it went on for the stats while connections drained), so that a Pool
  // object destroyed after its io_context, once closed, touches none of the io_context's memory.
  // (Released after the lock: it may be the last reference.)
  std::shared_ptr<Multiplexer> released;
  std::lock_guard lock(self->mutex);
  released = std::move(self->multiplexer);
  // Its strand and sweeper go now, on this side: a query() caller on another io_context may hold
  // the multiplexer past the pool's io_context (its answer came during the close). (Its lock is
  // taken under ours, never the reverse.)
  if (released) released->release_io();
  // The precise clock: a lease's start may be a steady_clock reading (a waiter served as its
  // connection came up), which the coarse clock, up to a tick behind, would put in the future.
  const auto now = Clock::now();
  // What is still out after the grace period is cut: a running statement is cancelled and the
  // socket shut down, so the server ends those backends now and their holders get
  // connection_lost. The descriptors are freed when the leases come back.
  self->for_each_locked({pool::NodeState::leased}, [&](const pool::Node& node) {
    interrupt_locked(node, std::chrono::milliseconds(0));
    outstanding.push_back(
        describe_site(node.lease_site) + ", held for " +
        std::to_string(
            std::chrono::duration_cast<std::chrono::milliseconds>(now - node.leased_at).count()) +
        " ms");
  });
  self->for_each_locked(
      {pool::NodeState::resetting, pool::NodeState::pinging},
      [&](const pool::Node& node) { interrupt_locked(node, std::chrono::milliseconds(0)); });
  if (!outstanding.empty()) {
    std::string sites;
    for (const auto& site : outstanding) sites += (sites.empty() ? "" : "; ") + site;
    spdlog::warn(
        "pgrt pool {}: {} lease(s) still out after the {} ms grace period were interrupted "
        "(their statements cancelled, their connections cut): {}",
        self->application_name, outstanding.size(), grace.count(), sites);
  }
  co_return outstanding;
}

}  // namespace detail

namespace asio = boost::asio;

void Pool::close_now() noexcept {
  const auto keep = detail::forget_if_process_pool(this);
  state_->close_now();
}

std::function<void()> Pool::close_now_handle() const {
  return [state = std::weak_ptr<detail::PoolState>(state_)] {
    if (const auto alive = state.lock()) alive->close_now();
  };
}

bool Pool::closed() const noexcept {
  std::lock_guard lock(state_->mutex);
  return state_->core.closed();
}

asio::awaitable<std::vector<std::string>> Pool::close(std::chrono::milliseconds grace) {
  const auto keep = detail::forget_if_process_pool(this);
  // Not a coroutine itself: the frame holds the state, so the Pool may be destroyed meanwhile
  // (as the process-wide pool is, when `keep` goes).
  return detail::PoolState::close(state_, grace);
}

}  // namespace pgrt
