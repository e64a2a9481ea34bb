#pragma once

// The signals that end a pgrt-diag command (Ctrl+C, and SIGTERM where the command takes it),
// shared by all of them (pgrt_diag.cpp, diag_metrics.cpp).

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <cstdint>
#include <functional>
#include <vector>

namespace pgrt::diag {

// The stop signals, blocked from the constructor until the process exits and read from a
// signalfd: no handler runs, so one of them never takes its default action and is never lost,
// whichever thread the kernel would have picked (a thread made later, such as a name lookup's or
// a cancel request's, inherits the block). (A signal_set's handler, run by ThreadSanitizer's
// runtime at a deferred moment, now and then never ran when the signal came while the process sat
// in epoll_wait: the command then waited out its whole timeout.)
//
// One that comes while nothing watches stays pending in the signalfd: the next watch() sees it at
// once. One that comes after the last watch is never seen, and the process exits as it would have
// without it. The block is left in place by the destructor: a signal pending then would otherwise
// take its default action, and cut short what the command still writes.
//
// Make it before any other thread (a thread made earlier keeps its own mask and would take the
// signals' default action). Not thread-safe: watch() and stop_watching() on `io`'s thread.
class StopSignals {
 public:
  // Blocks `numbers` (SIGINT, SIGTERM) in the calling thread and opens their signalfd on `io`.
  // Throws boost::system::system_error when either fails (the mask is then as it was).
  StopSignals(boost::asio::io_context& io, const std::vector<int>& numbers);
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  ~StopSignals() = default;

  // Calls `on_signal` once, on `io`, with the number of the next signal read, unless
  // stop_watching() (or another watch()) comes first; received() holds the first one's number
  // from then on. `on_signal` may call watch() again, for the next one.
  void watch(std::function<void(int)> on_signal);

  // Ends the wait of watch(): its completion, even one already queued, calls nothing and reads
  // nothing (a signal it would have read stays pending, for the next watch()), and `io` runs out
  // of work.
  void stop_watching();

  // The number of the first signal read, 0 before one was.
  int received() const { return received_; }

 private:
  boost::asio::posix::stream_descriptor descriptor_;
  std::uint64_t generation_ = 0;  // of the wait: one of an earlier watch() calls nothing
  int received_ = 0;
};

}  // namespace pgrt::diag
