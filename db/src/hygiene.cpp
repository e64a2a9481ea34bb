#include "pgrt/db/hygiene.hpp"

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <spdlog/spdlog.h>
#include <utility>

#include "connection_access.hpp"
#include "pgrt/runtime/identity.hpp"
#include "sql_text.hpp"

namespace pgrt {

namespace {

// The app's backends as the server sees them; parse_connection_tag() then keeps exact tags only.
// In scope: under the login role (session_user), which pg_stat_activity shows for a session that
// SET role to a group role too.
// Every name schema-qualified, operators too (LIKE is the operator ~~): a schema put before
// pg_catalog in the role's search_path must not change whom it lists (nor, below, whom it ends).
constexpr const char* app_backends_sql =
    "SELECT a.pid, a.application_name, coalesce(a.state, ''), "
    "coalesce(a.backend_start::pg_catalog.text, ''), coalesce((EXTRACT(epoch FROM "
    "a.backend_start) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, 0), "
    "coalesce((EXTRACT(epoch FROM pg_catalog.now() OPERATOR(pg_catalog.-) a.state_change) "
    "OPERATOR(pg_catalog.*) 1000)::pg_catalog.int8, 0), coalesce(a.usename::pg_catalog.text, ''), "
    "coalesce(a.datname::pg_catalog.text, ''), coalesce((pg_catalog.host(a.client_addr) "
    "OPERATOR(pg_catalog.||) ':') OPERATOR(pg_catalog.||) a.client_port::pg_catalog.text, "
    "'local'), coalesce(a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database() AND "
    "a.usename OPERATOR(pg_catalog.=) session_user, false), EXISTS (SELECT 1 FROM "
    "pg_catalog.pg_locks l WHERE l.pid OPERATOR(pg_catalog.=) a.pid AND l.locktype "
    "OPERATOR(pg_catalog.=) 'advisory' AND l.granted) FROM pg_catalog.pg_stat_activity a WHERE "
    "a.backend_type OPERATOR(pg_catalog.=) 'client backend' AND a.application_name "
    "OPERATOR(pg_catalog.~~) pg_catalog.like_escape($1, '\\') AND a.pid "
    "OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() ORDER BY a.backend_start, a.pid";

}  // namespace

boost::asio::awaitable<std::vector<AppBackend>> list_app_backends(Connection& connection,
                                                                  std::string_view application) {
  const std::string pattern = like_literal(tag_app_name(application) + "/") + "%";
  auto rows = co_await connection.query(app_backends_sql, pattern);
  std::vector<AppBackend> backends;
  std::map<std::string, HostPresence> presence_of;  // incarnation -> (asked once each)
  for (const Row row : rows) {
    AppBackend backend;
    backend.application_name = row.get<std::string>(1);
    const auto tag = parse_connection_tag(application, backend.application_name);
    if (!tag) continue;
    auto [known, added] = presence_of.try_emplace(tag->incarnation, HostPresence::unknown);
    if (added) known->second = incarnation_on_this_host(tag->incarnation);
    backend.presence = known->second;
    backend.running_here = backend.presence == HostPresence::running;
    backend.pid = row.get<int>(0);
    backend.state = row.get<std::string>(2);
    backend.backend_start = row.get<std::string>(3);
    backend.started_us = row.get<std::int64_t>(4);
    backend.in_state = std::chrono::milliseconds(row.get<std::int64_t>(5));
    backend.user = row.get<std::string>(6);
    backend.database = row.get<std::string>(7);
    backend.client = row.get<std::string>(8);
    backend.in_scope = row.get<bool>(9);
    backend.holds_advisory_lock = row.get<bool>(10);
    backends.push_back(std::move(backend));
  }
  co_return backends;
}

std::vector<std::string> leftover_reasons(const std::vector<AppBackend>& backends,
                                          const LeftoverRule& rule) {
  std::vector<std::optional<ConnectionTagParts>> tags;
  tags.reserve(backends.size());
  for (const auto& backend : backends) {
    tags.push_back(backend.in_scope && backend.application_name != rule.own_tag
                       ? parse_connection_tag(rule.application, backend.application_name)
                       : std::nullopt);
  }
  // Which incarnation of each instance is the live one: this process's for its own instance;
  // without own_tag, for every instance the one whose first backend started last (among those
  // running on this host, if any does).
  std::map<std::string, std::string> live;  // instance -> incarnation
  std::set<std::string> instances_running_here;
  if (!rule.own_tag.empty()) {
    if (auto own = parse_connection_tag(rule.application, rule.own_tag)) {
      live[own->instance] = own->incarnation;
    }
  } else {
    // instance -> incarnation -> when its first backend started
    std::map<std::string, std::map<std::string, std::int64_t>> first_starts;
    // An incarnation that runs on this host is the live one whatever the others' starts: only
    // those running here are candidates then.
    for (std::size_t i = 0; i < backends.size(); ++i) {
      if (tags[i] && backends[i].running_here) instances_running_here.insert(tags[i]->instance);
    }
    for (std::size_t i = 0; i < backends.size(); ++i) {
      if (!tags[i]) continue;
      if (instances_running_here.contains(tags[i]->instance) && !backends[i].running_here) {
        continue;
      }
      auto [entry, added] =
          first_starts[tags[i]->instance].try_emplace(tags[i]->incarnation, backends[i].started_us);
      if (!added) entry->second = std::min(entry->second, backends[i].started_us);
    }
    for (const auto& [instance, incarnations] : first_starts) {
      live[instance] =
          std::max_element(incarnations.begin(), incarnations.end(),
                           [](const auto& a, const auto& b) { return a.second < b.second; })
              ->first;
    }
  }
  std::vector<std::string> reasons(backends.size());
  for (std::size_t i = 0; i < backends.size(); ++i) {
    if (!tags[i]) continue;
    const auto& tag = *tags[i];
    const auto& backend = backends[i];
    const std::string instance = tag.app + "/" + tag.instance;
    // (Without own_tag, as pgrt-diag judges: an incarnation whose name another user's socket
    // holds here may be a live process of this service run as that user, and "superseded" is
    // only an inference: never counted. The start-up cleanup reports it as unverified itself.)
    if (auto found = live.find(tag.instance);
        found != live.end() && found->second != tag.incarnation && !backend.running_here &&
        (!rule.own_tag.empty() || backend.presence != HostPresence::other_user)) {
      reasons[i] = !rule.own_tag.empty() ? "an earlier incarnation of " + instance
                   : instances_running_here.contains(tag.instance)
                       ? "superseded: " + instance + "/" + found->second +
                             " runs on this host, so this incarnation's process is gone or a "
                             "duplicate elsewhere"
                       : "superseded: " + instance + "/" + found->second +
                             " started later, so this incarnation's process is gone or a "
                             "duplicate";
    } else if (rule.idle_threshold.count() > 0 && backend.state == "idle" &&
               !backend.holds_advisory_lock && backend.in_state > rule.idle_threshold) {
      reasons[i] = "idle for " +
                   std::to_string(
                       std::chrono::duration_cast<std::chrono::seconds>(backend.in_state).count()) +
                   " s";
    }
  }
  return reasons;
}

boost::asio::awaitable<bool> terminate_backend_if_unchanged(Connection& connection, int pid,
                                                            std::string application_name,
                                                            std::string backend_start,
                                                            std::chrono::milliseconds wait) {
  auto rows = co_await connection.query(
      "SELECT pg_catalog.pg_terminate_backend(a.pid, $4) FROM pg_catalog.pg_stat_activity a "
      "WHERE a.pid OPERATOR(pg_catalog.=) $1 AND a.application_name OPERATOR(pg_catalog.=) $2 AND "
      "coalesce(a.backend_start::pg_catalog.text, '') OPERATOR(pg_catalog.=) $3",
      pid, application_name, backend_start, static_cast<std::int64_t>(wait.count()));
  co_return !rows.empty() && rows.scalar<bool>();
}

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
  const LeftoverRule rule{.application = options.application,
                          .own_tag = std::move(own_tag),
                          .idle_threshold = options.idle_threshold};

  CleanupReport report;
  if (detail::ConnectionAccess::behind_pooler(connection)) {
    // Configured as a transaction pooler (StartupHygiene skips before it connects), or noticed at
    // connect with PGRT_POOLER unset: the backends the server shows are the pooler's, shared by
    // its clients and tagged with whichever client used them last.
    report.skipped = true;
    report.warning =
        "cleanup skipped: this connection goes through a connection pooler (PGRT_POOLER="
        "transaction, or one noticed at connect with PGRT_POOLER unset: set it to say so), and "
        "the server's backends belong to the pooler, whatever application_name they carry: "
        "ending one would break its other clients. The pooler closes its idle server connections "
        "itself (PgBouncer: server_idle_timeout)";
    spdlog::warn("pgrt cleanup: {}", report.warning);
    co_return report;
  }
  std::string role;  // the connection's: every leftover is in scope
  const std::vector<AppBackend> backends = co_await list_app_backends(connection, rule.application);
  // Another incarnation of this very instance running on this host: a duplicate whose instance
  // lock is elsewhere, not a leftover. Nothing is terminated then; the caller refuses to start.
  const auto own = parse_connection_tag(rule.application, rule.own_tag);
  for (const auto& backend : backends) {
    const auto tag = parse_connection_tag(rule.application, backend.application_name);
    if (!own || !tag || !backend.in_scope || !backend.running_here ||
        tag->instance != own->instance || tag->incarnation == own->incarnation ||
        std::find(report.running_duplicates.begin(), report.running_duplicates.end(),
                  tag->incarnation) != report.running_duplicates.end()) {
      continue;
    }
    report.running_duplicates.push_back(tag->incarnation);
  }
  if (!report.running_duplicates.empty()) {
    std::string incarnations;
    for (const auto& incarnation : report.running_duplicates) {
      incarnations += (incarnations.empty() ? "" : ", ") + prefix + incarnation;
    }
    report.warning = "another " + prefix.substr(0, prefix.size() - 1) +
                     " is running on this host (" + incarnations +
                     ") with its instance lock in another directory (PGRT_RUNTIME_DIR or "
                     "XDG_RUNTIME_DIR differ between the two processes): it is no leftover, "
                     "and nothing was terminated";
    spdlog::warn("pgrt cleanup: {}", report.warning);
    co_return report;
  }
  std::vector<std::string> reasons = leftover_reasons(backends, rule);
  // Where this host cannot tell what runs here, only what the instance lock saw end is proven
  // dead; another user's socket under an incarnation's name proves nothing either way.
  std::string squatted;
  for (std::size_t i = 0; i < backends.size(); ++i) {
    const auto tag = parse_connection_tag(rule.application, backends[i].application_name);
    if (reasons[i].empty() || !own || !tag || tag->instance != own->instance ||
        tag->incarnation == own->incarnation || reasons[i].starts_with("idle for ")) {
      continue;
    }
    if (backends[i].presence == HostPresence::other_user &&
        squatted.find(tag->incarnation) == std::string::npos) {
      squatted += (squatted.empty() ? "" : ", ") + tag->incarnation;
    }
    const bool proven =
        std::find(options.earlier_incarnations.begin(), options.earlier_incarnations.end(),
                  tag->incarnation) != options.earlier_incarnations.end();
    const bool undecided = backends[i].presence == HostPresence::unknown ||
                           backends[i].presence == HostPresence::other_user;
    if (!undecided || proven) continue;
    reasons[i].clear();
    if (std::find(report.unverified_incarnations.begin(), report.unverified_incarnations.end(),
                  tag->incarnation) == report.unverified_incarnations.end()) {
      report.unverified_incarnations.push_back(tag->incarnation);
    }
  }
  if (!report.unverified_incarnations.empty()) {
    std::string incarnations;
    for (const auto& incarnation : report.unverified_incarnations) {
      incarnations += (incarnations.empty() ? "" : ", ") + prefix + incarnation;
    }
    report.warning =
        "left alone the backends of " + incarnations +
        ": the instance lock did not see them end, and " +
        (squatted.empty()
             ? std::string("this process cannot tell whether they run on this host (no unix "
                           "sockets here: allow AF_UNIX, e.g. in systemd's "
                           "RestrictAddressFamilies)")
             : "another user's process holds the name of " + squatted +
                   " on this host (the same service run as another user, or a squatter)") +
        ". Check with pgrt-diag, and terminate them with --kill-leaked";
    spdlog::warn("pgrt cleanup: {}", report.warning);
  }
  for (std::size_t i = 0; i < backends.size(); ++i) {
    if (reasons[i].empty()) continue;
    role = backends[i].user;
    report.backends.push_back(LeftoverBackend{.pid = backends[i].pid,
                                              .application_name = backends[i].application_name,
                                              .state = backends[i].state,
                                              .backend_start = backends[i].backend_start,
                                              .client = backends[i].client,
                                              .reason = reasons[i]});
  }
  if (report.backends.empty()) {
    spdlog::info("pgrt cleanup: no leftover connections of {} (this process is {})", prefix,
                 rule.own_tag);
    co_return report;
  }
  for (auto& backend : report.backends) {
    try {
      backend.terminated = co_await terminate_backend_if_unchanged(
          connection, backend.pid, backend.application_name, backend.backend_start);
    } catch (const Error& error) {
      if (sqlstate_of(error.code()) != "42501") throw;
      report.permission_denied = true;
      report.warning =
          (report.warning.empty() ? std::string() : report.warning + "; ") + "the role " + role +
          " may not terminate backends (" + error.diagnostics().message + "); " +
          std::to_string(report.backends.size()) + " leftover connection(s) of " + prefix +
          " stay. Fix: GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) "
          "TO " +
          quote_identifier(role) +
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
