#pragma once

/// @file
/// A TLS-terminating proxy that controls how the server's bytes are cut into TLS records.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace pgrt::testing {

/// Accepts PostgreSQL clients on 127.0.0.1:port(), answers their SSLRequest, does the TLS
/// handshake with the given certificate, and forwards plaintext to and from the upstream server
/// through its unix socket (e.g. `<TempCluster::directory()>/.s.PGSQL.<port>`). It writes each of
/// the server's replies (what arrives before the server pauses for a few milliseconds) as TLS
/// records of which the last is a full 16 KiB one, and the one before it cuts a message: a client
/// whose read buffer has less room than 16 KiB then gets part of that last record, and OpenSSL
/// keeps the rest decrypted while the socket shows nothing more. A client that waits on the socket
/// without asking OpenSSL what it holds stalls on such a reply; a real server or pooler sends
/// records like this when it coalesces small messages.
///
/// Replies of 16 KiB or less go out as one record. A CancelRequest is passed to the server as it
/// is; when either side of a session ends, the proxy ends the other. The proxy runs on threads of
/// its own; the destructor closes every connection and joins them. Thread safety: port() from any
/// thread.
class TlsRecordProxy {
 public:
  /// Starts listening on a free 127.0.0.1 port. Throws std::runtime_error when the certificate
  /// or key cannot be loaded or no port is free.
  TlsRecordProxy(std::filesystem::path upstream_socket, const std::filesystem::path& certificate,
                 const std::filesystem::path& key);
  ~TlsRecordProxy();
  TlsRecordProxy(const TlsRecordProxy&) = delete;
  TlsRecordProxy& operator=(const TlsRecordProxy&) = delete;
  TlsRecordProxy(TlsRecordProxy&&) = delete;
  TlsRecordProxy& operator=(TlsRecordProxy&&) = delete;

  [[nodiscard]] std::uint16_t port() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace pgrt::testing
