#pragma once

// The strict maximum as an object: a Capacity hands out at most `max` move-only tokens, and a
// token gives its slot back exactly once, when it is destroyed (or released). A pooled
// connection's node owns its token from the moment the pool decides to open it until the server
// has ended its backend, so "how many connections count against the max" is the number of live
// tokens, and nothing else.

#include <cstddef>
#include <optional>
#include <utility>

namespace pgrt::detail::pool {

class Capacity;

class CapacityToken {
 public:
  CapacityToken() noexcept = default;
  CapacityToken(CapacityToken&& other) noexcept : owner_(std::exchange(other.owner_, nullptr)) {}
  CapacityToken& operator=(CapacityToken&& other) noexcept {
    if (this != &other) {
      release();
      owner_ = std::exchange(other.owner_, nullptr);
    }
    return *this;
  }
  CapacityToken(const CapacityToken&) = delete;
  CapacityToken& operator=(const CapacityToken&) = delete;
  ~CapacityToken() { release(); }

  [[nodiscard]] bool held() const noexcept { return owner_ != nullptr; }
  // Gives the slot back now (a no-op on an empty token).
  void release() noexcept;

 private:
  friend class Capacity;
  explicit CapacityToken(Capacity& owner) noexcept : owner_(&owner) {}
  Capacity* owner_ = nullptr;
};

class Capacity {
 public:
  explicit Capacity(std::size_t max) noexcept : max_(max) {}
  Capacity(const Capacity&) = delete;
  Capacity& operator=(const Capacity&) = delete;
  Capacity(Capacity&&) = delete;
  Capacity& operator=(Capacity&&) = delete;
  ~Capacity() = default;

  // A token, or nothing when `max` are out.
  [[nodiscard]] std::optional<CapacityToken> try_take() noexcept {
    if (taken_ >= max_) return std::nullopt;
    ++taken_;
    return CapacityToken(*this);
  }
  [[nodiscard]] std::size_t taken() const noexcept { return taken_; }
  [[nodiscard]] std::size_t max() const noexcept { return max_; }
  [[nodiscard]] std::size_t available() const noexcept { return max_ - taken_; }

 private:
  friend class CapacityToken;
  std::size_t max_;
  std::size_t taken_ = 0;
};

inline void CapacityToken::release() noexcept {
  if (owner_ != nullptr) --std::exchange(owner_, nullptr)->taken_;
}

}  // namespace pgrt::detail::pool
