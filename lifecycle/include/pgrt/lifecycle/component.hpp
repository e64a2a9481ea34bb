#pragma once

/// @file
/// What the lifecycle manager starts and stops: the Component concept and a type-erased holder.

#include <boost/asio/awaitable.hpp>
#include <concepts>
#include <memory>
#include <string>
#include <utility>

namespace pgrt::lifecycle {

/// Anything with a name and awaitable start() and stop(). The manager awaits start() once, and
/// stop() once if start() completed. Both run on the manager's strand and receive per-operation
/// cancellation (terminal) when their deadline passes or, for start(), when another start failed;
/// a start() that ends by throwing counts as not started. stop() should release what start()
/// acquired even when cancelled; a stop() that throws or outlives its deadline is logged and
/// abandoned while the other components still stop.
template <typename C>
concept Component = requires(C& component) {
  { component.name() } -> std::convertible_to<std::string>;
  { component.start() } -> std::same_as<boost::asio::awaitable<void>>;
  { component.stop() } -> std::same_as<boost::asio::awaitable<void>>;
};

/// A component that takes in work from outside (requests, a queue consumer) may also have
/// stop_intake(): called synchronously on every started component as soon as a shutdown begins,
/// before any stop(), so that no new work arrives while the others drain. It must not block.
template <typename C>
concept StopsIntake = requires(C& component) {
  component.stop_intake();
};

/// Holds any Component (shared ownership, so the caller may keep a typed reference).
class AnyComponent {
 public:
  template <Component C>
  explicit AnyComponent(std::shared_ptr<C> component)
      : model_(std::make_unique<Model<C>>(std::move(component))) {}

  [[nodiscard]] std::string name() const { return model_->name(); }
  [[nodiscard]] boost::asio::awaitable<void> start() { return model_->start(); }
  [[nodiscard]] boost::asio::awaitable<void> stop() { return model_->stop(); }
  void stop_intake() { model_->stop_intake(); }

 private:
  struct Concept {
    Concept() = default;
    Concept(const Concept&) = delete;
    Concept& operator=(const Concept&) = delete;
    Concept(Concept&&) = delete;
    Concept& operator=(Concept&&) = delete;
    virtual ~Concept() = default;
    [[nodiscard]] virtual std::string name() const = 0;
    [[nodiscard]] virtual boost::asio::awaitable<void> start() = 0;
    [[nodiscard]] virtual boost::asio::awaitable<void> stop() = 0;
    virtual void stop_intake() = 0;
  };

  template <Component C>
  struct Model final : Concept {
    explicit Model(std::shared_ptr<C> held) : component(std::move(held)) {}
    [[nodiscard]] std::string name() const override { return std::string(component->name()); }
    // Coroutines of their own: a start() or stop() that throws from the call itself (a plain
    // function returning an awaitable), not from its co_await, fails like any other start or
    // stop of this component, instead of escaping into the manager.
    [[nodiscard]] boost::asio::awaitable<void> start() override { co_await component->start(); }
    [[nodiscard]] boost::asio::awaitable<void> stop() override { co_await component->stop(); }
    void stop_intake() override {
      if constexpr (StopsIntake<C>) component->stop_intake();
    }
    std::shared_ptr<C> component;
  };

  std::unique_ptr<Concept> model_;
};

}  // namespace pgrt::lifecycle
