#pragma once

// Undoes a step when the scope is left without reaching the point that disarms it: an exception,
// or the coroutine frame destroyed while suspended (its io_context shut down mid-wait). The
// typical use is a waiter that put itself into a shared list and must take itself out again.
//
// Contract: the callable runs at most once, in the destructor, unless disarm() was called. It must
// not throw (the destructor is noexcept: a throw terminates). Not thread-safe: one owner; what the
// callable touches is its own business (lock what is shared).

#include <concepts>
#include <type_traits>
#include <utility>

namespace pgrt::detail::async {

template <std::invocable<> OnAbandon>
class [[nodiscard]] AbandonGuard {
 public:
  explicit AbandonGuard(OnAbandon on_abandon) noexcept(
      std::is_nothrow_move_constructible_v<OnAbandon>)
      : on_abandon_(std::move(on_abandon)) {}
  AbandonGuard(const AbandonGuard&) = delete;
  AbandonGuard& operator=(const AbandonGuard&) = delete;
  AbandonGuard(AbandonGuard&&) = delete;
  AbandonGuard& operator=(AbandonGuard&&) = delete;
  ~AbandonGuard() {
    if (armed_) on_abandon_();
  }

  // The step completed: nothing to undo.
  void disarm() noexcept { armed_ = false; }
  [[nodiscard]] bool armed() const noexcept { return armed_; }

 private:
  OnAbandon on_abandon_;
  bool armed_ = true;
};

}  // namespace pgrt::detail::async
