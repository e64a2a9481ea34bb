// /metrics, /healthz and /readyz over HTTP/1.1 (Boost.Beast), on the service's io_context.
#include "pgrt/service/metrics_endpoint.hpp"

#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <charconv>
#include <cstdlib>
#include <list>
#include <mutex>
#include <spdlog/spdlog.h>
#include <system_error>
#include <utility>

#include "config_input.hpp"
#include "pgrt/db/error.hpp"

namespace pgrt {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

MetricsEndpointOptions MetricsEndpointOptions::from_env() {
  MetricsEndpointOptions options;
  if (auto address = detail::env("PGRT_METRICS_ADDRESS")) options.address = std::move(*address);
  if (const auto port = detail::env("PGRT_METRICS_PORT")) {
    unsigned value = 0;
    const auto [end, error] = std::from_chars(port->data(), port->data() + port->size(), value);
    if (port->empty() || error != std::errc() || end != port->data() + port->size() ||
        value > 65'535) {
      detail::invalid("PGRT_METRICS_PORT='" + *port + "' is not valid",
                      "expected a port number, 0-65535 (0: a free one)");
    }
    options.port = static_cast<std::uint16_t>(value);
  }
  return options;
}

struct MetricsEndpoint::State : std::enable_shared_from_this<State> {
  State(asio::any_io_executor executor_in, std::shared_ptr<const Metrics> metrics_in,
        std::function<bool()> ready_in, MetricsEndpointOptions options_in)
      : executor(std::move(executor_in)),
        strand(asio::make_strand(executor)),
        metrics(std::move(metrics_in)),
        ready(std::move(ready_in)),
        options(std::move(options_in)),
        acceptor(strand),
        all_ended(strand, asio::steady_timer::time_point::max()) {}

  struct Session {
    explicit Session(tcp::socket socket) : stream(std::move(socket)) {}
    beast::tcp_stream stream;
    // Waiting for (the rest of) a request: nothing is owed to it. Written on its strand, read on
    // the endpoint's.
    std::atomic<bool> awaiting_request{true};
    // Since when (steady_clock ticks) it has been waiting for its request.
    std::atomic<std::chrono::steady_clock::rep> awaiting_since{
        std::chrono::steady_clock::now().time_since_epoch().count()};
    // Since when (steady_clock ticks) its answer has been being written; 0 when not writing.
    std::atomic<std::chrono::steady_clock::rep> writing_since{0};
    bool evicted = false;  // on the endpoint's strand
    // Whether a newcomer may take its place (`now` in steady_clock ticks): it has owed nothing
    // for evictable_after, or its answer has not gone out for stalled_write_after (a client that
    // does not read: pipelined requests behind a full window would hold the slot for
    // request_timeout each).
    [[nodiscard]] bool evictable(std::chrono::steady_clock::rep now) const {
      const auto ticks = [](std::chrono::milliseconds span) {
        return std::chrono::duration_cast<std::chrono::steady_clock::duration>(span).count();
      };
      if (awaiting_request) return awaiting_since <= now - ticks(evictable_after);
      const auto since = writing_since.load();
      return since != 0 && since <= now - ticks(stalled_write_after);
    }
  };
  // How long a connection must have owed nothing before a newcomer may take its place: a flood of
  // new connections is refused at once (cheap), not cycled through the slots.
  static constexpr std::chrono::milliseconds evictable_after{100};
  // How long an answer may take to go out before a newcomer may take its connection's place (a
  // /metrics page goes out in milliseconds to a client that reads).
  static constexpr std::chrono::milliseconds stalled_write_after{1000};

  void listen();
  asio::awaitable<void> accept_loop(std::shared_ptr<State> self);
  asio::awaitable<void> serve(std::shared_ptr<State> self, std::shared_ptr<Session> session);
  http::response<http::string_body> answer(const http::request<http::string_body>& request);
  void refuse_at_once(tcp::socket& socket);
  void session_ended(std::list<std::shared_ptr<Session>>::iterator at);

  asio::any_io_executor executor;
  asio::strand<asio::any_io_executor> strand;  // the acceptor's, and the session list's
  std::shared_ptr<const Metrics> metrics;
  std::function<bool()> ready;
  const MetricsEndpointOptions options;
  tcp::acceptor acceptor;
  asio::steady_timer all_ended;  // cancelled when the accept loop and every session have ended
  std::list<std::shared_ptr<Session>> sessions;  // on the strand
  bool accepting = false;                        // on the strand
  std::atomic<bool> stopping{false};  // set by stop(); sessions end at their next request
  std::atomic<std::uint16_t> bound_port{0};
  std::atomic<std::uint64_t> served{0};
  std::atomic<std::uint64_t> refused{0};
  std::atomic<std::uint64_t> evicted{0};
};

void MetricsEndpoint::State::refuse_at_once(tcp::socket& socket) {
  // One non-blocking try at a short answer, then close: the refused client never holds anything.
  static constexpr std::string_view busy =
      "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
  boost::system::error_code ignored;
  socket.non_blocking(true, ignored);
  socket.write_some(asio::buffer(busy.data(), busy.size()), ignored);
  socket.close(ignored);
}

asio::awaitable<void> MetricsEndpoint::State::accept_loop(std::shared_ptr<State> self) {
  // However the loop ends (an allocation failure included), stop() must see it ended.
  struct Ended {
    explicit Ended(State& ending) : state(ending) {}
    Ended(const Ended&) = delete;
    Ended& operator=(const Ended&) = delete;
    Ended(Ended&&) = delete;
    Ended& operator=(Ended&&) = delete;
    ~Ended() {
      state.accepting = false;
      if (state.sessions.empty()) state.all_ended.cancel();
    }
    State& state;
  } ended{*this};
  while (!stopping) {
    // Each connection on a strand of its own (the io_context may be run by several threads).
    auto [error, socket] = co_await acceptor.async_accept(
        asio::any_io_executor(asio::make_strand(executor)), asio::as_tuple(asio::use_awaitable));
    if (stopping) break;
    if (error) {
      if (error == asio::error::operation_aborted) break;
      // Out of descriptors, a connection reset before it was taken: log, breathe, go on.
      spdlog::warn("pgrt metrics endpoint: accept failed: {}", error.message());
      asio::steady_timer pause(strand, std::chrono::milliseconds(50));
      co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
      continue;
    }
    if (sessions.size() >= options.max_connections) {
      // Full: the oldest connection that owes nothing (idle, or still sending its request), or
      // whose answer does not go out (a client that does not read), makes room, so that silent,
      // dribbling or non-reading connections cannot keep a liveness probe out. Only when every
      // one is being answered is the newcomer refused.
      std::shared_ptr<Session> oldest_idle;
      const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
      for (auto it = sessions.rbegin(); it != sessions.rend(); ++it) {
        if (!(*it)->evicted && (*it)->evictable(now)) {
          oldest_idle = *it;
          break;
        }
      }
      std::size_t evicting = 0;
      for (const auto& open : sessions) evicting += open->evicted ? 1 : 0;
      if (!oldest_idle || evicting >= options.max_connections) {
        ++refused;
        refuse_at_once(socket);
        continue;
      }
      oldest_idle->evicted = true;
      ++evicted;
      asio::dispatch(oldest_idle->stream.get_executor(), [self, oldest_idle] {
        if (!oldest_idle->evictable(std::chrono::steady_clock::now().time_since_epoch().count())) {
          // Its request came in (or its answer went out) meanwhile: it is answered, and may be
          // evicted later.
          asio::dispatch(self->strand, [oldest_idle] { oldest_idle->evicted = false; });
          return;
        }
        // Shut down, not only cancelled: a read that beast starts after this fails at once too.
        boost::system::error_code ignored;
        oldest_idle->stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
        oldest_idle->stream.socket().cancel(ignored);
      });
    }
    auto session = std::make_shared<Session>(std::move(socket));
    sessions.push_front(session);
    const auto at = sessions.begin();
    const auto session_strand = session->stream.get_executor();
    asio::co_spawn(session_strand, serve(self, session), [self, at](const std::exception_ptr&) {
      asio::dispatch(self->strand, [self, at] { self->session_ended(at); });
    });
  }
}

void MetricsEndpoint::State::session_ended(std::list<std::shared_ptr<Session>>::iterator at) {
  sessions.erase(at);
  if (sessions.empty() && !accepting) all_ended.cancel();
}

http::response<http::string_body> MetricsEndpoint::State::answer(
    const http::request<http::string_body>& request) {
  http::response<http::string_body> response;
  response.version(request.version());
  response.set(http::field::server, "pgrt");
  response.set(http::field::cache_control, "no-store");
  response.set(http::field::content_type, "text/plain; charset=utf-8");
  std::string_view target(request.target().data(), request.target().size());
  // The absolute form ("http://host:port/metrics", as a proxy sends it): its path.
  if (const auto scheme = target.find("://");
      scheme != std::string_view::npos && target.find('/') > scheme) {
    const auto path_begins = target.find('/', scheme + 3);
    target =
        path_begins == std::string_view::npos ? std::string_view("/") : target.substr(path_begins);
  }
  const std::string_view path = target.substr(0, target.find('?'));
  if (request.method() != http::verb::get && request.method() != http::verb::head) {
    response.result(http::status::method_not_allowed);
    response.set(http::field::allow, "GET, HEAD");
    response.body() = "only GET and HEAD\n";
  } else if (path == "/metrics") {
    response.result(http::status::ok);
    response.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    response.body() = metrics->render();
  } else if (path == "/healthz") {
    if (const auto reason = metrics->stuck(options.stuck_after)) {
      response.result(http::status::service_unavailable);
      response.body() = "stuck: " + *reason + "\n";
    } else {
      response.result(http::status::ok);
      response.body() = "ok\n";
    }
  } else if (path == "/readyz") {
    const bool is_ready = ready && ready();
    response.result(is_ready ? http::status::ok : http::status::service_unavailable);
    response.body() = is_ready ? "ready\n" : "not ready\n";
  } else {
    response.result(http::status::not_found);
    response.body() = "not found: try /metrics, /healthz or /readyz\n";
  }
  response.keep_alive(request.keep_alive());
  response.prepare_payload();
  if (request.method() == http::verb::head) response.body().clear();  // keeps Content-Length
  return response;
}

asio::awaitable<void> MetricsEndpoint::State::serve(std::shared_ptr<State> self,
                                                    std::shared_ptr<Session> session) {
  (void)self;  // keeps the state alive while the session runs
  auto& stream = session->stream;
  beast::flat_buffer buffer(options.max_header_bytes + options.max_body_bytes + 512);
  for (std::size_t handled = 0; handled < options.max_requests_per_connection && !stopping;
       ++handled) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(static_cast<std::uint32_t>(options.max_header_bytes));
    parser.body_limit(options.max_body_bytes);
    stream.expires_after(options.request_timeout);
    session->awaiting_since = std::chrono::steady_clock::now().time_since_epoch().count();
    session->awaiting_request = true;
    auto [read_error, read] =
        co_await http::async_read(stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
    (void)read;
    session->awaiting_request = false;
    if (read_error) {
      http::status refusal{};
      if (read_error == http::error::header_limit) {
        refusal = http::status::request_header_fields_too_large;
      } else if (read_error == http::error::body_limit) {
        refusal = http::status::payload_too_large;
      } else if (read_error != http::error::end_of_stream && read_error != beast::error::timeout &&
                 read_error != asio::error::operation_aborted &&
                 read_error != asio::error::connection_reset && read_error != asio::error::eof) {
        refusal = http::status::bad_request;
      }
      if (refusal != http::status{}) {
        http::response<http::string_body> response{refusal, 11};
        response.set(http::field::connection, "close");
        response.body() = std::string(http::obsolete_reason(refusal)) + "\n";
        response.prepare_payload();
        stream.expires_after(options.request_timeout);
        (void)co_await http::async_write(stream, response, asio::as_tuple(asio::use_awaitable));
        ++served;
      }
      break;
    }
    auto response = answer(parser.get());
    // The last answer on this connection says so (a keep-alive client must not send another).
    if (handled + 1 >= options.max_requests_per_connection || stopping) response.keep_alive(false);
    const bool keep_alive = response.keep_alive();
    stream.expires_after(options.request_timeout);
    session->writing_since = std::chrono::steady_clock::now().time_since_epoch().count();
    auto [write_error, written] =
        co_await http::async_write(stream, response, asio::as_tuple(asio::use_awaitable));
    session->writing_since = 0;
    (void)written;
    ++served;
    if (write_error || !keep_alive) break;
  }
  boost::system::error_code ignored;
  if (stream.socket().is_open()) stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  stream.close();
}

MetricsEndpoint::MetricsEndpoint(asio::any_io_executor executor,
                                 std::shared_ptr<const Metrics> metrics,
                                 std::function<bool()> ready, MetricsEndpointOptions options)
    : state_(std::make_shared<State>(std::move(executor), std::move(metrics), std::move(ready),
                                     std::move(options))) {}

MetricsEndpoint::~MetricsEndpoint() = default;

namespace {
// Named coroutines that hold the state (a coroutine lambda's captures live in the lambda, not in
// its frame).
asio::awaitable<void> listen_on_strand(std::shared_ptr<MetricsEndpoint::State> state) {
  state->listen();
  co_return;
}

asio::awaitable<void> stop_on_strand(std::shared_ptr<MetricsEndpoint::State> state) {
  state->stopping = true;
  boost::system::error_code ignored;
  state->acceptor.close(ignored);
  for (const auto& session : state->sessions) {
    // Closed on its own strand: a read or write under way fails at once, and so would the next.
    asio::dispatch(session->stream.get_executor(), [session] { session->stream.close(); });
  }
  while (state->accepting || !state->sessions.empty()) {
    co_await state->all_ended.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}
}  // namespace

void MetricsEndpoint::State::listen() {
  const std::string where = options.address + ":" + std::to_string(options.port);
  boost::system::error_code error;
  const auto address = asio::ip::make_address(options.address, error);
  if (error) {
    throw Error(make_error_code(client_errc::invalid_config),
                Diagnostics{.message = "the metrics endpoint's address '" + options.address +
                                       "' is not an IP address",
                            .hint = "give an IPv4 or IPv6 address (PGRT_METRICS_ADDRESS), e.g. "
                                    "127.0.0.1"});
  }
  // (A bound of a day at most: one longer would let slow clients hold connections for good, and
  // past the clock's range it would overflow into a timeout in the past.)
  if (options.request_timeout <= std::chrono::milliseconds(0) ||
      options.request_timeout > std::chrono::hours(24)) {
    throw Error(make_error_code(client_errc::invalid_config),
                Diagnostics{.message = "the metrics endpoint's request_timeout (" +
                                       std::to_string(options.request_timeout.count()) +
                                       " ms) is not valid",
                            .hint = "give from 1 ms to 24 hours (default 5 s)"});
  }
  const tcp::endpoint endpoint(address, options.port);
  const auto fail = [&](const char* what) {
    throw std::system_error(error,
                            "pgrt metrics endpoint: cannot " + std::string(what) + " " + where);
  };
  acceptor.open(endpoint.protocol(), error);
  if (error) fail("open a socket for");
  acceptor.set_option(tcp::acceptor::reuse_address(true), error);
  acceptor.bind(endpoint, error);
  if (error) fail("listen on");
  acceptor.listen(asio::socket_base::max_listen_connections, error);
  if (error) fail("listen on");
  bound_port = acceptor.local_endpoint().port();
  accepting = true;
  asio::co_spawn(strand, accept_loop(shared_from_this()), asio::detached);
  spdlog::info("pgrt metrics endpoint: serving /metrics, /healthz and /readyz on http://{}:{}",
               options.address, bound_port.load());
}

asio::awaitable<void> MetricsEndpoint::start() {
  co_await asio::co_spawn(state_->strand, listen_on_strand(state_), asio::use_awaitable);
}

asio::awaitable<void> MetricsEndpoint::stop() {
  co_await asio::co_spawn(state_->strand, stop_on_strand(state_), asio::use_awaitable);
}

std::uint16_t MetricsEndpoint::port() const noexcept {
  return state_->bound_port;
}

std::uint64_t MetricsEndpoint::requests_served() const noexcept {
  return state_->served;
}

std::uint64_t MetricsEndpoint::connections_refused() const noexcept {
  return state_->refused;
}

std::uint64_t MetricsEndpoint::connections_evicted() const noexcept {
  return state_->evicted;
}

MetricsEndpoint& add_metrics_endpoint(lifecycle::Manager& app, std::shared_ptr<Metrics> metrics,
                                      MetricsEndpointOptions options) {
  metrics->add_lifecycle(app);
  return app.add(std::make_shared<MetricsEndpoint>(
      app.executor(), std::move(metrics), [&app] { return app.ready(); }, std::move(options)));
}

}  // namespace pgrt
