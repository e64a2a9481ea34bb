#pragma once
// A wait for a socket to become readable that costs no syscall when it starts: the per-query
// readiness wait (issue 12's syscall table: raw libpq sends, polls and reads; so does pgrt now).
//
// asio's socket.async_wait(wait_read) asks its edge-triggered epoll reactor to re-arm the
// descriptor each time (epoll_ctl(EPOLL_CTL_MOD)), which is what makes a wait that starts after
// its bytes came still end. The reactor has a cheaper way for its own reads: it remembers, per
// descriptor, whether an edge may have come that no operation took ("try speculative"); while
// none has, a new read operation is queued without a syscall, and the next edge completes it.
// ReadableWait is such a read operation that reads nothing: when the reactor runs it (on an edge,
// or at once if an edge may have gone unseen) it reports the socket exhausted, so the reactor
// waits for the next edge before it runs the next one. Every edge is therefore either taken by a
// queued wait or remembered for the next wait, which then ends at once: nothing is lost, on one
// thread or many. The price is a wake-up that may find nothing new (after an edge whose bytes
// libpq read already): the caller reads, finds the answer incomplete, and waits again.
//
// It uses asio's reactor internals, so it is built only for the asio it was written against
// (Boost 1.81's epoll reactor, Debian 12); anywhere else it is socket.async_wait(wait_read).
#include <boost/asio/async_result.hpp>
#include <boost/asio/detail/config.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/socket_base.hpp>
#include <boost/version.hpp>
#include <memory>
#include <type_traits>
#include <utility>

#if BOOST_VERSION == 108100 && defined(BOOST_ASIO_HAS_EPOLL) && \
    !defined(BOOST_ASIO_HAS_IO_URING_AS_DEFAULT)
#define PGRT_EXHAUSTING_READ_WAIT 1
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/detail/bind_handler.hpp>
#include <boost/asio/detail/fenced_block.hpp>
#include <boost/asio/detail/handler_alloc_helpers.hpp>
#include <boost/asio/detail/handler_cont_helpers.hpp>
#include <boost/asio/detail/handler_work.hpp>
#include <boost/asio/detail/reactor.hpp>
#include <boost/asio/detail/reactor_op.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/query.hpp>
#else
#define PGRT_EXHAUSTING_READ_WAIT 0
#endif

namespace pgrt::detail {

namespace asio = boost::asio;

// The connection's own descriptor of libpq's socket: a plain generic stream socket that lets
// ReadableWait reach its reactor registration.
class WatchedSocket : public asio::generic::stream_protocol::socket {
 public:
  using asio::generic::stream_protocol::socket::basic_stream_socket;

#if PGRT_EXHAUSTING_READ_WAIT
  template <typename Handler>
  void start_readable_wait(Handler&& handler);
#endif
};

#if PGRT_EXHAUSTING_READ_WAIT

template <typename Handler, typename IoExecutor>
class ReadableWaitOp : public asio::detail::reactor_op {
 public:
  BOOST_ASIO_DEFINE_HANDLER_PTR(ReadableWaitOp);

  ReadableWaitOp(Handler& handler, const IoExecutor& io_executor)
      : reactor_op(boost::system::error_code(), &ReadableWaitOp::perform_once,
                   &ReadableWaitOp::complete),
        handler_(std::move(handler)),
        work_(handler_, io_executor) {}

  // The reactor runs this on an edge (or when one may have gone unseen): the socket is, or may
  // be, readable; "exhausted" makes the reactor wait for the next edge before the next wait.
  static status perform_once(reactor_op*) { return done_and_exhausted; }

  static void complete(void* owner, asio::detail::operation* base,
                       const boost::system::error_code& /*unused*/, std::size_t /*unused*/) {
    auto* op = static_cast<ReadableWaitOp*>(base);
    ptr memory = {std::addressof(op->handler_), op, op};
    asio::detail::handler_work<Handler, IoExecutor> work(std::move(op->work_));
    // The handler leaves the operation's memory before it is freed (the memory may belong to it).
    asio::detail::binder1<Handler, boost::system::error_code> bound(op->handler_, op->ec_);
    memory.h = std::addressof(bound.handler_);
    memory.reset();
    if (owner != nullptr) {
      asio::detail::fenced_block fence(asio::detail::fenced_block::half);
      work.complete(bound, bound.handler_);
    }
  }

 private:
  Handler handler_;
  asio::detail::handler_work<Handler, IoExecutor> work_;
};

// Cancels a queued ReadableWait (a per-operation cancellation of its coroutine).
class ReadableWaitCancellation {
 public:
  ReadableWaitCancellation(asio::detail::reactor* reactor,
                           asio::detail::reactor::per_descriptor_data* registration, int descriptor)
      : reactor_(reactor), registration_(registration), descriptor_(descriptor) {}

  void operator()(asio::cancellation_type_t type) {
    if ((type & (asio::cancellation_type::terminal | asio::cancellation_type::partial |
                 asio::cancellation_type::total)) != asio::cancellation_type::none) {
      reactor_->cancel_ops_by_key(descriptor_, *registration_, asio::detail::reactor::read_op,
                                  this);
    }
  }

 private:
  asio::detail::reactor* reactor_;
  asio::detail::reactor::per_descriptor_data* registration_;
  int descriptor_;
};

template <typename Handler>
void WatchedSocket::start_readable_wait(Handler&& handler) {
  using Op = ReadableWaitOp<std::decay_t<Handler>, executor_type>;
  auto& registration = impl_.get_implementation();
  auto& reactor = asio::use_service<asio::detail::reactor>(
      asio::query(get_executor(), asio::execution::context));
  const bool is_continuation = boost_asio_handler_cont_helpers::is_continuation(handler);
  auto slot = asio::get_associated_cancellation_slot(handler);
  typename Op::ptr memory = {std::addressof(handler), Op::ptr::allocate(handler), nullptr};
  memory.p = new (memory.v) Op(handler, get_executor());
  if (slot.is_connected()) {
    memory.p->cancellation_key_ = &slot.template emplace<ReadableWaitCancellation>(
        &reactor, &registration.reactor_data_, registration.socket_);
  }
  // allow_speculative: the reactor runs the operation at once only if an edge may have gone
  // unseen; otherwise it queues it, without re-arming the descriptor.
  reactor.start_op(asio::detail::reactor::read_op, registration.socket_, registration.reactor_data_,
                   memory.p, is_continuation,
                   /*allow_speculative=*/true);
  memory.v = memory.p = nullptr;
}

#endif

// Waits until `socket` is, or may be, readable: bytes, end of file or an error may be there (a
// wake-up may find nothing new: read, and wait again if the answer is incomplete). Completion
// signature void(error_code); operation_aborted when cancelled.
template <typename CompletionToken>
auto async_wait_readable(WatchedSocket& socket, CompletionToken&& token) {
#if PGRT_EXHAUSTING_READ_WAIT
  return asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
      [](auto handler, WatchedSocket* watched) {
        watched->start_readable_wait(std::move(handler));
      },
      token, &socket);
#else
  return socket.async_wait(asio::socket_base::wait_read, std::forward<CompletionToken>(token));
#endif
}

}  // namespace pgrt::detail
