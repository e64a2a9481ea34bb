#pragma once

// A doubly linked list threaded through its elements (`T` has `T* prev` and `T* next`): O(1)
// insertion at either end and O(1) removal of any element, no allocation. An element is in at
// most one list at a time; the list owns nothing.

#include <cassert>
#include <cstddef>

namespace pgrt::detail::pool {

template <typename T>
class IntrusiveList {
 public:
  IntrusiveList() = default;
  IntrusiveList(const IntrusiveList&) = delete;
  IntrusiveList& operator=(const IntrusiveList&) = delete;
  IntrusiveList(IntrusiveList&&) = delete;
  IntrusiveList& operator=(IntrusiveList&&) = delete;
  ~IntrusiveList() = default;

  [[nodiscard]] bool empty() const noexcept { return head_ == nullptr; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] T* front() const noexcept { return head_; }
  [[nodiscard]] T* back() const noexcept { return tail_; }

  void push_back(T& element) noexcept {
    assert(element.prev == nullptr && element.next == nullptr);
    element.prev = tail_;
    if (tail_ != nullptr) {
      tail_->next = &element;
    } else {
      head_ = &element;
    }
    tail_ = &element;
    ++size_;
  }

  void push_front(T& element) noexcept {
    assert(element.prev == nullptr && element.next == nullptr);
    element.next = head_;
    if (head_ != nullptr) {
      head_->prev = &element;
    } else {
      tail_ = &element;
    }
    head_ = &element;
    ++size_;
  }

  void remove(T& element) noexcept {
    if (element.prev != nullptr) {
      element.prev->next = element.next;
    } else {
      head_ = element.next;
    }
    if (element.next != nullptr) {
      element.next->prev = element.prev;
    } else {
      tail_ = element.prev;
    }
    element.prev = nullptr;
    element.next = nullptr;
    --size_;
  }

  // Calls `visit(T&)` on each element, front to back; `visit` may remove the element it is given
  // (and no other).
  template <typename Visit>
  void for_each(Visit&& visit) {
    for (T* element = head_; element != nullptr;) {
      T* next = element->next;
      visit(*element);
      element = next;
    }
  }
  template <typename Visit>
  void for_each(Visit&& visit) const {
    for (const T* element = head_; element != nullptr; element = element->next) visit(*element);
  }

 private:
  T* head_ = nullptr;
  T* tail_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace pgrt::detail::pool
