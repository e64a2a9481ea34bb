#pragma once

// Counts work in flight and lets coroutines wait, without polling, until none is left: add()
// before a piece of work starts, done() exactly once when it ends, wait() for the count to reach
// zero (or a deadline).
//
// Thread safety: add(), done() and wait() may be called from any thread; waiters may run on any
// executors, single- or multi-threaded (each sleeps on a timer of its own, in its own frame).
// done() needs no executor, so a plain thread may call it. Lifetime: the group must outlive every
// call; share it (a shared_ptr) with work that may outlive its waiter. A waiter destroyed mid-wait
// leaves cleanly. Cancellation: per-operation cancellation (terminal, partial, total) ends a wait
// with Woken::cancelled (see timer_condition.hpp for one already recorded).

#include <boost/asio/awaitable.hpp>
#include <cassert>
#include <cstddef>
#include <mutex>

#include "timer_condition.hpp"

namespace pgrt::detail::async {

class WaitGroup {
 public:
  void add(std::size_t count = 1) {
    const std::lock_guard lock(mutex_);
    count_ += count;
  }

  // One piece of work ended; at zero every waiter wakes. noexcept: a mutex or timer failure here
  // terminates, as no caller could recover from it.
  void done() noexcept {  // NOLINT(bugprone-exception-escape)
    const std::lock_guard lock(mutex_);
    assert(count_ > 0 && "WaitGroup::done() without add()");
    if (--count_ == 0) zero_.notify_all_locked();
  }

  [[nodiscard]] std::size_t count() const {
    const std::lock_guard lock(mutex_);
    return count_;
  }

  // Woken::notified once the count is zero (at once if it is), Woken::deadline at `deadline`,
  // Woken::cancelled when this coroutine is cancelled first. A count that reached zero and rose
  // again before the waiter ran still counts as reached.
  asio::awaitable<Woken> wait(Clock::time_point deadline = Clock::time_point::max()) {
    std::unique_lock lock(mutex_);
    if (count_ == 0) co_return Woken::notified;
    co_return co_await zero_.wait(lock, deadline);
  }

 private:
  mutable std::mutex mutex_;
  std::size_t count_ = 0;
  TimerCondition zero_;
};

}  // namespace pgrt::detail::async
