#pragma once

/// @file
/// A TCP proxy that injects network faults between a client and a PostgreSQL server.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace pgrt::testing {

/// Forwards every connection made to 127.0.0.1:port() to the upstream address, in both directions,
/// and on command breaks the path the way real networks and proxies do:
/// - pause(): a blackhole. Bytes are no longer delivered in either direction, yet no FIN or RST is
///   sent; held bytes are delivered after resume().
/// - drop_all(): every connection is reset (RST) on both sides at once.
/// - keep_upstream(true): when a client goes away, its upstream connection is kept open, as a
///   connection-holding proxy (a cloud SQL proxy, PgBouncer) does; release_held() closes those.
///
/// The proxy runs on its own thread. Each command takes effect before it returns.
/// Thread safety: commands may be called from any thread, concurrently.
class FaultProxy {
 public:
  /// Starts listening on a free 127.0.0.1 port. Throws std::system_error if it cannot.
  FaultProxy(std::string upstream_host, std::uint16_t upstream_port);
  /// Closes every connection (gracefully, or held ones too) and joins the proxy's thread.
  ~FaultProxy();
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;
  FaultProxy(FaultProxy&&) = delete;
  FaultProxy& operator=(FaultProxy&&) = delete;

  [[nodiscard]] std::uint16_t port() const noexcept;
  /// "host=127.0.0.1 port=<port>": append user, dbname and other keywords.
  [[nodiscard]] std::string conninfo_prefix() const;

  /// A slow network: each chunk of bytes is delivered `one_way` after the proxy read it, in each
  /// direction (a database in another zone: 1 ms each way). Reads of a direction wait while its
  /// chunk is held, so bytes arriving meanwhile travel with the next chunk: each byte takes
  /// between one_way and twice that. Zero (the default): no delay.
  void set_latency(std::chrono::microseconds one_way);
  /// A slow end: the end of a client's connection (its FIN, or its close) reaches the server
  /// `delay` after the proxy read it, so the server's backend lives on that long after the client
  /// left (and a client still reading sees the server's side close only then). Ignored with
  /// keep_upstream(true). Zero (the default): at once.
  void set_end_delay(std::chrono::microseconds delay);
  void pause();
  void resume();
  void drop_all();
  void keep_upstream(bool enabled);
  /// A pooler mixing up server sessions: the next whole message of `type` (e.g. 'C',
  /// CommandComplete) that a server sends on any connection reaches the client twice. The proxy
  /// reads PostgreSQL's framing on the server's side: connect with sslmode=disable.
  void repeat_next_server_message(char type);
  /// Closes the upstream connections kept open for clients that are gone.
  void release_held();

  /// Client connections being forwarded now.
  [[nodiscard]] std::size_t active_connections() const;
  /// Upstream connections kept open after their client left (keep_upstream mode).
  [[nodiscard]] std::size_t held_upstreams() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace pgrt::testing
