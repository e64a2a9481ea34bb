#pragma once

// A coroutine's wait that another party ends, without a timer: the awaiting coroutine's
// completion handler is parked in a record that the waker can reach (a pool's waiter, a query()
// caller's statement), started and ended under the record's mutex, so no wake-up is lost. Cheaper
// than the timer used as a condition variable (timer_condition.hpp): no service lookup to make a
// timer, no timer queue to enter and leave, one post to resume.
//
// - ParkedWait: the parked handler and where it runs.
// - park_then_unlock(): the wait, as an asynchronous operation awaited in place (no coroutine
//   frame of its own). It ends when the waker takes the handler (ParkedWait::take(), under the
//   mutex) and resumes it (resume()), or when the coroutine's per-operation cancellation (any
//   type) takes it first: then with operation_aborted.
// - ParkedWaitWatch: an io_context that shuts down while coroutines of its wait this way destroys
//   their handlers, and with them their coroutines, as asio does for its own pending operations
//   (their frames are unwound; an AbandonGuard in them runs). Each owner of parked waits
//   registers with the watch of every context whose coroutines it parks (watch()).
//
// Thread safety: hold(), take() and the cancellation run under the record's mutex; resume() is
// called without it or with it (post), never in place under it.

#include <algorithm>
#include <array>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/system/error_code.hpp>
#include <cassert>
#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace pgrt::detail::async {

namespace asio = boost::asio;

// A parked completion handler of signature void(error_code), type-erased. A handler of at most two
// pointers that moves without throwing, as a coroutine's is (asio's awaitable handler), is kept
// in place; another is moved to the heap. (ParkedWait, which holds it in the waiting coroutine's
// frame, is no larger than before: a frame that grows past asio's recycling allocator's blocks,
// or only so that frames of different sizes stop taking turns in its two cached blocks, costs a
// malloc per call.) (Every handler went into an
// any_completion_handler before, which allocates: with more coroutines parked at once than asio's
// per-thread cache holds, two blocks, that was one malloc and one free per wait.) Destroying a
// held handler destroys it, and with a coroutine's, the coroutine. Not thread-safe: its owner's
// mutex guards it.
class ParkedHandler {
 public:
  template <typename Held>
  static constexpr bool fits_in_place =
      sizeof(Held) <= 2 * sizeof(void*) &&
      alignof(Held) <= alignof(void*) && std::is_nothrow_move_constructible_v<Held>;

  ParkedHandler() noexcept = default;
  // `its_slot` is set to the handler's cancellation slot (unconnected when it has none).
  template <typename Handler,
            typename = std::enable_if_t<!std::is_same_v<std::decay_t<Handler>, ParkedHandler>>>
  ParkedHandler(Handler&& handler, asio::cancellation_slot& its_slot) {
    using Held = std::decay_t<Handler>;
    its_slot = asio::get_associated_cancellation_slot(handler);
    if constexpr (fits_in_place<Held>) {
      new (storage_) Held(std::forward<Handler>(handler));
      operations_ = &in_place<Held>;
    } else {
      new (storage_) Held*(new Held(std::forward<Handler>(handler)));
      operations_ = &on_heap<Held>;
    }
  }
  ParkedHandler(ParkedHandler&& other) noexcept { take_from(other); }
  ParkedHandler& operator=(ParkedHandler&& other) noexcept {
    if (this != &other) {
      reset();
      take_from(other);
    }
    return *this;
  }
  ParkedHandler(const ParkedHandler&) = delete;
  ParkedHandler& operator=(const ParkedHandler&) = delete;
  ~ParkedHandler() { reset(); }

  explicit operator bool() const noexcept { return operations_ != nullptr; }
  // Whether the handler is kept in place (no allocation held), for tests.
  [[nodiscard]] bool held_in_place() const noexcept {
    return operations_ != nullptr && operations_->in_place;
  }

  // Calls the handler (moved out first: this one is empty when it runs).
  void operator()(boost::system::error_code error) && {
    std::exchange(operations_, nullptr)->invoke(storage_, error);
  }

 private:
  struct Operations {
    void (*invoke)(void* storage, boost::system::error_code error);
    void (*move_to)(void* from, void* to) noexcept;  // and destroys `from`'s
    void (*destroy)(void* storage) noexcept;
    bool in_place;
  };

  template <typename Held>
  static constexpr Operations in_place{
      .invoke =
          [](void* storage, boost::system::error_code error) {
            Held& stored = *static_cast<Held*>(storage);
            Held handler(std::move(stored));
            stored.~Held();
            std::move(handler)(error);
          },
      .move_to =
          [](void* from, void* to) noexcept {
            Held& source = *static_cast<Held*>(from);
            new (to) Held(std::move(source));
            source.~Held();
          },
      .destroy = [](void* storage) noexcept { static_cast<Held*>(storage)->~Held(); },
      .in_place = true,
  };
  template <typename Held>
  static constexpr Operations on_heap{
      .invoke =
          [](void* storage, boost::system::error_code error) {
            const std::unique_ptr<Held> boxed(*static_cast<Held**>(storage));
            Held handler(std::move(*boxed));
            std::move(handler)(error);
          },
      .move_to = [](void* from, void* to) noexcept { new (to) Held*(*static_cast<Held**>(from)); },
      .destroy = [](void* storage) noexcept { delete *static_cast<Held**>(storage); },
      .in_place = false,
  };

  void take_from(ParkedHandler& other) noexcept {
    if (other.operations_ == nullptr) return;
    other.operations_->move_to(other.storage_, storage_);
    operations_ = std::exchange(other.operations_, nullptr);
  }
  void reset() noexcept {
    if (operations_ == nullptr) return;
    std::exchange(operations_, nullptr)->destroy(storage_);
  }

  alignas(void*) unsigned char storage_[2 * sizeof(void*)];
  const Operations* operations_ = nullptr;
};

// A coroutine's completion handler, parked while it waits; moved out, under the record's mutex,
// by whichever party ends the wait (the waker, the coroutine's cancellation, its context's
// shutdown).
struct ParkedWait {
  ParkedHandler handler;
  // The coroutine's executor. (Not tracking work: the coroutine's co_spawn holds work on it for
  // as long as the coroutine lives, so its io_context does not run out of work while it waits
  // for a party that runs on another.)
  asio::any_io_executor executor;
  // The waker may resume it in place (the owner's choice: a query() caller on the io_context of
  // the connection that answers it).
  bool resumable_in_place = false;

  ParkedWait() = default;
  ParkedWait(ParkedWait&&) noexcept = default;
  // Not assignable (nothing needs it: a wait is taken out with take()).
  ParkedWait& operator=(ParkedWait&&) = delete;
  ParkedWait(const ParkedWait&) = delete;
  ParkedWait& operator=(const ParkedWait&) = delete;
  ~ParkedWait() = default;

  [[nodiscard]] bool waiting() const noexcept { return static_cast<bool>(handler); }
  // Whether it waits to run on `context` (ParkedWaitWatch).
  [[nodiscard]] bool runs_on(const asio::execution_context& context) const noexcept {
    return waiting() && &asio::query(executor, asio::execution::context) == &context;
  }
  // Moves the wait out, leaving this one empty.
  [[nodiscard]] ParkedWait take() noexcept {
    ParkedWait taken;
    taken.handler = std::move(handler);
    taken.executor = std::move(executor);
    taken.resumable_in_place = std::exchange(resumable_in_place, false);
    return taken;
  }
  // Starts the wait: `new_handler` (the coroutine's) resumes it on `its_executor`. Returns the
  // slot through which the handler's cancellation goes (unconnected when it has none).
  template <typename Handler>
  asio::cancellation_slot hold(Handler&& new_handler, asio::any_io_executor its_executor,
                               bool in_place_allowed) {
    asio::cancellation_slot slot;
    handler = ParkedHandler(std::forward<Handler>(new_handler), slot);
    executor = std::move(its_executor);
    resumable_in_place = in_place_allowed;
    return slot;
  }

  // For a strand, the executor whose own queue runs its work: the io_context's or the
  // thread_pool's it was made on (asio::make_strand(), of a plain or a work-tracking executor,
  // directly or through any_io_executor); empty for any other executor.
  static std::optional<asio::any_io_executor> queue_beneath(const asio::any_io_executor& executor) {
    std::optional<asio::any_io_executor> beneath;
    if (strand_over<asio::io_context::executor_type>(executor, beneath) ||
        strand_over<tracking_work<asio::io_context::executor_type>>(executor, beneath) ||
        strand_over<asio::thread_pool::executor_type>(executor, beneath) ||
        strand_over<tracking_work<asio::thread_pool::executor_type>>(executor, beneath)) {
      return beneath;
    }
    if (const auto* strand = executor.target<asio::strand<asio::any_io_executor>>()) {
      beneath = queue_beneath(strand->get_inner_executor());
      return beneath ? std::move(beneath) : strand->get_inner_executor();
    }
    return std::nullopt;
  }

 private:
  template <typename Executor>
  using tracking_work = std::decay_t<decltype(asio::require(
      std::declval<Executor>(), asio::execution::outstanding_work.tracked))>;

  template <typename Inner>
  static bool strand_over(const asio::any_io_executor& executor,
                          std::optional<asio::any_io_executor>& beneath) {
    const auto* strand = executor.target<asio::strand<Inner>>();
    if (strand != nullptr) beneath.emplace(strand->get_inner_executor());
    return strand != nullptr;
  }
};

// Ends a wait taken out of its record with `error`: in place when this thread runs the waiter's
// executor and `may_run_here`, else posted to it. (An exception that escapes the coroutine in
// place is kept by its io_context, and thrown by its run(), as from any handler.)
//
// A waiter on a strand is resumed through the queue of the io_context or thread_pool beneath it,
// and enters its strand from there. Posted straight to a strand whose service has already shut
// down (its execution context being destroyed: asio shuts the newest services down first), the
// resumption would be destroyed in place, and the waiter's coroutine unwound on this thread, under
// the lock the waker holds, which the coroutine's AbandonGuard takes. The context's own queue
// shuts down after every ParkedWaitWatch of it, whose shutdown takes that lock: a wait still
// parked then is released by the watch instead. (An executor of another kind is posted to
// directly.)
// (The resumption carries whether the wait was cancelled, not the error_code: it then takes no
// more room than before ParkedHandler, so that it fits the blocks asio's cache holds for posts.)
inline void resume(ParkedWait wait, boost::system::error_code error, bool may_run_here) {
  assert(!error || error == asio::error::operation_aborted);
  const asio::any_io_executor executor = std::move(wait.executor);
  auto resumption = [handler = std::move(wait.handler),
                     aborted = static_cast<bool>(error)]() mutable {
    std::move(handler)(aborted ? boost::system::error_code(asio::error::operation_aborted)
                               : boost::system::error_code());
  };
  if (may_run_here) {
    asio::dispatch(executor, std::move(resumption));
    return;
  }
  // The common case, a coroutine on an io_context: posted through the io_context's own executor,
  // without any_io_executor's type-erased dispatch (and its copy of the executor).
  if (const auto* on_io = executor.target<asio::io_context::executor_type>()) {
    asio::post(*on_io, std::move(resumption));
    return;
  }
  if (auto beneath = ParkedWait::queue_beneath(executor)) {
    asio::post(*beneath, [executor, resumption = std::move(resumption)]() mutable {
      asio::dispatch(executor, std::move(resumption));
    });
    return;
  }
  asio::post(executor, std::move(resumption));
}

// The coroutine's per-operation cancellation while it waits. Posted, never in place: the
// resumption clears the slot that holds this handler. (The record outlives the wait: the waiting
// coroutine's frame holds it, and the slot is cleared when the coroutine resumes.)
template <typename Mutex>
struct CancelParkedWait {
  Mutex* mutex;
  ParkedWait* parked;
  void operator()(asio::cancellation_type type) const {
    if (type == asio::cancellation_type::none) return;
    std::optional<ParkedWait> taken;
    {
      const std::lock_guard lock(*mutex);
      if (parked->waiting()) taken.emplace(parked->take());
    }
    if (taken) resume(std::move(*taken), asio::error::operation_aborted, false);
  }
};

// The wait, as an asynchronous operation: `lock` holds the record's mutex on entry, and is
// released once the handler is parked in `parked` (a waker cannot slip in between). Completes
// (as a tuple: nothing is thrown in the frame) with no error when a waker resumes it, with
// operation_aborted when the coroutine's per-operation cancellation ends it. A coroutine
// destroyed mid-wait leaves `lock` released and without its mutex. `executor` is the awaiting
// coroutine's; `resumable_in_place`, see ParkedWait.
template <typename Mutex>
auto park_then_unlock(std::unique_lock<Mutex>& lock, ParkedWait& parked,
                      const asio::any_io_executor& executor, bool resumable_in_place = false) {
  auto initiation = [&lock, &parked, &executor, resumable_in_place](auto handler) {
    const std::unique_lock<Mutex> released(*lock.release(), std::adopt_lock);
    auto slot = parked.hold(std::move(handler), executor, resumable_in_place);
    if (slot.is_connected()) {
      slot.template emplace<CancelParkedWait<Mutex>>(released.mutex(), &parked);
    }
  };
  constexpr auto no_throw_in_frame = asio::as_tuple(asio::deferred);
  return asio::async_initiate<decltype(no_throw_in_frame), void(boost::system::error_code)>(
      initiation, no_throw_in_frame);
}

// For an owner's release_waits_of(): takes every wait that `for_each_wait` visits (under `mutex`)
// and that runs on `context` out of its record, and destroys it without the mutex (its coroutine's
// AbandonGuard takes it). In batches on the stack: this runs in the context's shutdown, which must
// not throw, so nothing is allocated. `each_pass` runs under the mutex at every pass.
template <typename Mutex, typename ForEachWait, typename EachPass>
void release_waits_on(asio::execution_context& context, Mutex& mutex, ForEachWait for_each_wait,
                      EachPass each_pass) {
  constexpr std::size_t batch = 32;
  for (;;) {
    std::array<std::optional<ParkedWait>, batch> released;
    std::size_t taken = 0;
    {
      const std::lock_guard lock(mutex);
      each_pass();
      for_each_wait([&](ParkedWait& parked) {
        if (taken < batch && parked.waiting() && parked.runs_on(context)) {
          released[taken++].emplace(parked.take());
        }
      });
    }
    if (taken < batch) return;  // (the last ones are destroyed here, unlocked)
  }
}

// What holds parked waits, for ParkedWaitWatch.
class ParkedWaitOwner {
 public:
  // `context` shuts down: every wait parked here that runs on it is taken out (under the
  // owner's mutex) and destroyed (without it: the coroutines' AbandonGuards take it).
  virtual void release_waits_of(asio::execution_context& context) = 0;

 protected:
  ParkedWaitOwner() = default;
  ParkedWaitOwner(const ParkedWaitOwner&) = default;
  ParkedWaitOwner& operator=(const ParkedWaitOwner&) = default;
  ParkedWaitOwner(ParkedWaitOwner&&) = default;
  ParkedWaitOwner& operator=(ParkedWaitOwner&&) = default;
  ~ParkedWaitOwner() = default;
};

// Ends, when an execution context shuts down, the parked waits of the coroutines that run on it:
// their handlers, and with them the coroutines, are destroyed, as asio destroys those of its own
// pending operations. (A coroutine would otherwise outlive its io_context, and be resumed into it
// when its wait ends.) One per context whose coroutines parked; it knows the owners they parked
// with.
class ParkedWaitWatch final : public asio::execution_context::service {
 public:
  static inline asio::execution_context::id id;  // NOLINT (asio's service identity)
  explicit ParkedWaitWatch(asio::execution_context& context) : service(context) {}

  void watch(const std::shared_ptr<ParkedWaitOwner>& owner) {
    const std::lock_guard lock(mutex_);
    std::erase_if(owners_, [](const auto& watched) { return watched.expired(); });
    const bool known = std::any_of(owners_.begin(), owners_.end(), [&](const auto& watched) {
      return !watched.owner_before(owner) && !owner.owner_before(watched);
    });
    if (!known) owners_.push_back(owner);
  }

 private:
  void shutdown() override {
    std::vector<std::weak_ptr<ParkedWaitOwner>> watched;
    {
      const std::lock_guard lock(mutex_);
      watched.swap(owners_);
    }
    for (const auto& weak : watched) {
      if (const auto owner = weak.lock()) owner->release_waits_of(context());
    }
  }

  std::mutex mutex_;
  std::vector<std::weak_ptr<ParkedWaitOwner>> owners_;
};

}  // namespace pgrt::detail::async
