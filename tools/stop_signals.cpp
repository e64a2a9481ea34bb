// pgrt-diag's stop signals, read from a signalfd (stop_signals.hpp).
#include "stop_signals.hpp"

#include <boost/system/system_error.hpp>
#include <cerrno>
#include <csignal>
#include <pthread.h>
#include <string>
#include <sys/signalfd.h>
#include <unistd.h>
#include <utility>

namespace pgrt::diag {

namespace {

// "SIGINT", "SIGINT and SIGTERM": for an error's message.
std::string names_of(const std::vector<int>& numbers) {
  std::string names;
  for (std::size_t i = 0; i < numbers.size(); ++i) {
    if (i > 0) names += i + 1 == numbers.size() ? " and " : ", ";
    names += numbers[i] == SIGINT    ? "SIGINT"
             : numbers[i] == SIGTERM ? "SIGTERM"
                                     : "signal " + std::to_string(numbers[i]);
  }
  return names;
}

}  // namespace

StopSignals::StopSignals(boost::asio::io_context& io, const std::vector<int>& numbers)
    : descriptor_(io) {
  sigset_t stop;
  sigemptyset(&stop);
  for (const int number : numbers) sigaddset(&stop, number);
  sigset_t before;
  if (const int error = pthread_sigmask(SIG_BLOCK, &stop, &before); error != 0) {
    throw boost::system::system_error(error, boost::system::system_category(),
                                      "cannot block " + names_of(numbers));
  }
  const int fd = ::signalfd(-1, &stop, SFD_NONBLOCK | SFD_CLOEXEC);
  boost::system::error_code error;
  if (fd < 0) {
    error.assign(errno, boost::system::system_category());
  } else if (descriptor_.assign(fd, error)) {
    ::close(fd);
  }
  if (error) {
    // Unblocked again: a signal that came meanwhile takes its default action now, rather than
    // waiting unseen.
    pthread_sigmask(SIG_SETMASK, &before, nullptr);
    throw boost::system::system_error(error, "cannot watch " + names_of(numbers) + " (signalfd)");
  }
}

void StopSignals::watch(std::function<void(int)> on_signal) {
  const std::uint64_t generation = ++generation_;
  descriptor_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                         [this, generation, on_signal = std::move(on_signal)](
                             const boost::system::error_code& error) mutable {
                           // (A completion already queued when stop_watching() came is not waited
                           // on again: that would keep its io_context running.)
                           if (error || generation != generation_) return;
                           signalfd_siginfo info{};
                           if (::read(descriptor_.native_handle(), &info, sizeof info) !=
                               static_cast<ssize_t>(sizeof info)) {
                             watch(std::move(on_signal));  // (nothing there after all)
                             return;
                           }
                           if (received_ == 0) received_ = static_cast<int>(info.ssi_signo);
                           on_signal(static_cast<int>(info.ssi_signo));
                         });
}

void StopSignals::stop_watching() {
  ++generation_;
  boost::system::error_code ignored;
  descriptor_.cancel(ignored);
}

}  // namespace pgrt::diag
