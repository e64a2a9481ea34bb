// What the connection's readiness waits (db/src/connection/io.cpp) rely on from asio. First: a
// socket that is readable when async_wait(wait_read) is queued completes the wait, even when the
// reactor has already reported (and so consumed) its edge while no operation was queued. On a
// multi-threaded io_context another thread's reactor run can take that edge between libpq's last
// read and the wait; if asio stopped re-arming the descriptor for a queued wait, the connection
// would wait forever for bytes it already has. Second: detail::async_wait_readable(), the first
// wait for an answer, ends on an edge that comes while it is queued or that came before (taken
// by any thread). A Boost upgrade or another reactor backend that broke either fails here, not as
// a hung query.
#include <array>
#include <atomic>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <functional>
#include <future>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "connection/readable_wait.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;

class SocketPair {
 public:
  SocketPair() {
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_.data()) != 0)
      throw std::runtime_error("socketpair");
  }
  ~SocketPair() {
    for (int fd : fds_) {
      if (fd >= 0) ::close(fd);
    }
  }
  SocketPair(const SocketPair&) = delete;
  SocketPair& operator=(const SocketPair&) = delete;
  SocketPair(SocketPair&&) = delete;
  SocketPair& operator=(SocketPair&&) = delete;

  // The watched end goes to asio (which then owns it); the other end stays here.
  int take_watched() { return std::exchange(fds_[0], -1); }
  void send_byte() const { ASSERT_EQ(::write(fds_[1], "x", 1), 1); }
  [[nodiscard]] int peer() const { return fds_[1]; }

 private:
  std::array<int, 2> fds_{-1, -1};
};

TEST(SocketReadiness, AWaitQueuedAfterTheEdgeWasTakenStillCompletes) {
  asio::io_context io;
  SocketPair pair;
  asio::generic::stream_protocol::socket watched(io, asio::generic::stream_protocol(AF_UNIX, 0),
                                                 pair.take_watched());
  watched.non_blocking(true);
  // Work that keeps the reactor running while no wait is queued on the socket.
  asio::steady_timer keep_running(io, 10s);
  keep_running.async_wait([](boost::system::error_code) {});

  pair.send_byte();
  // The reactor runs (epoll_wait) and takes the socket's edge: no operation is queued for it.
  for (int i = 0; i < 3; ++i) io.poll();

  bool completed = false;
  watched.async_wait(asio::socket_base::wait_read,
                     [&](boost::system::error_code error) { completed = !error; });
  const auto deadline = std::chrono::steady_clock::now() + 2s;
  while (!completed && std::chrono::steady_clock::now() < deadline) io.run_one_for(50ms);
  EXPECT_TRUE(completed) << "a wait queued after the edge was consumed never completed, with the "
                            "byte still unread: the readiness wait would hang";

  // A byte sent after the wait was queued completes it too (the ordinary case).
  char byte = 0;
  ASSERT_EQ(::recv(watched.native_handle(), &byte, 1, 0), 1);
  completed = false;
  watched.async_wait(asio::socket_base::wait_read,
                     [&](boost::system::error_code error) { completed = !error; });
  io.poll();
  EXPECT_FALSE(completed) << "completed with nothing to read";
  pair.send_byte();
  const auto second_deadline = std::chrono::steady_clock::now() + 2s;
  while (!completed && std::chrono::steady_clock::now() < second_deadline) io.run_one_for(50ms);
  EXPECT_TRUE(completed);
  keep_running.cancel();
}

// --- detail::async_wait_readable (db/src/connection/readable_wait.hpp) ---------------------------
// The first wait for a query's answer (exchange() in io.cpp): it starts without a syscall, and
// relies on a new edge coming (the answer to what was just sent), or on one that came before it
// was queued.

bool run_until(asio::io_context& io, const bool& done, std::chrono::milliseconds limit = 2s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done && std::chrono::steady_clock::now() < deadline) io.run_one_for(20ms);
  return done;
}

TEST(ReadableWait, EndsOnBytesThatComeWhileItIsQueued) {
  asio::io_context io;
  SocketPair pair;
  pgrt::detail::WatchedSocket watched(io, asio::generic::stream_protocol(AF_UNIX, 0),
                                      pair.take_watched());
  asio::steady_timer keep_running(io, 10s);
  keep_running.async_wait([](boost::system::error_code) {});
  // A fresh registration may report an edge it never saw: the first wait may end at once.
  bool completed = false;
  pgrt::detail::async_wait_readable(watched, [&](boost::system::error_code) { completed = true; });
  (void)run_until(io, completed, 100ms);
  for (int round = 0; round < 3; ++round) {
    completed = false;
    boost::system::error_code result = asio::error::would_block;
    pgrt::detail::async_wait_readable(watched, [&](boost::system::error_code error) {
      result = error;
      completed = true;
    });
    for (int i = 0; i < 3; ++i) io.poll();
    EXPECT_FALSE(completed) << "round " << round << ": ended with nothing to read";
    pair.send_byte();
    EXPECT_TRUE(run_until(io, completed)) << "round " << round << ": a byte did not end the wait";
    EXPECT_FALSE(result) << result.message();
    char byte = 0;
    ASSERT_EQ(::recv(watched.native_handle(), &byte, 1, 0), 1);
  }
  keep_running.cancel();
}

TEST(ReadableWait, EndsAtOnceWhenTheEdgeCameBeforeItWasQueued) {
  asio::io_context io;
  SocketPair pair;
  pgrt::detail::WatchedSocket watched(io, asio::generic::stream_protocol(AF_UNIX, 0),
                                      pair.take_watched());
  asio::steady_timer keep_running(io, 10s);
  keep_running.async_wait([](boost::system::error_code) {});
  bool completed = false;
  pgrt::detail::async_wait_readable(watched, [&](boost::system::error_code) { completed = true; });
  pair.send_byte();
  ASSERT_TRUE(run_until(io, completed));
  char byte = 0;
  ASSERT_EQ(::recv(watched.native_handle(), &byte, 1, 0), 1);
  // The answer comes, and the reactor takes its edge, before the wait is queued (another thread
  // running the io_context, or this one between the send and the wait).
  pair.send_byte();
  for (int i = 0; i < 3; ++i) io.poll();
  completed = false;
  pgrt::detail::async_wait_readable(watched, [&](boost::system::error_code) { completed = true; });
  EXPECT_TRUE(run_until(io, completed))
      << "a wait queued after its edge was taken never ended: the query would hang";
  keep_running.cancel();
}

TEST(ReadableWait, ACancelledWaitEndsWithOperationAborted) {
  asio::io_context io;
  SocketPair pair;
  pgrt::detail::WatchedSocket watched(io, asio::generic::stream_protocol(AF_UNIX, 0),
                                      pair.take_watched());
  asio::steady_timer keep_running(io, 10s);
  keep_running.async_wait([](boost::system::error_code) {});
  bool completed = false;
  pgrt::detail::async_wait_readable(watched, [&](boost::system::error_code) { completed = true; });
  (void)run_until(io, completed, 100ms);  // (a fresh registration's first wait may end at once)
  asio::cancellation_signal cancel;
  boost::system::error_code result;
  completed = false;
  pgrt::detail::async_wait_readable(
      watched, asio::bind_cancellation_slot(cancel.slot(), [&](boost::system::error_code error) {
        result = error;
        completed = true;
      }));
  io.poll();
  ASSERT_FALSE(completed);
  cancel.emit(asio::cancellation_type::terminal);
  EXPECT_TRUE(run_until(io, completed));
  EXPECT_EQ(result, asio::error::operation_aborted);
  keep_running.cancel();
}

// Request and answer, 20,000 times, on an io_context run by four threads, against a peer thread
// that answers each request as soon as it reads it: the answer's edge may come before the wait is
// queued (and be taken by any of the threads) or after. A lost edge hangs a round.
TEST(ReadableWait, NoAnswerIsMissedOnAnIoContextRunByFourThreads) {
  asio::io_context io;
  SocketPair pair;
  pgrt::detail::WatchedSocket watched(io, asio::generic::stream_protocol(AF_UNIX, 0),
                                      pair.take_watched());
  std::thread answering([peer = pair.peer()] {
    char byte = 0;
    while (::read(peer, &byte, 1) == 1) {
      if (::write(peer, &byte, 1) != 1) return;
    }
  });
  constexpr int rounds = 20000;
  std::atomic<int> answered{0};
  std::atomic<int> empty_wakeups{0};
  std::promise<bool> finished;
  std::function<void()> wait_for_answer;
  const auto ask = [&] {
    if (::write(watched.native_handle(), "q", 1) != 1) {
      finished.set_value(false);
      return;
    }
    wait_for_answer();
  };
  wait_for_answer = [&] {
    pgrt::detail::async_wait_readable(watched, [&](boost::system::error_code error) {
      if (error) {
        finished.set_value(false);
        return;
      }
      char byte = 0;
      if (::recv(watched.native_handle(), &byte, 1, MSG_DONTWAIT) != 1) {
        ++empty_wakeups;  // the edge of bytes read already: wait again
        wait_for_answer();
        return;
      }
      if (++answered == rounds) {
        finished.set_value(true);
        return;
      }
      ask();
    });
  };
  auto done = finished.get_future();
  asio::post(io, ask);
  auto work = asio::make_work_guard(io);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back([&io] { io.run(); });
  const bool ended = done.wait_for(60s) == std::future_status::ready;
  EXPECT_TRUE(ended) << "stuck after " << answered.load() << " answers: a wait missed its edge";
  EXPECT_TRUE(ended && done.get());
  io.stop();
  for (auto& thread : threads) thread.join();
  ::shutdown(watched.native_handle(), SHUT_RDWR);
  answering.join();
  EXPECT_LT(empty_wakeups.load(), rounds) << "most waits woke with nothing to read";
}

}  // namespace
