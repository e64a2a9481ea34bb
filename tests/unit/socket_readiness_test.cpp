// What the connection's readiness wait (db/src/connection/io.cpp) relies on from asio: a socket
// that is readable when async_wait(wait_read) is queued completes the wait, even when the
// reactor has already reported (and so consumed) its edge while no operation was queued. On a
// multi-threaded io_context another thread's reactor run can take that edge between libpq's last
// read and the wait; if asio stopped re-arming the descriptor for a queued wait, the connection
// would wait forever for bytes it already has. A Boost upgrade or another reactor backend that
// broke this fails here, not as a hung query.
#include <array>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

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

}  // namespace
