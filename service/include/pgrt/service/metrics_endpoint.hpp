#pragma once

/// @file
/// An HTTP endpoint for metrics and probes (/metrics, /healthz, /readyz), as a lifecycle
/// component on the service's own io_context (Boost.Beast; no thread of its own).

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "pgrt/lifecycle/manager.hpp"
#include "pgrt/service/metrics.hpp"

namespace pgrt {

/// Where the endpoint listens and what it tolerates from a client. An aggregate.
struct MetricsEndpointOptions {
  /// The address to bind (env PGRT_METRICS_ADDRESS). Loopback by default: expose it on purpose.
  std::string address = "127.0.0.1";
  /// The port (env PGRT_METRICS_PORT); 0 picks a free one (MetricsEndpoint::port() tells which).
  std::uint16_t port = 0;
  /// Connections served at once. When all are open, a new one takes the place of the oldest that
  /// has owed nothing for 100 ms or more (idle, or still sending its request: it is closed), or
  /// whose answer has not gone out for 1 s (a client that does not read), so that silent,
  /// dribbling or non-reading connections cannot keep a liveness probe out; when there is none,
  /// the new one is closed at once (with a 503 when the socket takes it without waiting), so that
  /// a flood can keep neither the slots nor the descriptors, nor the io_context busy.
  std::size_t max_connections = 32;
  /// A request whose header is larger gets 431 and its connection is closed.
  std::size_t max_header_bytes = 8 * 1024;
  /// A request whose body is larger gets 413 and its connection is closed (the endpoint takes no
  /// body; a small one is tolerated and ignored).
  std::size_t max_body_bytes = 1024;
  /// Bounds reading one request (from the connection's first byte or the previous response) and
  /// writing its response: a slow client (slowloris) is closed when it passes. From 1 ms to 24 h:
  /// another value is refused with client_errc::invalid_config when the endpoint starts.
  std::chrono::milliseconds request_timeout{5'000};
  /// Requests on one connection before it is closed (keep-alive is honoured up to this).
  std::size_t max_requests_per_connection = 100;
  /// /healthz answers 503 when a pool's caller has waited longer than this (Metrics::stuck()).
  /// Keep it above the pools' acquire_timeout: a wait that outlives it means the pool has
  /// stopped serving.
  std::chrono::milliseconds stuck_after{60'000};

  /// The defaults, overridden by PGRT_METRICS_ADDRESS and PGRT_METRICS_PORT; a malformed port
  /// throws pgrt::Error(client_errc::invalid_config).
  [[nodiscard]] static MetricsEndpointOptions from_env();
};

/// A lifecycle component (named "metrics_endpoint") serving, over HTTP/1.1 on its executor:
///
/// - `GET /metrics`: Metrics::render() (`text/plain; version=0.0.4`);
/// - `GET /healthz`: 200 "ok" while the process runs its io_context and no pool is stuck
///   (Metrics::stuck()), else 503 with the reason. A blocked io_context answers nothing: the
///   probe's own timeout then fails it, as it should;
/// - `GET /readyz`: 200 "ready" while `ready()` is true, else 503 (with add_metrics_endpoint(),
///   the manager's ready(): false until every component has started and from the first stop
///   signal on).
///
/// HEAD is answered too; other methods get 405, other paths 404. Every request and response is
/// bounded by MetricsEndpointOptions (header and body size, time, connections).
///
/// To keep answering while the others drain (/readyz false, /metrics still counting), the
/// endpoint must stop after them: a component stops before what it depends on, so add the
/// endpoint first and list it in the pool's after() (add_metrics_endpoint() returns it for
/// that).
///
/// start() binds and listens, and throws std::system_error naming the address and port when it
/// cannot (a port in use, an address not local). stop() closes the listener and every
/// connection, and returns once each has ended (bounded by request_timeout).
///
/// Thread safety: port() and requests_served() from any thread once start() has returned.
class MetricsEndpoint {
 public:
  MetricsEndpoint(boost::asio::any_io_executor executor, std::shared_ptr<const Metrics> metrics,
                  std::function<bool()> ready, MetricsEndpointOptions options = {});
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;
  MetricsEndpoint(MetricsEndpoint&&) = delete;
  MetricsEndpoint& operator=(MetricsEndpoint&&) = delete;

  [[nodiscard]] std::string name() const { return "metrics_endpoint"; }
  [[nodiscard]] boost::asio::awaitable<void> start();
  [[nodiscard]] boost::asio::awaitable<void> stop();

  /// The port it listens on (the one picked, for port 0); 0 before start().
  [[nodiscard]] std::uint16_t port() const noexcept;
  /// Requests answered so far (any status).
  [[nodiscard]] std::uint64_t requests_served() const noexcept;
  /// Connections refused because max_connections were open and being answered.
  [[nodiscard]] std::uint64_t connections_refused() const noexcept;
  /// Idle (or still-arriving) connections closed to make room for a new one.
  [[nodiscard]] std::uint64_t connections_evicted() const noexcept;

  /// Implementation detail.
  struct State;

 private:
  std::shared_ptr<State> state_;
};

/// Adds a MetricsEndpoint serving `metrics` to `app` (readiness: app.ready(); with no
/// dependencies, so that it starts first), and adds the app's lifecycle state to `metrics`.
/// Make the pool's component depend on it (after(endpoint)) so that it stops last.
MetricsEndpoint& add_metrics_endpoint(
    lifecycle::Manager& app, std::shared_ptr<Metrics> metrics,
    MetricsEndpointOptions options = MetricsEndpointOptions::from_env());

}  // namespace pgrt
