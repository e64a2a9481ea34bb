#include "pgrt/db/hygiene.hpp"

#include <algorithm>
#include <cstdint>
#include <spdlog/spdlog.h>
#include <utility>

#include "pgrt/runtime/identity.hpp"

namespace pgrt {

namespace {

constexpr const char* leftovers_sql =
    "SELECT pid, application_name, coalesce(state, ''), backend_start::text, "
    "coalesce(host(client_addr) || ':' || client_port, 'local'), "
    "application_name LIKE $1 ESCAPE '\\' AS predecessor, "
    "coalesce(extract(epoch FROM now() - state_change)::bigint, 0) AS idle_seconds, "
    "current_user::text "
    "FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND datname = current_database() "
    "AND usename = current_user AND pid <> pg_backend_pid() AND application_name <> $2 "
    "AND (application_name LIKE $1 ESCAPE '\\' "
    "OR ($3::bigint > 0 AND application_name LIKE $4 ESCAPE '\\' AND state = 'idle' "
    "AND state_change < now() - make_interval(secs => $3::bigint) "
    // A live instance's cluster-wide lock session is idle for good: never "idle too long".
    "AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = pg_stat_activity.pid "
    "AND l.locktype = 'advisory' AND l.granted))) "
    "ORDER BY backend_start";

}  // namespace

std::string like_literal(std::string_view text) {
  std::string pattern;
  for (char c : text) {
    if (c == '\\' || c == '%' || c == '_') pattern += '\\';
    pattern += c;
  }
  return pattern;
}

std::size_t CleanupReport::terminated() const noexcept {
  return static_cast<std::size_t>(std::count_if(
      backends.begin(), backends.end(), [](const LeftoverBackend& b) { return b.terminated; }));
}

boost::asio::awaitable<CleanupReport> cleanup_predecessors(Connection& connection,
                                                           const CleanupOptions& options,
                                                           std::string own_tag) {
  const std::string prefix = connection_tag_prefix(options.application, options.instance);
  const std::string app_prefix = tag_app_name(options.application) + "/";
  const std::string instance_pattern = like_literal(prefix) + "%";
  const std::string app_pattern = like_literal(app_prefix) + "%";
  const auto idle_seconds = static_cast<std::int64_t>(options.idle_threshold.count());

  CleanupReport report;
  auto rows = co_await connection.query(leftovers_sql, instance_pattern, own_tag, idle_seconds,
                                        app_pattern);
  std::string role;
  for (const Row row : rows) {
    LeftoverBackend backend;
    backend.pid = row.get<int>(0);
    backend.application_name = row.get<std::string>(1);
    backend.state = row.get<std::string>(2);
    backend.backend_start = row.get<std::string>(3);
    backend.client = row.get<std::string>(4);
    backend.reason = row.get<bool>(5)
                         ? "an earlier incarnation of " + prefix.substr(0, prefix.size() - 1)
                         : "idle for " + std::to_string(row.get<std::int64_t>(6)) + " s";
    role = row.get<std::string>(7);
    report.backends.push_back(std::move(backend));
  }
  if (report.backends.empty()) {
    spdlog::info("pgrt cleanup: no leftover connections of {} (this process is {})", prefix,
                 own_tag);
    co_return report;
  }
  for (auto& backend : report.backends) {
    try {
      auto result = co_await connection.query("SELECT pg_terminate_backend($1)", backend.pid);
      backend.terminated = result.scalar<bool>();
    } catch (const Error& error) {
      if (sqlstate_of(error.code()) != "42501") throw;
      report.permission_denied = true;
      report.warning =
          "the role " + role + " may not terminate backends (" + error.diagnostics().message +
          "); " + std::to_string(report.backends.size()) + " leftover connection(s) of " + prefix +
          " stay. Fix: GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) "
          "TO " +
          role +
          "; (membership of pg_signal_backend does not help: it allows signalling other roles' "
          "backends, not calling a function whose EXECUTE was revoked)";
      spdlog::warn("pgrt cleanup: {}", report.warning);
      break;
    }
    if (backend.terminated) {
      spdlog::info("pgrt cleanup: terminated backend {} ({}, {}, started {}, client {}): {}",
                   backend.pid, backend.application_name,
                   backend.state.empty() ? "no state" : backend.state, backend.backend_start,
                   backend.client, backend.reason);
    } else {
      spdlog::info("pgrt cleanup: backend {} ({}) was already gone", backend.pid,
                   backend.application_name);
    }
  }
  spdlog::info("pgrt cleanup: {} of {} leftover connection(s) of {} terminated",
               report.terminated(), report.backends.size(), prefix);
  co_return report;
}

}  // namespace pgrt
