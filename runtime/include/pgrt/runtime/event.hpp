#pragma once

/// @file
/// pgrt::Event: the Boost.Signals2 signal every pgrt event is (the pool's, pending writes', the
/// lifecycle manager's, a supervised child's, the watchdog's). Its combiner calls every
/// subscriber, each on its own, and logs and ignores what one throws: a subscriber that throws
/// hides the event from none connected after it, and never unwinds the code that emitted it (a
/// state machine in the middle of a change, a supervisor's loop, a noexcept function).

#include <atomic>
#include <boost/signals2/connection.hpp>
#include <boost/signals2/signal.hpp>
#include <exception>
#include <string>
#include <utility>

namespace pgrt {

namespace detail {
/// Logs (spdlog, error) that an event subscriber threw (`source`: what emitted the event, as
/// "pgrt pool"; `what`: the exception's what(), or null). Never throws.
void log_subscriber_exception(const std::string& source, const char* what) noexcept;

/// The combiner of pgrt's events (pgrt::Event, PendingWritesEvents): calls every subscriber, each
/// on its own, and logs and ignores what one throws, so that a subscriber that throws hides the
/// event from none connected after it and the emitter sees no exception.
struct EverySubscriber {
  using result_type = void;
  std::string source = "pgrt pool";  ///< What emits the events, for the log.
  template <typename Call>
  void operator()(Call call, Call end) const {
    for (; call != end; ++call) {
      try {
        (void)*call;
      } catch (const std::exception& error) {
        log_subscriber_exception(source, error.what());
      } catch (...) {
        log_subscriber_exception(source, nullptr);
      }
    }
  }
};
}  // namespace detail

/// A Boost.Signals2 signal with the detail::EverySubscriber combiner (see the file comment), that
/// also remembers whether anything was ever connected to it, so that an emitter may skip an event
/// nobody subscribed to (calling a signal takes its mutex even when it has no slots, which would
/// cost the pool's uncontended acquire a good part of its time). It is a boost::signals2::signal
/// in every other respect. Subscribe through this type's connect() or connect_extended() (as
/// `pool.events().acquired.connect(...)` does); a connection made through a reference to the base
/// signal type is not seen by ever_connected(). A subscription made while the event is being
/// emitted on another thread may miss that emission, as with any signal.
template <typename Signature>
class Event : public boost::signals2::signal<Signature, detail::EverySubscriber> {
  using Signal = boost::signals2::signal<Signature, detail::EverySubscriber>;

 public:
  /// Logs a subscriber that threw as "pgrt pool: an event subscriber threw: ...".
  Event() = default;
  /// `source` names the emitter in the log line of a subscriber that threw.
  explicit Event(std::string source) : Signal(detail::EverySubscriber{std::move(source)}) {}

  template <typename... Args>
  boost::signals2::connection connect(Args&&... args) {
    subscribed_.store(true, std::memory_order_release);
    return Signal::connect(std::forward<Args>(args)...);
  }
  template <typename... Args>
  boost::signals2::connection connect_extended(Args&&... args) {
    subscribed_.store(true, std::memory_order_release);
    return Signal::connect_extended(std::forward<Args>(args)...);
  }
  /// True once anything was connected (it stays true after a disconnect).
  [[nodiscard]] bool ever_connected() const noexcept {
    return subscribed_.load(std::memory_order_acquire);
  }

 private:
  std::atomic<bool> subscribed_{false};
};

}  // namespace pgrt
