#pragma once

// The timer used as a condition variable. A coroutine that sleeps until another party (on any
// thread) changes shared state checks that state under the state's mutex, starts a wait on a
// steady_timer with the mutex still held, and releases the mutex only once the wait has started.
// The notifier changes the state and cancels the timer under the same mutex, so it cannot slip in
// between the check and the wait: no wake-up is lost.
//
// - wait_locked(): one waiter on a timer the caller owns (a waiter record in a queue: the notifier
//   picks whom to wake and cancels that record's timer, under the mutex).
// - TimerCondition: any number of waiters, each on a timer of its own in its own frame (so on any
//   executor), all woken by notify_all_locked().
//
// Thread safety: every start, cancel and expiry change of such a timer happens with the mutex
// held. Cancellation: per-operation cancellation (terminal, partial, total) ends a wait at once.
// A cancellation already recorded in the coroutine's state ends it before it starts; note that
// under throw_if_cancelled(true), asio's default, the co_await itself then throws
// operation_aborted first, with the lock still held.

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_state.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/error_code.hpp>
#include <chrono>
#include <cstddef>
#include <mutex>
#include <utility>
#include <vector>

#include "abandon_guard.hpp"

namespace pgrt::detail::async {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

// Waits on `timer` until its expiry, until it is cancelled (by a notifier holding the mutex) or
// until this coroutine is cancelled. `lock` is held on entry and on return, released during the
// wait. Returns the timer's error: none at the expiry, operation_aborted when cancelled either
// way. A coroutine destroyed mid-wait leaves `lock` released and without its mutex: an
// AbandonGuard of the caller that must undo something takes the mutex itself.
// The wait alone, as an asynchronous operation (for hot paths): starts waiting on `timer`, then
// releases `lock`; completes with the timer's error. The caller takes the mutex again after it
// (wait_locked() below does). A deferred operation, to be awaited at once by the coroutine that
// makes it: asio then runs the initiation from the awaiting frame, where use_awaitable would
// start (and allocate) a coroutine frame for it on every wait.
template <typename Mutex>
auto wait_then_unlock(std::unique_lock<Mutex>& lock, asio::steady_timer& timer) {
  auto initiation = [&lock, &timer](auto handler) {
    // Once the wait has started, another thread may complete it and resume (or destroy) the
    // coroutine: nothing of its frame is touched after async_wait.
    const std::unique_lock<Mutex> released(*lock.release(), std::adopt_lock);
    timer.async_wait(std::move(handler));
  };
  constexpr auto no_throw_in_frame = asio::as_tuple(asio::deferred);
  return asio::async_initiate<decltype(no_throw_in_frame), void(boost::system::error_code)>(
      initiation, no_throw_in_frame);
}

template <typename Mutex>
asio::awaitable<boost::system::error_code> wait_locked(std::unique_lock<Mutex>& lock,
                                                       asio::steady_timer& timer) {
  const asio::cancellation_state state = co_await asio::this_coro::cancellation_state;
  if (state.cancelled() != asio::cancellation_type::none) co_return asio::error::operation_aborted;
  Mutex* mutex = lock.mutex();
  auto [error] = co_await wait_then_unlock(lock, timer);
  lock = std::unique_lock<Mutex>(*mutex);
  co_return error;
}

// The same, until `until` (the timer's expiry is set first).
template <typename Mutex>
asio::awaitable<boost::system::error_code> wait_locked(std::unique_lock<Mutex>& lock,
                                                       asio::steady_timer& timer,
                                                       Clock::time_point until) {
  timer.expires_at(until);
  co_return co_await wait_locked(lock, timer);
}

// Why a wait ended. A notification that came with a deadline or a cancellation wins.
enum class Woken { notified, deadline, cancelled };

// A condition variable for coroutines, guarded by the caller's mutex: every member needs it held.
// Like any condition variable's, a wake-up does not prove the state changed: check it again.
class TimerCondition {
 public:
  TimerCondition() = default;
  TimerCondition(const TimerCondition&) = delete;
  TimerCondition& operator=(const TimerCondition&) = delete;
  TimerCondition(TimerCondition&&) = delete;
  TimerCondition& operator=(TimerCondition&&) = delete;
  ~TimerCondition() = default;  // nobody may be waiting

  // Waits until notify_all_locked(), `deadline` or this coroutine's cancellation, on a timer of
  // the coroutine's executor. `lock` holds the guarding mutex on entry and on return. A coroutine
  // destroyed mid-wait takes itself off the list (taking the mutex).
  template <typename Mutex>
  asio::awaitable<Woken> wait(std::unique_lock<Mutex>& lock,
                              Clock::time_point deadline = Clock::time_point::max()) {
    const auto executor = co_await asio::this_coro::executor;
    Waiter waiter(executor);
    waiters_.push_back(&waiter);
    Mutex* mutex = lock.mutex();
    AbandonGuard leave([this, &waiter, &lock, mutex] {
      std::unique_lock<Mutex> relock(*mutex, std::defer_lock);
      if (!lock.owns_lock()) relock.lock();
      std::erase(waiters_, &waiter);
    });
    const boost::system::error_code error = co_await wait_locked(lock, waiter.timer, deadline);
    leave.disarm();
    if (waiter.notified) co_return Woken::notified;  // the notifier took it off the list
    std::erase(waiters_, &waiter);
    co_return error ? Woken::cancelled : Woken::deadline;
  }

  // Wakes every coroutine waiting now.
  void notify_all_locked() {
    for (Waiter* waiter : waiters_) {
      waiter->notified = true;
      waiter->timer.cancel();
    }
    waiters_.clear();
  }

  [[nodiscard]] std::size_t waiting_locked() const noexcept { return waiters_.size(); }

 private:
  struct Waiter {
    explicit Waiter(const asio::any_io_executor& executor) : timer(executor) {}
    asio::steady_timer timer;
    bool notified = false;
  };
  std::vector<Waiter*> waiters_;
};

}  // namespace pgrt::detail::async
