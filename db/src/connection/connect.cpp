#include <algorithm>
#include <array>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <cctype>
#include <charconv>
#include <memory>
#include <spdlog/spdlog.h>
#include <vector>

#include "conninfo.hpp"
#include "impl.hpp"

namespace pgrt {

std::string Connection::Impl::target() const {
  if (conn == nullptr) return connecting_to.empty() ? "the server" : connecting_to;
  std::string host = PQhost(conn) != nullptr ? PQhost(conn) : "";
  std::string port = PQport(conn) != nullptr ? PQport(conn) : "";
  std::string where =
      host.empty() || host.front() != '/' ? host + ":" + port : "socket " + host + " port " + port;
  return where + " (database \"" + (PQdb(conn) != nullptr ? PQdb(conn) : "") + "\", user \"" +
         (PQuser(conn) != nullptr ? PQuser(conn) : "") + "\")";
}

namespace {

// The server's notices and warnings (RAISE NOTICE, a deprecated setting, a transaction already
// in progress) go to spdlog's default logger, not to the process's stderr (libpq's default):
// WARNING as warn, NOTICE and INFO as info, DEBUG and LOG as debug.
void log_server_notice(void* /*unused*/, const PGresult* notice) {
  const char* severity = PQresultErrorField(notice, PG_DIAG_SEVERITY_NONLOCALIZED);
  const char* message = PQresultErrorField(notice, PG_DIAG_MESSAGE_PRIMARY);
  const std::string_view level = severity != nullptr ? severity : "NOTICE";
  const std::string_view text = message != nullptr ? message : PQresultErrorMessage(notice);
  if (level == "WARNING") {
    spdlog::warn("pgrt: the server warns: {}", text);
  } else if (level == "NOTICE" || level == "INFO") {
    spdlog::info("pgrt: server notice: {}", text);
  } else {
    spdlog::debug("pgrt: server {}: {}", level, text);
  }
}

// What to do about a failed TLS set-up, from libpq's message; "" when it is not about TLS.
// (A TLS connection that breaks on the way, "SSL SYSCALL error", is a network failure.)
std::string tls_hint(std::string_view message) {
  if (contains(message, "does not match host name")) {
    return "the server's certificate does not name the host connected to: connect by a name the "
           "certificate holds (the host keyword; hostaddr may carry the IP address), or use "
           "sslmode=verify-ca to check the CA only";
  }
  if (contains(message, "certificate verify failed")) {
    return "the server's certificate failed the check: it is not signed by a CA in sslrootcert "
           "(default ~/.postgresql/root.crt), or it has expired or is not valid yet (check the "
           "certificate's dates and both clocks). Point sslrootcert at the CA that signed it "
           "(managed servers publish theirs); note that sslmode=require checks it too whenever "
           "a root certificate file is there";
  }
  if (contains(message, "alert protocol version") || contains(message, "unsupported protocol") ||
      contains(message, "no protocols available")) {
    return "the client and the server share no TLS version: compare ssl_min_protocol_version "
           "and ssl_max_protocol_version in the conninfo with the server's settings";
  }
  if (contains(message, "could not read root certificate file")) {
    return "sslrootcert names a file that holds no readable PEM certificate: check its path and "
           "contents";
  }
  if (contains(message, "root certificate file")) {
    return "sslmode verify-ca and verify-full need the CA that signed the server's certificate: "
           "set sslrootcert to its file";
  }
  if (contains(message, "does not support SSL")) {
    return "the server does not offer TLS (ssl=off): turn it on, or use sslmode=prefer only on a "
           "network you trust";
  }
  if (contains(message, "certificate") || contains(message, "private key")) {
    return "TLS could not be set up: check sslrootcert, sslcert and sslkey, and the server's "
           "ssl settings";
  }
  return {};
}

// libpq's connect_timeout keyword (seconds, per host; 0, negative or absent: none; 1 counts as
// 2), which its asynchronous API leaves to the caller.
error_code read_connect_timeout(const ParsedConninfo& parsed,
                                std::optional<std::chrono::milliseconds>& per_host,
                                Diagnostics& said) {
  const std::string text = parsed.get("connect_timeout", "PGCONNECT_TIMEOUT");
  if (text.empty()) return {};
  int seconds = 0;
  const auto [end, problem] = std::from_chars(text.data(), text.data() + text.size(), seconds);
  if (problem != std::errc{} || end != text.data() + text.size()) {
    said = Diagnostics{.message = "the conninfo's connect_timeout \"" + text +
                                  "\" is not a whole number of seconds",
                       .hint =
                           "give it in seconds (connect_timeout=5), or leave it out: "
                           "ConnectOptions::connect_timeout bounds the whole connect"};
    return make_error_code(client_errc::invalid_config);
  }
  if (seconds > 0) per_host = std::chrono::seconds(std::max(seconds, 2));
  return {};
}

}  // namespace

error_code Connection::Impl::connect_error() {
  const std::string message = trimmed(conn != nullptr ? PQerrorMessage(conn) : "out of memory");
  std::string where = target();
  close(CloseMode::immediate);
  auto classify = [&](std::string_view sqlstate, std::string hint) {
    last_error = Diagnostics{.sqlstate = std::string(sqlstate),
                             .severity = "FATAL",
                             .message = "could not connect to " + where + ": " + message,
                             .hint = std::move(hint)};
    return make_sqlstate_error(sqlstate);
  };
  // A conninfo value libpq cannot accept (caught before any connect): a mistake to fix.
  if ((message.starts_with("invalid ") && contains(message, " value")) ||
      message.starts_with("could not match ")) {
    return fail(client_errc::invalid_config, "could not connect to " + where + ": " + message, {},
                "fix the conninfo (DATABASE_URL): see libpq's connection parameters for the "
                "values each keyword takes");
  }
  if (contains(message, "password authentication failed")) {
    return classify("28P01", "check the user name and password (conninfo or PGPASSWORD)");
  }
  // The server's words begin after "FATAL:" (before it, libpq names the server, whose host or
  // socket path may hold any word): 'role "database_reader" does not exist' is about a role.
  std::string_view said = message;
  if (const std::size_t fatal = said.find("FATAL:"); fatal != std::string_view::npos) {
    said.remove_prefix(fatal + 6);
    while (said.starts_with(' ')) said.remove_prefix(1);
  }
  if (said.starts_with("database \"") && contains(said, "does not exist")) {
    return classify("3D000", "check the database name, or create the database");
  }
  if (said.starts_with("role \"") && contains(said, "does not exist")) {
    return classify("28000", "check the user name, or create the role");
  }
  // A setting sent at start-up (ConnectOptions::session_settings, the conninfo's `options`,
  // PGOPTIONS) that the server refuses: a mistake to fix, which retrying does not cure.
  const auto setting_refused = [&](std::string_view sqlstate) {
    return classify(sqlstate,
                    "a setting sent at start-up was refused: fix or remove it "
                    "(ConnectOptions::session_settings, PoolConfig::guards, the conninfo's "
                    "options, PGOPTIONS)");
  };
  if (said.starts_with("invalid value for parameter \"")) return setting_refused("22023");
  if (said.starts_with("unrecognized configuration parameter \"")) {
    return setting_refused("42704");
  }
  if (said.starts_with("permission denied to set parameter \"")) return setting_refused("42501");
  if (said.starts_with("parameter \"") && contains(said, "cannot be changed")) {
    return setting_refused("55P02");
  }
  if (contains(message, "too many clients") || contains(message, "remaining connection slots")) {
    return classify("53300",
                    "the server is at max_connections: close idle connections elsewhere, lower "
                    "pool sizes, or raise max_connections; retry with backoff");
  }
  if (contains(message, "the database system is")) {
    return classify("57P03", "the server is starting up or shutting down; retry shortly");
  }
  if (contains(message, "pg_hba.conf")) {
    return classify("28000",
                    contains(message, "no encryption")
                        ? "no pg_hba.conf line lets this plain connection in; if the server takes "
                          "only TLS connections from here, use sslmode=require (or verify-full "
                          "with sslrootcert)"
                        : "the server's pg_hba.conf does not let this user, database and address "
                          "in: ask its administrator, or connect as a user it lets in");
  }
  if (contains(message, "no password supplied")) {
    return classify("28P01",
                    "the server wants a password: put it in the conninfo, PGPASSWORD or "
                    "~/.pgpass");
  }
  if (auto hint = tls_hint(message); !hint.empty()) {
    return fail(client_errc::tls_failed, "could not connect to " + where + ": " + message, {},
                std::move(hint));
  }
  if (contains(message, "SSL")) {
    // Any other TLS failure (the server closing mid-handshake while it restarts, a reset): a
    // connection failure that may pass, retried like one.
    return fail(client_errc::connect_failed, "could not connect to " + where + ": " + message, {},
                "the TLS connection failed on the way; if it persists, check sslmode and the "
                "server's ssl settings");
  }
  if (contains(message, "unsupported startup parameter")) {
    return fail(client_errc::invalid_config, "could not connect to " + where + ": " + message, {},
                options.pooler == Pooler::transaction
                    ? "a pooler (PgBouncer) refuses the `options` the conninfo or PGOPTIONS "
                      "carries: remove them, and set what they set on the role instead (ALTER "
                      "ROLE ... SET)"
                    : "this is a pooler (PgBouncer) that refuses the startup options pgrt sends: "
                      "set PGRT_POOLER=transaction (ConnectOptions::pooler) for a transaction-mode "
                      "pooler");
  }
  if (contains(message, "could not translate host name")) {
    return fail(client_errc::name_resolution, "could not connect to " + where + ": " + message, {},
                "check the host name and DNS");
  }
  return fail(client_errc::connect_failed, "could not connect to " + where + ": " + message, {},
              "check that the server is running and accepts connections on that host and port "
              "(listen_addresses, pg_hba.conf, firewalls)");
}

// Resolves host names with asio's resolver (a background thread), so that libpq, which would
// call getaddrinfo() on the event loop, gets numeric addresses in `hostaddr`. A name with several
// addresses becomes several host entries, one per address, tried in order as libpq would.
asio::awaitable<error_code> Connection::Impl::resolve_hosts(const ParsedConninfo& parsed,
                                                            std::vector<Target>& targets) {
  const std::string hosts = parsed.get("host", "PGHOST");
  if (hosts.empty() || !parsed.get("hostaddr", "PGHOSTADDR").empty()) co_return error_code{};
  const auto host_list = split_hosts(hosts);
  const auto port_list = split_hosts(parsed.get("port", "PGPORT"));
  const bool port_per_host = port_list.size() > 1;
  if (port_per_host && port_list.size() != host_list.size()) {
    co_return fail(client_errc::invalid_config,
                   "could not match " + std::to_string(port_list.size()) + " port numbers to " +
                       std::to_string(host_list.size()) + " hosts",
                   {}, "give one port for every host, or a single port for all of them");
  }
  std::vector<Target> resolved;
  std::string unresolved;  // the last name that did not resolve, and why
  // asio's resolver ignores per-operation cancellation, and its cancel() does not stop a
  // getaddrinfo() already running: the coroutine waits on a timer that the lookup's answer (or a
  // cancellation: connect_timeout, the caller's) ends. A lookup left behind ends on the resolver's
  // thread, and its answer is dropped.
  struct Lookup {
    explicit Lookup(const asio::any_io_executor& executor)
        : resolver(executor), answered(executor, asio::steady_timer::time_point::max()) {}
    asio::ip::tcp::resolver resolver;
    asio::steady_timer answered;
    bool done = false;
    error_code error;
    asio::ip::tcp::resolver::results_type results;
  };
  const auto here = co_await asio::this_coro::executor;  // (the answer comes there)
  auto append = [&](const std::string& host, const std::string& address, std::size_t index) {
    resolved.push_back(
        Target{.host = host, .hostaddr = address, .port = port_per_host ? port_list[index] : ""});
  };
  for (std::size_t index = 0; index < host_list.size(); ++index) {
    const std::string& host = host_list[index];
    const bool is_path = !host.empty() && (host.front() == '/' || host.front() == '@');
    error_code numeric_error;
    if (!host.empty() && !is_path) asio::ip::make_address(host, numeric_error);
    if (host.empty() || is_path || !numeric_error) {
      append(host, "", index);
      continue;
    }
    auto lookup = std::make_shared<Lookup>(executor);
    lookup->resolver.async_resolve(
        host, "",
        asio::bind_executor(
            here, [lookup](error_code error, asio::ip::tcp::resolver::results_type results) {
              lookup->error = error;
              lookup->results = std::move(results);
              lookup->done = true;
              lookup->answered.cancel();
            }));
    if (!lookup->done) (void)co_await lookup->answered.async_wait(no_throw);
    if (!lookup->done) {
      lookup->resolver.cancel();
      co_return fail(client_errc::cancelled,
                     "resolving host name \"" + host + "\" was cancelled before it answered");
    }
    const error_code error = lookup->error;
    const auto& results = lookup->results;
    if (error) {
      // As libpq does: a name that does not resolve is skipped, and the next host tried (a
      // conninfo may still list a decommissioned replica); only if none is left does it fail.
      unresolved = "could not resolve host name \"" + host + "\": " + error.message();
      if (host_list.size() > 1) {
        spdlog::warn("pgrt: {}; trying the other hosts of the conninfo", unresolved);
      }
      continue;
    }
    for (const auto& entry : results) append(host, entry.endpoint().address().to_string(), index);
  }
  if (resolved.empty()) {
    co_return fail(client_errc::name_resolution, unresolved, {}, "check the host name and DNS");
  }
  // An empty host (libpq's default socket directory) cannot be named to libpq on its own (it
  // ignores an empty value): then libpq gets the whole list and tries the hosts itself.
  if (std::any_of(resolved.begin(), resolved.end(),
                  [](const Target& target) { return target.host.empty(); })) {
    Target all;
    for (std::size_t index = 0; index < resolved.size(); ++index) {
      const std::string separator = index == 0 ? "" : ",";
      all.host += separator + resolved[index].host;
      all.hostaddr += separator + resolved[index].hostaddr;
      if (port_per_host) all.port += separator + resolved[index].port;
    }
    resolved.assign(1, std::move(all));
  }
  targets = std::move(resolved);
  co_return error_code{};
}

asio::awaitable<error_code> Connection::Impl::connect_once(
    const std::vector<std::pair<std::string, std::string>>& params, const Target* host,
    const char* session_attrs, std::optional<std::chrono::milliseconds> limit) {
  std::vector<const char*> keywords;
  std::vector<const char*> values;
  for (const auto& [keyword, value] : params) {
    keywords.push_back(keyword.c_str());
    values.push_back(value.c_str());
  }
  // Later keywords override the conninfo's (expand_dbname); libpq ignores empty values.
  if (host != nullptr) {
    keywords.insert(keywords.end(), {"host", "hostaddr", "port"});
    values.insert(values.end(), {host->host.c_str(), host->hostaddr.c_str(), host->port.c_str()});
  }
  if (session_attrs != nullptr) {
    keywords.push_back("target_session_attrs");
    values.push_back(session_attrs);
  }
  keywords.push_back(nullptr);
  values.push_back(nullptr);

  close(CloseMode::immediate);  // what an earlier attempt left
  conn = PQconnectStartParams(keywords.data(), values.data(), 1);
  if (conn != nullptr) PQsetNoticeReceiver(conn, log_server_notice, nullptr);
  if (conn == nullptr || PQstatus(conn) == CONNECTION_BAD) co_return connect_error();
  connecting_to = target();
  asio::steady_timer given_up(executor, asio::steady_timer::time_point::max());
  if (limit) given_up.expires_after(*limit);
  bool out_of_time = false;
  PostgresPollingStatusType polling = PGRES_POLLING_WRITING;
  while (polling != PGRES_POLLING_OK) {
    if (polling == PGRES_POLLING_FAILED) co_return connect_error();
    // libpq may open a new socket at any step (next address, next host, SSL fallback): wrap the
    // current one afresh each time.
    if (auto assign_error = watch_socket()) {
      co_return fail(client_errc::connect_failed,
                     "cannot watch the connection's socket: " + assign_error.message());
    }
    const bool reading = polling == PGRES_POLLING_READING;
    error_code error;
    if (!reading || !tls_holds_bytes()) {
      auto ready = socket.async_wait(
          reading ? asio::socket_base::wait_read : asio::socket_base::wait_write, no_throw);
      if (limit) {
        using namespace asio::experimental::awaitable_operators;
        auto outcome =
            co_await detail::serialized(std::move(ready) || given_up.async_wait(no_throw));
        if (outcome.index() == 0) {
          std::tie(error) = std::get<0>(outcome);
        } else {
          std::tie(error) = std::get<1>(outcome);
          out_of_time = !error;
          if (out_of_time) error = asio::error::timed_out;
        }
      } else {
        std::tie(error) = co_await std::move(ready);
      }
    }
    if (error) {
      std::string where = target();
      close(CloseMode::immediate);
      if (out_of_time) {
        co_return fail(client_errc::timeout, "could not connect to " + where +
                                                 ": no answer within " +
                                                 std::to_string(limit->count()) + " ms");
      }
      co_return fail(client_errc::cancelled, "connecting to " + where + " was cancelled");
    }
    polling = PQconnectPoll(conn);
    connecting_to = target();  // (libpq may have moved on to its next address)
  }
  if (PQsetnonblocking(conn, 1) != 0) co_return connect_error();
  co_return error_code{};
}

asio::awaitable<error_code> Connection::Impl::connect() {
  const auto connect_deadline = std::chrono::steady_clock::now() + options.connect_timeout;
  const ParsedConninfo parsed = parse_conninfo(options.conninfo);
  if (!parsed.valid || url_credentials_misread(options.conninfo)) {
    // Redacted, whatever keywords it holds: the raw text may carry a password under any name.
    co_return fail(client_errc::invalid_config, conninfo_problem(options.conninfo), {},
                   "use a URL (postgresql://user@host:5432/db) or key=value pairs "
                   "(host=... dbname=...)");
  }
  std::vector<Target> targets;
  if (auto error = co_await resolve_hosts(parsed, targets)) co_return error;
  std::optional<std::chrono::milliseconds> per_host_limit;
  if (auto error = read_connect_timeout(parsed, per_host_limit, last_error)) co_return error;

  std::vector<std::pair<std::string, std::string>> params;
  if (!options.conninfo.empty()) params.emplace_back("dbname", options.conninfo);
  std::string startup_options = parsed.get("options", "PGOPTIONS");
  bool datestyle_given = false;
  for (const auto& [name, value] : options.session_settings) {
    std::string lowered;
    for (char c : name) lowered += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    datestyle_given = datestyle_given || lowered == "datestyle";
    startup_options += " -c " + escape_option_value(name) + "=" + escape_option_value(value);
  }
  if (options.pooler == Pooler::transaction) {
    // A transaction pooler keeps no per-client session settings (PgBouncer refuses `options`).
    if (!options.session_settings.empty()) {
      co_return fail(client_errc::invalid_config,
                     "session settings (" + options.session_settings.front().first +
                         ", ...) cannot be kept behind a transaction pooler (ConnectOptions::"
                         "pooler): each transaction may run in another server session",
                     {},
                     "set them on the role or database instead (ALTER ROLE app SET ...), or "
                     "connect to the server directly");
    }
    if (!startup_options.empty()) params.emplace_back("options", startup_options);
  } else {
    if (!datestyle_given) startup_options += " -c DateStyle=ISO";
    params.emplace_back("options", startup_options);
  }
  if (!options.application_name.empty()) {
    params.emplace_back("application_name", options.application_name);
  }
  if (options.keepalives) {
    params.emplace_back("keepalives", "1");
    params.emplace_back("keepalives_idle", std::to_string(options.keepalives->idle.count()));
    params.emplace_back("keepalives_interval",
                        std::to_string(options.keepalives->interval.count()));
    params.emplace_back("keepalives_count", std::to_string(options.keepalives->count));
  }
  if (options.tcp_user_timeout.count() > 0) {
    params.emplace_back("tcp_user_timeout", std::to_string(options.tcp_user_timeout.count()));
  }

  // Several hosts (or addresses): pgrt tries them one by one, so that each has a deadline of its
  // own (libpq's asynchronous API has none per host: a host that takes the connection and never
  // answers would hold the whole connect). prefer-standby, as libpq does it: every host as a
  // standby first, then every host as any server.
  struct Attempt {
    const Target* target;
    const char* session_attrs;  // nullptr: the conninfo's target_session_attrs
  };
  std::vector<Attempt> attempts;
  const bool prefer_standby =
      parsed.get("target_session_attrs", "PGTARGETSESSIONATTRS") == "prefer-standby";
  if (targets.size() <= 1) {
    attempts.push_back({targets.empty() ? nullptr : &targets.front(), nullptr});
  } else {
    for (const Target& one : targets) {
      attempts.push_back({&one, prefer_standby ? "standby" : nullptr});
    }
    if (prefer_standby) {
      for (const Target& one : targets) attempts.push_back({&one, "any"});
    }
  }
  failed_hosts.clear();
  for (std::size_t index = 0; index < attempts.size(); ++index) {
    const bool last = index + 1 == attempts.size();
    // The last attempt runs until the whole connect's deadline (try_connect()'s timer); each one
    // before it gets the conninfo's connect_timeout (per host, as libpq counts it) or an equal
    // share of the time left.
    std::optional<std::chrono::milliseconds> limit;
    if (!last) {
      const auto left = std::max(std::chrono::milliseconds(1),
                                 std::chrono::duration_cast<std::chrono::milliseconds>(
                                     connect_deadline - std::chrono::steady_clock::now()));
      const auto share = left / static_cast<std::int64_t>(attempts.size() - index);
      limit = per_host_limit ? std::min(*per_host_limit, left) : share;
    }
    const error_code error =
        co_await connect_once(params, attempts[index].target, attempts[index].session_attrs, limit);
    if (!error) {
      failed_hosts.clear();
      break;
    }
    // A cancellation, or a mistake every host would answer alike (a password, a database name,
    // a setting, the conninfo itself), ends the connect, as libpq ends it once a server has
    // answered; a host that is down, full, starting up, read-only or silent is passed over.
    static constexpr std::array<std::string_view, 7> mistakes{"28P01", "28000", "3D000", "22023",
                                                              "42704", "42501", "55P02"};
    const bool same_everywhere =
        error == client_errc::cancelled || error == client_errc::invalid_config ||
        std::find(mistakes.begin(), mistakes.end(), last_error.sqlstate) != mistakes.end();
    if (last || same_everywhere) {
      if (!failed_hosts.empty()) last_error.message += " (before it: " + failed_hosts + ")";
      co_return error;
    }
    // A server of the wrong kind (target_session_attrs) is the multi-host conninfo at work; a
    // host down or silent is news for its operators.
    const std::string_view said = last_error.message;
    if (contains(said, "hot standby mode") || contains(said, "session is read-only") ||
        contains(said, "session is not read-only")) {
      spdlog::debug("pgrt: {}; trying the next host", said);
    } else {
      spdlog::warn("pgrt: {}; trying the next host", said);
    }
    failed_hosts += (failed_hosts.empty() ? "" : "; ") + last_error.message;
  }
  // Dates are read in ISO format. pgrt asks for it at connect, but behind a transaction pooler it
  // cannot, and a pooler may drop the startup options it was sent: check what the server says.
  // (A DateStyle the caller chose in session_settings is theirs to read.)
  if (const char* datestyle = PQparameterStatus(conn, "DateStyle");
      !datestyle_given && datestyle != nullptr && !std::string_view(datestyle).starts_with("ISO")) {
    const std::string where = target();
    const std::string style = datestyle;
    close(CloseMode::immediate);
    co_return fail(client_errc::invalid_config,
                   "the server at " + where + " has DateStyle '" + style +
                       "' (a pooler in between may have dropped pgrt's startup options); pgrt "
                       "reads dates and times in ISO format",
                   {}, "ALTER DATABASE ... SET DateStyle = 'ISO' (or ALTER ROLE)");
  }
  unnamed_statements = options.pooler == Pooler::transaction;
  if (auto assign_error = watch_socket()) {
    close(CloseMode::immediate);
    co_return fail(client_errc::connect_failed,
                   "cannot watch the connection's socket: " + assign_error.message());
  }
  arm_interrupt();
  co_return error_code{};
}

}  // namespace pgrt
