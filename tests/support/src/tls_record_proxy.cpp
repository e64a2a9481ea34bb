#include "pgrt/testing/tls_record_proxy.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <stdexcept>
#include <sys/socket.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace pgrt::testing {

namespace {

constexpr std::size_t full_record = 16384;
constexpr int quiet_ms = 20;  // a reply has ended when the server says nothing for this long

std::string openssl_error(const char* what) {
  std::array<char, 256> text{};
  ERR_error_string_n(ERR_get_error(), text.data(), text.size());
  return std::string(what) + ": " + text.data();
}

bool read_exactly(int fd, void* buffer, std::size_t size) {
  auto* bytes = static_cast<char*>(buffer);
  while (size > 0) {
    const ssize_t received = ::recv(fd, bytes, size, 0);
    if (received <= 0) return false;
    bytes += received;
    size -= static_cast<std::size_t>(received);
  }
  return true;
}

bool write_all(int fd, const char* bytes, std::size_t size) {
  while (size > 0) {
    const ssize_t sent = ::send(fd, bytes, size, MSG_NOSIGNAL);
    if (sent <= 0) return false;
    bytes += sent;
    size -= static_cast<std::size_t>(sent);
  }
  return true;
}

bool ssl_write_all(SSL* ssl, const char* bytes, std::size_t size) {
  while (size > 0) {
    const int written = SSL_write(ssl, bytes, static_cast<int>(size));
    if (written <= 0) return false;
    bytes += written;
    size -= static_cast<std::size_t>(written);
  }
  return true;
}

int connect_upstream(const std::filesystem::path& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.native().size() >= sizeof address.sun_path) return -1;
  std::memcpy(address.sun_path, path.c_str(), path.native().size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

struct TlsRecordProxy::State {
  SSL_CTX* context = nullptr;
  int listener = -1;
  std::uint16_t port = 0;
  std::filesystem::path upstream_socket;
  std::atomic<bool> stopping{false};
  std::mutex mutex;
  std::vector<int> open_descriptors;  // shut down by the destructor to end the sessions
  std::vector<std::thread> sessions;
  std::thread acceptor;

  void track(int fd) {
    std::lock_guard lock(mutex);
    open_descriptors.push_back(fd);
  }

  void accept_loop() {
    for (;;) {
      const int client = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) {
        if (stopping) return;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;
      }
      std::lock_guard lock(mutex);
      if (stopping) {
        ::close(client);
        return;
      }
      open_descriptors.push_back(client);
      sessions.emplace_back([this, client] { serve(client); });
    }
  }

  // One client: the SSLRequest, the handshake, then plaintext both ways. When either side ends,
  // so does the other (shut down; the destructor closes the descriptors).
  void serve(int client) {
    const int upstream = connect_upstream(upstream_socket);
    if (upstream < 0) {
      ::shutdown(client, SHUT_RDWR);
      return;
    }
    track(upstream);
    struct EndBoth {
      int first;
      int second;
      ~EndBoth() {
        ::shutdown(first, SHUT_RDWR);
        ::shutdown(second, SHUT_RDWR);
      }
    } end_both{client, upstream};
    // libpq may ask for GSS encryption first; refuse it, then take the SSLRequest. A
    // CancelRequest (a connection of its own) goes to the server as it is.
    for (;;) {
      std::array<unsigned char, 8> request{};
      if (!read_exactly(client, request.data(), request.size())) return;
      const std::uint32_t code = (std::uint32_t{request[4]} << 24) |
                                 (std::uint32_t{request[5]} << 16) |
                                 (std::uint32_t{request[6]} << 8) | request[7];
      if (code == 80877102) {
        std::array<unsigned char, 16> cancel{};
        std::copy(request.begin(), request.end(), cancel.begin());
        if (read_exactly(client, cancel.data() + 8, 8)) {
          write_all(upstream, reinterpret_cast<const char*>(cancel.data()), cancel.size());
        }
        return;
      }
      const bool ssl_request = code == 80877103;
      const char answer = ssl_request ? 'S' : 'N';
      if (!write_all(client, &answer, 1)) return;
      if (ssl_request) break;
      if (code != 80877104) return;  // neither SSLRequest nor GSSENCRequest
    }
    std::unique_ptr<SSL, void (*)(SSL*)> ssl(SSL_new(context), SSL_free);
    if (!ssl || SSL_set_fd(ssl.get(), client) != 1 || SSL_accept(ssl.get()) != 1) return;
    std::vector<char> reply;
    std::array<char, 65536> buffer{};
    for (;;) {
      // What OpenSSL holds decrypted is read before the socket is polled.
      if (SSL_pending(ssl.get()) == 0) {
        std::array<pollfd, 2> watched{pollfd{.fd = client, .events = POLLIN, .revents = 0},
                                      pollfd{.fd = upstream, .events = POLLIN, .revents = 0}};
        const int ready = ::poll(watched.data(), watched.size(), reply.empty() ? -1 : quiet_ms);
        if (ready < 0 && errno == EINTR) continue;
        if (ready < 0 || stopping) return;
        if (ready == 0) {  // the server paused: its reply is complete
          if (!send_reply(ssl.get(), reply)) return;
          continue;
        }
        if ((watched[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
          const ssize_t received = ::recv(upstream, buffer.data(), buffer.size(), 0);
          if (received <= 0) {
            send_reply(ssl.get(), reply);
            return;
          }
          reply.insert(reply.end(), buffer.data(), buffer.data() + received);
          continue;
        }
        if ((watched[0].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      }
      const int received = SSL_read(ssl.get(), buffer.data(), static_cast<int>(buffer.size()));
      if (received <= 0) return;
      if (!write_all(upstream, buffer.data(), static_cast<std::size_t>(received))) return;
    }
  }

  // Writes the reply so that its last record is a full one: [rest][16 KiB], or one record.
  static bool send_reply(SSL* ssl, std::vector<char>& reply) {
    bool sent = true;
    std::size_t offset = 0;
    while (sent && reply.size() - offset > full_record) {
      const std::size_t before_last = reply.size() - offset - full_record;
      const std::size_t chunk = std::min(before_last, full_record);
      sent = ssl_write_all(ssl, reply.data() + offset, chunk);
      offset += chunk;
    }
    if (sent) sent = ssl_write_all(ssl, reply.data() + offset, reply.size() - offset);
    reply.clear();
    return sent;
  }
};

TlsRecordProxy::TlsRecordProxy(std::filesystem::path upstream_socket,
                               const std::filesystem::path& certificate,
                               const std::filesystem::path& key)
    : state_(std::make_unique<State>()) {
  State& state = *state_;
  state.upstream_socket = std::move(upstream_socket);
  state.context = SSL_CTX_new(TLS_server_method());
  if (state.context == nullptr) throw std::runtime_error(openssl_error("SSL_CTX_new"));
  // Tickets would add records after the handshake that this proxy does not cut; not needed.
  SSL_CTX_set_num_tickets(state.context, 0);
  if (SSL_CTX_use_certificate_chain_file(state.context, certificate.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(state.context, key.c_str(), SSL_FILETYPE_PEM) != 1) {
    std::string error =
        openssl_error(("cannot load " + certificate.string() + " or " + key.string()).c_str());
    SSL_CTX_free(state.context);
    throw std::runtime_error(error);
  }
  state.listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  auto* generic = reinterpret_cast<sockaddr*>(&address);
  if (state.listener < 0 || ::bind(state.listener, generic, sizeof address) != 0 ||
      ::listen(state.listener, 64) != 0 || ::getsockname(state.listener, generic, &length) != 0) {
    std::string error =
        std::string("TlsRecordProxy: cannot listen on 127.0.0.1: ") + std::strerror(errno);
    if (state.listener >= 0) ::close(state.listener);
    SSL_CTX_free(state.context);
    throw std::runtime_error(error);
  }
  state.port = ntohs(address.sin_port);
  state.acceptor = std::thread([&state] { state.accept_loop(); });
}

TlsRecordProxy::~TlsRecordProxy() {
  State& state = *state_;
  state.stopping = true;
  ::shutdown(state.listener, SHUT_RDWR);
  state.acceptor.join();
  ::close(state.listener);
  std::vector<std::thread> sessions;
  {
    std::lock_guard lock(state.mutex);
    for (int fd : state.open_descriptors) ::shutdown(fd, SHUT_RDWR);
    sessions.swap(state.sessions);
  }
  for (auto& session : sessions) session.join();
  for (int fd : state.open_descriptors) ::close(fd);
  SSL_CTX_free(state.context);
}

std::uint16_t TlsRecordProxy::port() const noexcept {
  return state_->port;
}

}  // namespace pgrt::testing
