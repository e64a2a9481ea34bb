#include "pgrt/testing/fault_proxy.hpp"

#include <algorithm>
#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <future>
#include <map>
#include <string>
#include <thread>
#include <utility>

namespace pgrt::testing {

namespace asio = boost::asio;
using asio::ip::tcp;

namespace {
constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);

// Where the server's side of a session is in PostgreSQL's message framing (repeat_next()).
struct ServerFraming {
  bool started = false;     // the first framed message began (before: 1-byte SSL/GSS refusals)
  bool unreadable = false;  // TLS accepted: nothing to frame
  std::array<unsigned char, 5> header{};
  std::size_t header_have = 0;
  std::size_t body_left = 0;
  bool copying = false;  // the current message is the one to repeat
  std::string copy;
};

struct Session {
  Session(tcp::socket client_socket, tcp::socket upstream_socket)
      : client(std::move(client_socket)), upstream(std::move(upstream_socket)) {}
  tcp::socket client;
  tcp::socket upstream;
  bool held = false;  // the client left; the upstream stays open on purpose
  bool ended = false;
  ServerFraming framing;

  void close_both(bool reset) {
    for (tcp::socket* socket : {&client, &upstream}) {
      boost::system::error_code ignored;
      if (!socket->is_open()) continue;
      if (reset) socket->set_option(asio::socket_base::linger(true, 0), ignored);
      socket->close(ignored);
    }
  }
};
}  // namespace

struct FaultProxy::State {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  tcp::endpoint upstream_endpoint;
  std::string upstream_host;
  std::uint16_t upstream_port = 0;
  std::uint16_t port = 0;

  // Touched only on the proxy's thread.
  bool paused = false;
  bool keep_upstream = false;
  std::chrono::microseconds latency{0};    // set_latency()
  std::chrono::microseconds end_delay{0};  // set_end_delay()
  char repeat_type = 0;                    // repeat_next_server_message(): armed while not 0
  asio::steady_timer resumed{io, asio::steady_timer::time_point::max()};
  std::uint64_t next_id = 0;
  std::map<std::uint64_t, std::shared_ptr<Session>> sessions;
  std::thread thread;

  // Runs `work` on the proxy's thread and waits for it.
  template <typename Work>
  auto run(Work work) {
    std::packaged_task<decltype(work())()> task(std::move(work));
    auto result = task.get_future();
    asio::post(io, std::move(task));
    return result.get();
  }

  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [error, client] = co_await acceptor.async_accept(no_throw);
      if (error == asio::error::operation_aborted || !acceptor.is_open()) co_return;
      if (error) continue;
      tcp::socket upstream(io);
      auto [connect_error] = co_await upstream.async_connect(upstream_endpoint, no_throw);
      if (connect_error) {
        boost::system::error_code ignored;
        client.close(ignored);
        continue;
      }
      auto id = next_id++;
      auto session = std::make_shared<Session>(std::move(client), std::move(upstream));
      sessions.emplace(id, session);
      asio::co_spawn(io, pump(id, session, /*from_client=*/true), asio::detached);
      asio::co_spawn(io, pump(id, session, /*from_client=*/false), asio::detached);
    }
  }

  // The server's bytes as read, with the next whole message of `repeat_type` sent twice.
  std::string pass_on_from_server(ServerFraming& framing, const char* data, std::size_t size) {
    std::string out;
    std::size_t at = 0;
    while (at < size) {
      if (framing.unreadable) {
        out.append(data + at, size - at);
        break;
      }
      if (!framing.started && framing.header_have == 0) {
        if (data[at] == 'N') {  // no SSL / no GSS encryption: one byte, unframed
          out += data[at++];
          continue;
        }
        if (data[at] == 'S' || data[at] == 'G') {
          framing.unreadable = true;
          continue;
        }
        framing.started = true;
      }
      if (framing.header_have < framing.header.size()) {
        framing.header[framing.header_have++] = static_cast<unsigned char>(data[at]);
        out += data[at++];
        if (framing.header_have < framing.header.size()) continue;
        const std::uint32_t length =
            (std::uint32_t{framing.header[1]} << 24) | (std::uint32_t{framing.header[2]} << 16) |
            (std::uint32_t{framing.header[3]} << 8) | std::uint32_t{framing.header[4]};
        framing.body_left = length >= 4 ? length - 4 : 0;
        framing.copying = repeat_type != 0 && static_cast<char>(framing.header[0]) == repeat_type;
        if (framing.copying) {
          framing.copy.assign(framing.header.begin(), framing.header.end());
          repeat_type = 0;
        }
      }
      const std::size_t take = std::min(framing.body_left, size - at);
      out.append(data + at, take);
      if (framing.copying) framing.copy.append(data + at, take);
      at += take;
      framing.body_left -= take;
      if (framing.body_left == 0) {  // the message is whole
        if (framing.copying) out += framing.copy;
        framing.copying = false;
        framing.header_have = 0;
      }
    }
    return out;
  }

  asio::awaitable<void> pump(std::uint64_t id, std::shared_ptr<Session> session, bool from_client) {
    tcp::socket& from = from_client ? session->client : session->upstream;
    tcp::socket& to = from_client ? session->upstream : session->client;
    std::array<char, 16384> buffer{};
    bool client_side_failed = false;
    for (;;) {
      auto [read_error, size] = co_await from.async_read_some(asio::buffer(buffer), no_throw);
      const auto read_at = std::chrono::steady_clock::now();
      if (read_error) {
        client_side_failed = from_client;
        if (from_client && end_delay.count() > 0 && !keep_upstream) {
          // The client's end reaches the server late (set_end_delay()).
          asio::steady_timer delay(io, read_at + end_delay);
          co_await delay.async_wait(no_throw);
        }
        break;
      }
      while (paused && !session->ended) {
        co_await resumed.async_wait(no_throw);
      }
      if (session->ended) co_return;
      if (latency.count() > 0) {  // held this long after it was read (reads wait meanwhile)
        asio::steady_timer delay(io, read_at + latency);
        co_await delay.async_wait(no_throw);
        if (session->ended) co_return;
      }
      std::string passed_on;
      if (!from_client) passed_on = pass_on_from_server(session->framing, buffer.data(), size);
      auto [write_error, written] = co_await asio::async_write(
          to, from_client ? asio::buffer(buffer, size) : asio::buffer(passed_on), no_throw);
      if (write_error) {
        client_side_failed = !from_client;
        break;
      }
    }
    if (session->ended || session->held) co_return;
    if (client_side_failed && keep_upstream) {
      // The client is gone; keep the server's side open as a connection-holding proxy would.
      session->held = true;
      boost::system::error_code ignored;
      session->client.close(ignored);
      co_return;
    }
    session->ended = true;
    session->close_both(/*reset=*/false);
    sessions.erase(id);
  }

  void end_all(bool reset) {
    for (auto& [id, session] : sessions) {
      session->ended = true;
      session->close_both(reset);
    }
    sessions.clear();
    resumed.cancel();  // wakes pumps waiting for resume, which then see `ended`
  }
};

FaultProxy::FaultProxy(std::string upstream_host, std::uint16_t upstream_port)
    : state_(std::make_shared<State>()) {
  state_->upstream_host = std::move(upstream_host);
  state_->upstream_port = upstream_port;
  tcp::resolver resolver(state_->io);
  auto results = resolver.resolve(state_->upstream_host, std::to_string(upstream_port));
  state_->upstream_endpoint = *results.begin();
  tcp::endpoint listen(asio::ip::make_address("127.0.0.1"), 0);
  state_->acceptor.open(listen.protocol());
  state_->acceptor.set_option(tcp::acceptor::reuse_address(true));
  state_->acceptor.bind(listen);
  state_->acceptor.listen();
  state_->port = state_->acceptor.local_endpoint().port();
  asio::co_spawn(state_->io, state_->accept_loop(), asio::detached);
  state_->thread = std::thread([state = state_] { state->io.run(); });
}

FaultProxy::~FaultProxy() {
  try {
    state_->run([state = state_.get()] {
      boost::system::error_code ignored;
      state->acceptor.close(ignored);
      state->end_all(/*reset=*/false);
    });
  } catch (...) {  // NOLINT(bugprone-empty-catch): closing anyway below
  }
  state_->io.stop();
  if (state_->thread.joinable()) state_->thread.join();
}

std::uint16_t FaultProxy::port() const noexcept {
  return state_->port;
}

std::string FaultProxy::conninfo_prefix() const {
  return "host=127.0.0.1 port=" + std::to_string(state_->port);
}

void FaultProxy::pause() {
  state_->run([state = state_.get()] { state->paused = true; });
}

void FaultProxy::resume() {
  state_->run([state = state_.get()] {
    state->paused = false;
    state->resumed.cancel();
  });
}

void FaultProxy::set_latency(std::chrono::microseconds one_way) {
  state_->run([state = state_.get(), one_way] { state->latency = one_way; });
}

void FaultProxy::set_end_delay(std::chrono::microseconds delay) {
  state_->run([state = state_.get(), delay] { state->end_delay = delay; });
}

void FaultProxy::repeat_next_server_message(char type) {
  state_->run([state = state_.get(), type] { state->repeat_type = type; });
}

void FaultProxy::drop_all() {
  state_->run([state = state_.get()] { state->end_all(/*reset=*/true); });
}

void FaultProxy::keep_upstream(bool enabled) {
  state_->run([state = state_.get(), enabled] { state->keep_upstream = enabled; });
}

void FaultProxy::release_held() {
  state_->run([state = state_.get()] {
    std::erase_if(state->sessions, [](auto& entry) {
      auto& session = *entry.second;
      if (!session.held) return false;
      session.ended = true;
      session.close_both(/*reset=*/false);
      return true;
    });
  });
}

std::size_t FaultProxy::active_connections() const {
  return state_->run([state = state_.get()] {
    return static_cast<std::size_t>(std::count_if(state->sessions.begin(), state->sessions.end(),
                                                  [](auto& e) { return !e.second->held; }));
  });
}

std::size_t FaultProxy::held_upstreams() const {
  return state_->run([state = state_.get()] {
    return static_cast<std::size_t>(std::count_if(state->sessions.begin(), state->sessions.end(),
                                                  [](auto& e) { return e.second->held; }));
  });
}

}  // namespace pgrt::testing
