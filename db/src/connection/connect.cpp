#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <spdlog/spdlog.h>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include "conninfo.hpp"
#include "impl.hpp"
#include "name_lookup.hpp"

namespace pgrt {

std::string Connection::Impl::target() const {
  if (conn == nullptr) return connecting_to.empty() ? "the server" : connecting_to;
  std::string host = PQhost(conn) != nullptr ? PQhost(conn) : "";
  std::string port = PQport(conn) != nullptr ? PQport(conn) : "";
  // A name tried at one of its addresses: which one (an operator looks for the silent address).
  if (const char* address = PQhostaddr(conn); address != nullptr && *address != '\0' &&
                                              !host.empty() && host.front() != '/' &&
                                              host != address) {
    host += " (" + std::string(address) + ")";
  }
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

// An encrypted client key (sslkey): libpq hands OpenSSL no pass phrase callback unless
// sslpassword is given or a hook is set, and OpenSSL's own then prompts on the terminal or reads
// standard input inside PQconnectPoll(), blocking the io_context past connect_timeout. pgrt's
// hook, installed once for the process before the first connect, answers with the connection's
// sslpassword, or with none (the key then fails to load: tls_failed), never prompting. A hook the
// application installed before is kept.
void install_key_pass_hook() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    if (PQgetSSLKeyPassHook_OpenSSL() == nullptr) {
      // libpq's default hook copies the connection's sslpassword, or gives an empty one.
      PQsetSSLKeyPassHook_OpenSSL(PQdefaultSSLKeyPassHook_OpenSSL);
    }
  });
}

// libpq's words in its connect error, one per line, without the "connection to server at
// \"host\" (address), port 5432 failed: " (or "on socket \"path\"") that names the server: a
// host name or socket path may hold any word.
std::string libpq_words(std::string_view message) {
  constexpr std::string_view failed = "failed: ";
  std::string words;
  while (!message.empty()) {
    const std::size_t line_end = message.find('\n');
    std::string_view line = message.substr(0, line_end);
    message.remove_prefix(line_end == std::string_view::npos ? message.size() : line_end + 1);
    if (line.starts_with("connection to server")) {
      const std::size_t at = line.rfind(failed);
      line.remove_prefix(at == std::string_view::npos ? line.size() : at + failed.size());
    }
    words.append(line);
    words += '\n';
  }
  return words;
}

// What to do about a failed TLS set-up, from libpq's message; "" when it is not about TLS.
// (A TLS connection that breaks on the way, "SSL SYSCALL error", is a network failure.)
std::string tls_hint(std::string_view message) {
  // A fatal alert the server ends the handshake with: it refuses this client's certificate or
  // TLS settings, which no wait cures.
  const std::string said = libpq_words(message);
  for (const std::string_view alert : {"alert unknown ca", "alert bad certificate",
                                       "alert certificate required", "alert certificate unknown"}) {
    if (contains(said, alert)) {
      return "the server refused the client certificate: it must be signed by a CA in the "
             "server's ssl_ca_file (and be valid now), and given (sslcert and sslkey, default "
             "~/.postgresql/postgresql.crt and .key) where the server requires one";
    }
  }
  for (const std::string_view alert :
       {"alert handshake failure", "alert access denied", "alert decrypt error"}) {
    if (contains(said, alert)) {
      return "the server refused the TLS handshake: compare the client's TLS settings (sslcert, "
             "sslkey, ssl_min_protocol_version) with the server's (ssl_ca_file, ssl_ciphers, "
             "pg_hba.conf's clientcert)";
    }
  }
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
  if (contains(message, "could not load private key file")) {
    return "the client key (sslkey) could not be loaded: if it is encrypted, give its pass phrase "
           "as sslpassword (pgrt never prompts for one); otherwise check sslkey's path and that "
           "it matches sslcert";
  }
  if (contains(message, "certificate") || contains(message, "private key")) {
    return "TLS could not be set up: check sslrootcert, sslcert and sslkey, and the server's "
           "ssl settings";
  }
  return {};
}

// A connection setting libpq refuses before it connects (libpq 15's messages, fe-connect.c), as
// the setting it names and a hint: a mistake to fix, which retrying does not cure. Empty: none.
// libpq's own words are the message itself, or follow "connection to server ... failed: " when
// the socket was already made (the keepalives_* and tcp_user_timeout values are read then); a
// server's words (after "FATAL:") are never taken for them.
struct RefusedSetting {
  std::string setting;
  std::string hint;
};
std::optional<RefusedSetting> refused_setting(std::string_view message) {
  const std::string_view ours = message.substr(0, message.find("FATAL:"));
  const auto reason = [&](std::string_view prefix) -> std::optional<std::string_view> {
    if (ours.starts_with(prefix)) return ours;
    const std::string after_failed = "failed: " + std::string(prefix);
    if (const std::size_t at = ours.find(after_failed); at != std::string_view::npos) {
      return ours.substr(at + 8);
    }
    return std::nullopt;
  };
  // The text between the quotes after `after` in `text` ("" when there are none).
  const auto quoted_after = [](std::string_view text, std::string_view after) {
    const std::size_t at = text.find(after);
    if (at == std::string_view::npos) return std::string();
    const std::size_t start = at + after.size();
    const std::size_t end = text.find('"', start);
    return std::string(text.substr(start, end == std::string_view::npos ? 0 : end - start));
  };
  if (reason("invalid port number: \"")) {
    return RefusedSetting{"port",
                          "port takes a number from 1 to 65535 (in a URL: host:port, "
                          "postgresql://user@host:5432/db)"};
  }
  if (auto text = reason("invalid integer value \"")) {
    const std::string name = quoted_after(*text, "for connection option \"");
    return RefusedSetting{name.empty() ? "an integer setting" : name,
                          (name.empty() ? std::string("it") : name) +
                              " takes a whole number (keepalives: 0 or 1; keepalives_idle, "
                              "keepalives_interval: seconds; tcp_user_timeout: milliseconds)"};
  }
  // A value libpq takes as a number, which the kernel refuses (keepalives_idle=-5). Only
  // EINVAL: another errno (no memory, a closed socket) is no setting's fault.
  if (auto text = reason("setsockopt("); text && contains(*text, ") failed: Invalid argument")) {
    const std::string option = std::string(text->substr(11, text->find(')') - 11));
    const std::string name = option == "TCP_KEEPIDLE"       ? "keepalives_idle"
                             : option == "TCP_KEEPINTVL"    ? "keepalives_interval"
                             : option == "TCP_KEEPCNT"      ? "keepalives_count"
                             : option == "TCP_USER_TIMEOUT" ? "tcp_user_timeout"
                             : option == "SO_KEEPALIVE"     ? "keepalives"
                                                            : "";
    if (!name.empty()) {
      return RefusedSetting{name,
                            "the system refuses its value: give a positive whole number (or "
                            "leave it out for the system's default)"};
    }
  }
  if (reason("could not parse network address \"")) {
    return RefusedSetting{"hostaddr",
                          "hostaddr takes numeric IP addresses (192.0.2.10, 2001:db8::1), one "
                          "for each host; give a host name as host= instead"};
  }
  if (reason("Unix-domain socket path \"")) {
    return RefusedSetting{"host",
                          "the socket directory's path is too long for a Unix-domain socket: "
                          "use a shorter directory (or a symbolic link to it) as host="};
  }
  if (reason("definition of service \"")) {
    return RefusedSetting{"service",
                          "no service file defines this service: check its name, and the file "
                          "(PGSERVICEFILE, else ~/.pg_service.conf, then pg_service.conf in "
                          "PGSYSCONFDIR), or give host=, port=, dbname= instead of service="};
  }
  if (reason("service file \"")) {
    return RefusedSetting{"PGSERVICEFILE",
                          "the service file PGSERVICEFILE names does not exist: correct the path, "
                          "or unset PGSERVICEFILE"};
  }
  if (reason("syntax error in service file \"") || reason("nested service specifications ") ||
      (reason("line ") && contains(ours, " too long in service file \""))) {
    return RefusedSetting{"service",
                          "the service file named in the message cannot be read as one: fix the "
                          "line it names (lines are [name] or keyword=value)"};
  }
  if (reason("invalid SSL protocol version range")) {
    return RefusedSetting{"ssl_min_protocol_version",
                          "ssl_min_protocol_version is above ssl_max_protocol_version: give a "
                          "range such as TLSv1.2 to TLSv1.3"};
  }
  if (reason("invalid value \"") && contains(ours, "SSL protocol version")) {
    return RefusedSetting{
        contains(ours, "maximum") ? "ssl_max_protocol_version" : "ssl_min_protocol_version",
        "it takes TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3"};
  }
  if (reason("could not match ")) {
    return RefusedSetting{contains(ours, "hostaddr") ? "hostaddr" : "port",
                          "give one value for every host, or a single one for all of them"};
  }
  // "invalid sslmode value: \"x\"" and the like (sslmode, gssencmode, channel_binding,
  // target_session_attrs): the setting is the word between "invalid " and " value".
  if (auto text = reason("invalid ")) {
    const std::size_t value = text->find(" value: \"");
    if (value != std::string_view::npos && value > 8 &&
        text->substr(8, value - 8).find(' ') == std::string_view::npos) {
      return RefusedSetting{std::string(text->substr(8, value - 8)),
                            "see libpq's connection parameters for the values it takes"};
    }
  }
  if (auto text = reason("invalid connection option \"")) {
    return RefusedSetting{quoted_after(*text, "option \""),
                          "libpq knows no such keyword: check its spelling, or remove it"};
  }
  return std::nullopt;
}

// libpq's connect_timeout keyword (seconds, per host; 0, negative or absent: none; 1 counts as
// 2), which its asynchronous API leaves to the caller. Read as libpq reads it (strtol, blanks
// around it allowed).
error_code read_connect_timeout(const ParsedConninfo& parsed,
                                std::optional<std::chrono::milliseconds>& per_host,
                                Diagnostics& said) {
  const std::string text = parsed.get("connect_timeout", "PGCONNECT_TIMEOUT");
  if (text.empty()) return {};
  errno = 0;
  char* end = nullptr;
  const long seconds = std::strtol(text.c_str(), &end, 10);
  while (end != nullptr && *end != '\0' && std::isspace(static_cast<unsigned char>(*end)) != 0) {
    ++end;
  }
  if (errno != 0 || end == text.c_str() || *end != '\0' || seconds > 1'000'000) {
    said = Diagnostics{.message = "connect_timeout \"" + text +
                                  "\" (from the conninfo or PGCONNECT_TIMEOUT) is not a whole "
                                  "number of seconds",
                       .hint =
                           "give it in seconds (connect_timeout=5), or leave it out: "
                           "ConnectOptions::connect_timeout bounds the whole connect"};
    return make_error_code(client_errc::invalid_config);
  }
  if (seconds > 0) per_host = std::chrono::seconds(std::max<long>(seconds, 2));
  return {};
}

// load_balance_hosts=random's order: one engine per thread (each pool's connects run on its
// executor's threads), seeded from the system's entropy.
std::mt19937& shuffler() {
  thread_local std::mt19937 engine{std::random_device{}()};
  return engine;
}

}  // namespace

error_code Connection::Impl::connect_error() {
  const std::string message = trimmed(conn != nullptr ? PQerrorMessage(conn) : "out of memory");
  std::string where = target();
  close(CloseMode::immediate, Lingering::keep);  // (earlier attempts' stay for close_and_wait())
  auto classify = [&](std::string_view sqlstate, std::string hint) {
    last_error = Diagnostics{.sqlstate = std::string(sqlstate),
                             .severity = "FATAL",
                             .message = "could not connect to " + where + ": " + message,
                             .hint = std::move(hint)};
    return make_sqlstate_error(sqlstate);
  };
  // A conninfo value libpq cannot accept (caught before any connect, or as the socket is set
  // up): a mistake to fix, not a server that is down.
  if (auto refused = refused_setting(message)) {
    // (Refused before a host was taken up, the target names none: ":" and empty names.)
    return fail(client_errc::invalid_config,
                "could not connect" + (where.starts_with(':') ? "" : " to " + where) +
                    ": the setting " + refused->setting + " is not valid (libpq: " + message + ")",
                {},
                refused->hint +
                    "; fix it in the conninfo (DATABASE_URL) or in the PG* "
                    "environment variable it came from");
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
  // The limit of a role or a database (ALTER ROLE / DATABASE ... CONNECTION LIMIT): the same
  // SQLSTATE, and the same backpressure, as a server that is full.
  if (said.starts_with("too many connections for role \"") ||
      said.starts_with("too many connections for database \"")) {
    return classify("53300",
                    "the role's or the database's CONNECTION LIMIT is reached: close idle "
                    "connections elsewhere, lower pool sizes, or raise the limit (ALTER ROLE / "
                    "ALTER DATABASE ... CONNECTION LIMIT); retry with backoff");
  }
  // Refusals of this user that every host would answer alike: mistakes to fix, not outages.
  if (said.starts_with("role \"") && contains(said, "is not permitted to log in")) {
    return classify("28000",
                    "the role may not log in: ALTER ROLE ... LOGIN, or connect as "
                    "another user");
  }
  if (said.starts_with("permission denied for database \"")) {
    return classify("42501",
                    "the user lacks the CONNECT privilege on the database: GRANT "
                    "CONNECT ON DATABASE ... TO the user, or connect to another one");
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
                : options.pooler == Pooler::session
                    ? "a session-mode pooler (PgBouncer) refuses the `options` start-up parameter "
                      "that carries pgrt's session settings (DateStyle, the session guards' "
                      "server side, ConnectOptions::session_settings): add options to its "
                      "ignore_startup_parameters, and set what they set on the role (ALTER ROLE "
                      "... SET), as PgBouncer then drops them and they are not applied; or "
                      "connect to the server directly"
                    : "this is a pooler (PgBouncer) that refuses the startup options pgrt sends: "
                      "set PGRT_POOLER=transaction (ConnectOptions::pooler) for a transaction-mode "
                      "pooler; for a session-mode one, PGRT_POOLER=session and options in its "
                      "ignore_startup_parameters (pgrt's start-up settings are then not applied: "
                      "set them on the role, ALTER ROLE ... SET)");
  }
  // libpq's target_session_attrs at work: a server of the wrong kind. Passing (a failover may be
  // under way), retried like an unreachable one, but the reachability hint would mislead.
  if (contains(said, "hot standby mode") || contains(said, "session is read-only") ||
      contains(said, "session is not read-only")) {
    return fail(client_errc::connect_failed, "could not connect to " + where + ": " + message, {},
                "this server is not of the kind target_session_attrs asks for (read-write: one "
                "that takes writes, neither a standby nor default_transaction_read_only on; "
                "primary: not a standby; read-only and standby: the reverse): list a server of "
                "that kind in host=, wait for the failover to end, or check the server's "
                "default_transaction_read_only");
  }
  if (contains(message, "could not translate host name")) {
    return fail(client_errc::name_resolution, "could not connect to " + where + ": " + message, {},
                "check the host name and DNS");
  }
  return fail(client_errc::connect_failed, "could not connect to " + where + ": " + message, {},
              "check that the server is running and accepts connections on that host and port "
              "(listen_addresses, pg_hba.conf, firewalls)");
}

// The conninfo's hosts, each with its port, for pgrt to try one by one (connect()). None when
// libpq is to read the hosts itself: no host given (libpq's defaults), hostaddr given, a service
// file in use (its keywords rank above the environment's, which parse_conninfo() cannot tell),
// or an empty host in the list (libpq's default socket directory, which an empty value cannot
// name to libpq on its own).
error_code Connection::Impl::host_entries(const ParsedConninfo& parsed,
                                          std::vector<Target>& entries) {
  const std::string hosts = parsed.get("host", "PGHOST");
  if (hosts.empty() || !parsed.get("hostaddr", "PGHOSTADDR").empty() ||
      !parsed.get("service", "PGSERVICE").empty()) {
    return {};
  }
  const auto host_list = split_hosts(hosts);
  const auto port_list = split_hosts(parsed.get("port", "PGPORT"));
  const bool port_per_host = port_list.size() > 1;
  if (port_per_host && port_list.size() != host_list.size()) {
    return fail(client_errc::invalid_config,
                "could not match " + std::to_string(port_list.size()) + " port numbers to " +
                    std::to_string(host_list.size()) + " hosts",
                {}, "give one port for every host, or a single port for all of them");
  }
  if (std::any_of(host_list.begin(), host_list.end(),
                  [](const std::string& host) { return host.empty(); })) {
    return {};
  }
  for (std::size_t index = 0; index < host_list.size(); ++index) {
    // An empty port in a list is libpq's default port (as a URL's "host1,host2:5433" gives).
    std::string port = port_per_host ? port_list[index] : "";
    if (port_per_host && port.empty()) port = "5432";
    entries.push_back(Target{.host = host_list[index], .hostaddr = {}, .port = std::move(port)});
  }
  return {};
}

// Resolves a host name on a thread of its own (name_lookup.hpp: a lookup that hangs holds up no
// other name), so that libpq, which would call getaddrinfo() on the event loop, gets numeric
// addresses in `hostaddr`, tried in order as libpq would. Gives up at `deadline` (none: until
// cancelled); a lookup left behind ends on its thread, and its answer is dropped.
asio::awaitable<error_code> Connection::Impl::resolve_host(
    const std::string& host, std::optional<std::chrono::steady_clock::time_point> deadline,
    std::vector<std::string>& addresses) {
  detail::HostAddresses answer;
  detail::LookupEnd end = detail::LookupEnd::cancelled;
  std::string unable;
  try {
    end = co_await detail::look_up_host(host, deadline, answer);
  } catch (const std::exception& error) {  // (no thread, no descriptor, no memory)
    unable = error.what();
  }
  if (!unable.empty()) {
    co_return fail(client_errc::name_resolution,
                   "could not start resolving host name \"" + host + "\": " + unable, {},
                   "the process is out of threads or file descriptors: check its limits");
  }
  if (end == detail::LookupEnd::timed_out) {
    co_return fail(client_errc::name_resolution,
                   "resolving host name \"" + host + "\" did not answer within its time", {},
                   "check the host name and DNS (a resolver that does not answer)");
  }
  if (end == detail::LookupEnd::cancelled) {
    co_return fail(client_errc::cancelled,
                   "resolving host name \"" + host + "\" was cancelled before it answered");
  }
  if (!answer.error.empty()) {
    co_return fail(client_errc::name_resolution,
                   "could not resolve host name \"" + host + "\": " + answer.error, {},
                   "check the host name and DNS");
  }
  if (answer.addresses.empty()) {
    co_return fail(client_errc::name_resolution,
                   "host name \"" + host + "\" resolved to no address", {},
                   "check the host name and DNS");
  }
  addresses = std::move(answer.addresses);
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

  close(CloseMode::immediate, Lingering::keep);  // what an earlier attempt left
  // (What an earlier host's connection was, lost or behind a pooler, is not this one's.)
  broken = false;
  unnamed_statements = options.pooler == Pooler::transaction;
  first_statement_refused = false;
  install_key_pass_hook();
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
      // Out of this host's time: abandoned (a backend in start-up may exist, and is watched until
      // it ends). Cancelled (try_connect()'s timeout, or its caller): left to try_connect().
      if (out_of_time) abandon_connect();
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
  if (host_holds_credentials(parsed.get("host", "PGHOST"))) {
    co_return fail(client_errc::invalid_config,
                   "the host (conninfo host=, or PGHOST) looks like a connection URL or holds a "
                   "user's credentials (it has \"://\" or an '@'); not shown, as it may hold a "
                   "password",
                   {},
                   "give the URL as the whole conninfo (DATABASE_URL), or only the host name in "
                   "host= and PGHOST");
  }
  // The same slip with the database or user name, the host address or the service name: libpq
  // expands only the conninfo itself, so a conninfo there would go to the server as a name (or to
  // libpq's own errors, which quote a host address or service they cannot use), and its password
  // into every error quoting it.
  for (const auto& [what, keyword, variable] : {std::tuple{"database name", "dbname", "PGDATABASE"},
                                                {"user name", "user", "PGUSER"},
                                                {"host address", "hostaddr", "PGHOSTADDR"},
                                                {"service name", "service", "PGSERVICE"}}) {
    if (!value_holds_credentials(keyword, parsed.get(keyword, variable))) continue;
    co_return fail(client_errc::invalid_config,
                   std::string("the ") + what + " (conninfo " + keyword + "=, or " + variable +
                       ") looks like a connection URL, a key=value conninfo or a user's "
                       "credentials; not shown, as it may hold a password",
                   {},
                   std::string("give the URL as the whole conninfo (DATABASE_URL), or only the ") +
                       what + " in " + keyword + "= and " + variable);
  }
  // load_balance_hosts (libpq 16's keyword) is pgrt's to apply: it tries the hosts itself, one at a
  // time, and its libpq may not know the keyword (take_load_balance_hosts()).
  const std::string balance = parsed.get("load_balance_hosts", "PGLOADBALANCEHOSTS");
  if (auto problem = load_balance_hosts_problem(balance); !problem.empty()) {
    co_return fail(client_errc::invalid_config, problem, {},
                   "set load_balance_hosts (or PGLOADBALANCEHOSTS) to random to spread the "
                   "connects over the hosts, or leave it out to try them in order");
  }
  const bool shuffle = balance == "random";
  std::vector<Target> entries;
  if (auto error = host_entries(parsed, entries)) co_return error;
  std::optional<std::chrono::milliseconds> per_host_limit;
  if (auto error = read_connect_timeout(parsed, per_host_limit, last_error)) co_return error;

  std::vector<std::pair<std::string, std::string>> params;
  std::string conninfo = options.conninfo;
  (void)take_load_balance_hosts(conninfo);  // (applied here, below)
  if (!conninfo.empty()) params.emplace_back("dbname", conninfo);
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
  // The TCP settings fill in what the conninfo leaves out: one it gives itself wins (libpq keeps
  // the last value given for a keyword, and these come after the conninfo).
  const auto unless_given = [&](const char* keyword, std::string value) {
    if (!parsed.values.contains(keyword)) params.emplace_back(keyword, std::move(value));
  };
  if (options.keepalives) {
    unless_given("keepalives", "1");
    unless_given("keepalives_idle", std::to_string(options.keepalives->idle.count()));
    unless_given("keepalives_interval", std::to_string(options.keepalives->interval.count()));
    unless_given("keepalives_count", std::to_string(options.keepalives->count));
  }
  if (options.tcp_user_timeout.count() > 0) {
    unless_given("tcp_user_timeout", std::to_string(options.tcp_user_timeout.count()));
  }

  // pgrt tries the hosts one by one (and each address of a name), so that each has a deadline of
  // its own (libpq's asynchronous API has none per host: a host that takes the connection and
  // never answers would hold the whole connect), and looks each name up only when its turn comes
  // (a name whose DNS hangs holds up none before it). prefer-standby, as libpq does it: every host
  // as a standby first, then every host as any server.
  struct Attempt {
    const Target* entry;        // nullptr: libpq tries the conninfo's hosts itself
    const char* session_attrs;  // nullptr: the conninfo's target_session_attrs
  };
  std::vector<Attempt> attempts;
  // No host at all: libpq's one default (its socket directory), bounded like a host given.
  const bool default_host_only = entries.empty() && parsed.get("host", "PGHOST").empty() &&
                                 parsed.get("hostaddr", "PGHOSTADDR").empty() &&
                                 parsed.get("service", "PGSERVICE").empty();
  if (shuffle && entries.empty() && !default_host_only) {
    // The hosts are libpq's to try (hostaddr, a service file, an empty host in the list): its own
    // load_balance_hosts, from libpq 16 on.
    if (PQlibVersion() < 160000) {
      co_return fail(client_errc::invalid_config,
                     "load_balance_hosts=random with hostaddr, a service file or an empty host in "
                     "the list needs libpq 16 or later (this program's libpq is " +
                         std::to_string(PQlibVersion() / 10000) +
                         "): pgrt spreads the connects itself only over a host list of names, "
                         "addresses and socket directories",
                     {},
                     "give the hosts in host= (names or addresses) without hostaddr or service, "
                     "or build against a newer libpq");
    }
    params.emplace_back("load_balance_hosts", "random");
  }
  // load_balance_hosts=random: the hosts in a new random order on every connect (as libpq 16
  // orders them), and below, the addresses of each name.
  if (shuffle) std::shuffle(entries.begin(), entries.end(), shuffler());
  const bool prefer_standby =
      parsed.get("target_session_attrs", "PGTARGETSESSIONATTRS") == "prefer-standby";
  if (entries.size() <= 1) {
    attempts.push_back({entries.empty() ? nullptr : &entries.front(), nullptr});
  } else {
    for (const Target& entry : entries) {
      attempts.push_back({&entry, prefer_standby ? "standby" : nullptr});
    }
    if (prefer_standby) {
      for (const Target& entry : entries) attempts.push_back({&entry, "any"});
    }
  }
  using std::chrono::milliseconds;
  using std::chrono::steady_clock;
  const auto ms_until = [](steady_clock::time_point at) {
    return std::max(milliseconds(1),
                    std::chrono::duration_cast<milliseconds>(at - steady_clock::now()));
  };
  failed_hosts.clear();
  // A mistake every host would answer alike (a password, a database name, a setting, the
  // conninfo itself) ends the connect, as libpq ends it once a server has answered; a host that is
  // down, full, starting up, of the wrong kind, silent or unresolvable is passed over.
  static constexpr std::array<std::string_view, 7> mistakes{"28P01", "28000", "3D000", "22023",
                                                            "42704", "42501", "55P02"};
  const auto ends_the_connect = [&](error_code error) {
    return error == client_errc::cancelled || error == client_errc::invalid_config ||
           std::find(mistakes.begin(), mistakes.end(), last_error.sqlstate) != mistakes.end();
  };
  const auto passed_over = [&] {
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
  };
  const auto with_earlier = [&](error_code error) {
    if (!failed_hosts.empty()) last_error.message += " (before it: " + failed_hosts + ")";
    return error;
  };
  bool connected = false;
  for (std::size_t index = 0; index < attempts.size() && !connected; ++index) {
    const bool last_host = index + 1 == attempts.size();
    // This host's time: an equal share of what is left of connect_timeout (the last host has all
    // of it: try_connect()'s timer), and no more than the conninfo's connect_timeout (per host,
    // as libpq counts it).
    const milliseconds left = ms_until(connect_deadline);
    milliseconds host_time =
        last_host ? left : left / static_cast<std::int64_t>(attempts.size() - index);
    if (per_host_limit) host_time = std::min(host_time, *per_host_limit);
    const bool bounded = !last_host || host_time < left;
    const auto host_deadline = steady_clock::now() + host_time;
    const Target* entry = attempts[index].entry;
    // The addresses to try: a name's, once resolved (within the host's time); otherwise the host
    // itself (an address, a socket directory).
    std::vector<Target> addresses;
    if (entry != nullptr) {
      error_code numeric_error;
      const bool is_path = entry->host.front() == '/' || entry->host.front() == '@';
      if (!is_path) (void)asio::ip::make_address(entry->host, numeric_error);
      if (!is_path && numeric_error) {
        std::vector<std::string> resolved;
        const auto lookup_deadline =
            bounded ? std::optional<steady_clock::time_point>(host_deadline) : std::nullopt;
        close(CloseMode::immediate, Lingering::keep);  // (target() names this host now)
        connecting_to = "host name \"" + entry->host + "\" (being resolved)";
        if (auto error = co_await resolve_host(entry->host, lookup_deadline, resolved)) {
          if (last_host || ends_the_connect(error)) co_return with_earlier(error);
          passed_over();
          continue;
        }
        if (shuffle) std::shuffle(resolved.begin(), resolved.end(), shuffler());
        for (std::string& address : resolved) {
          addresses.push_back(
              Target{.host = entry->host, .hostaddr = std::move(address), .port = entry->port});
        }
      } else {
        addresses.push_back(*entry);
      }
    }
    const std::size_t tries = std::max<std::size_t>(addresses.size(), 1);
    for (std::size_t at = 0; at < tries; ++at) {
      const bool last_address = at + 1 == tries;
      // The addresses of a name split their host's time; the last has what is left of it.
      // (libpq trying the conninfo's hosts itself: no limit but the whole connect's.)
      std::optional<milliseconds> limit;
      if (entry != nullptr && !last_address) {
        limit = ms_until(host_deadline) / static_cast<std::int64_t>(tries - at);
      } else if ((entry != nullptr || default_host_only) && bounded) {
        limit = ms_until(host_deadline);
      }
      const auto attempt_deadline =
          limit ? std::optional(steady_clock::now() + *limit) : std::nullopt;
      error_code error = co_await connect_once(params, addresses.empty() ? nullptr : &addresses[at],
                                               attempts[index].session_attrs, limit);
      // Started up, the server (or a pooler) takes its first statement within the same time: a
      // pooler in front of a server that is down completes the start-up itself and then answers
      // nothing, or gives up on the statement; that host is passed over like a silent one.
      if (!error && options.pooler == Pooler::none) {
        error = co_await notice_pooler_within(attempt_deadline);
        // A host that refused that statement (a pooler whose server is down, answering with an
        // error) is passed over while another is left to try; the last one is taken as it is.
        if (!error && first_statement_refused && !(last_host && last_address)) {
          std::string where = target();
          close(CloseMode::immediate, Lingering::keep);
          error = fail(client_errc::connect_failed,
                       "could not connect to " + where + ": it refused the first statement (" +
                           refused_first_statement + ")",
                       {},
                       "a pooler whose server is down or refuses this user answers so; the next "
                       "host is tried");
        }
      }
      if (!error) {
        connected = true;
        break;
      }
      if ((last_host && last_address) || ends_the_connect(error)) co_return with_earlier(error);
      passed_over();
    }
  }
  // Connected: what the hosts passed over said is not this connection's (lost() would take a
  // FATAL of theirs for the server's word on a later loss).
  failed_hosts.clear();
  last_error = {};
  // Dates are read in ISO format. pgrt asks for it at connect, but behind a transaction pooler it
  // cannot, and a pooler may drop the startup options it was sent: check what the server says.
  // (A DateStyle the caller chose in session_settings is theirs to read.)
  if (const char* datestyle = PQparameterStatus(conn, "DateStyle");
      !datestyle_given && datestyle != nullptr && !std::string_view(datestyle).starts_with("ISO")) {
    const std::string where = target();
    const std::string style = datestyle;
    close(CloseMode::immediate, Lingering::keep);
    co_return fail(client_errc::invalid_config,
                   "the server at " + where + " has DateStyle '" + style +
                       "' (a pooler in between may have dropped pgrt's startup options); pgrt "
                       "reads dates and times in ISO format",
                   {}, "ALTER DATABASE ... SET DateStyle = 'ISO' (or ALTER ROLE)");
  }
  if (auto assign_error = watch_socket()) {
    close(CloseMode::immediate, Lingering::keep);
    co_return fail(client_errc::connect_failed,
                   "cannot watch the connection's socket: " + assign_error.message());
  }
  // Earlier attempts given up on (a host or address that ran out of its share of the time) were
  // sent end-of-file; their backends end once their start-up is done. The pool counts this
  // connection only: until they end, the server may briefly hold one more backend per such
  // attempt (docs/pool.md, "Strict max").
  close_lingering();
  arm_interrupt();
  co_return error_code{};
}

// notice_pooler() given up at `deadline` (none: only when connect()'s caller gives up), the
// connection then closed: a host that took the connection and then answers nothing is no better
// than one that never answered.
asio::awaitable<error_code> Connection::Impl::notice_pooler_within(
    std::optional<std::chrono::steady_clock::time_point> deadline) {
  if (auto assign_error = watch_socket()) {
    close(CloseMode::immediate, Lingering::keep);
    co_return fail(client_errc::connect_failed,
                   "cannot watch the connection's socket: " + assign_error.message());
  }
  if (!deadline) co_return co_await notice_pooler();
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer given_up(executor, *deadline);
  auto outcome = co_await detail::serialized(notice_pooler() || given_up.async_wait(no_throw));
  // Its start-up done, the backend exists: abandoned (its end is watched), not closed at once.
  if (outcome.index() == 0) {
    const error_code error = std::get<0>(outcome);
    if (error && conn != nullptr) abandon_connect();
    co_return error;
  }
  std::string where = target();
  abandon_connect();
  if (std::get<0>(std::get<1>(outcome))) {
    co_return fail(client_errc::cancelled, "connecting to " + where + " was cancelled");
  }
  co_return fail(client_errc::timeout,
                 "could not connect to " + where +
                     ": it completed the start-up but did not answer a first statement in the "
                     "time left (a pooler whose server is down or unreachable?)");
}

// A pooler gives its client a BackendKeyData of its own making (PgBouncer, pgcat, Odyssey and
// Supavisor a random one: they answer its cancel requests themselves), so the backend pid libpq
// was given at start-up is not that of the server session the statements run in; a TCP proxy
// passes the server's own on. Behind a pooler nobody told pgrt about, the connection goes on as
// behind a transaction pooler from its first statement: PgBouncer before 1.21 mixes up server
// sessions when a client has more than one sync segment in flight, and an answer can then reach
// the wrong client with nothing out of step to show it (see one_segment_in_flight()), so noticing
// later, by the server forgetting named statements or by answers out of step, is too late. A
// session-mode pooler looks the same from here: it is taken for a transaction pooler too
// (Pooler::session says otherwise, and skips this). One round trip, after which the session is
// idle (a transaction pooler has given its server session back).
asio::awaitable<error_code> Connection::Impl::notice_pooler() {
  static constexpr const char* sql = "SELECT pg_catalog.pg_backend_pid()";
  if (PQsendQueryParams(conn, sql, 0, nullptr, nullptr, nullptr, nullptr, 0) == 0) {
    co_return lost(sql);
  }
  // (Not drained when cancelled: try_connect()'s time is up, or its caller's gone.)
  if (auto error = co_await flush(sql, /*can_drain=*/false)) co_return error;
  std::optional<int> session_pid;
  std::string refused;  // the server's error, if it did not answer
  for (;;) {
    PGresult* raw = nullptr;
    if (auto error = co_await next_result(raw, sql, /*can_drain=*/false)) co_return error;
    if (raw == nullptr) break;
    const Result result(raw);
    if (PQresultStatus(raw) == PGRES_TUPLES_OK && PQntuples(raw) == 1 && PQnfields(raw) == 1 &&
        !session_pid && refused.empty()) {
      const std::string_view text = PQgetvalue(raw, 0, 0);
      int pid = 0;
      const auto [end, parse_error] = std::from_chars(text.data(), text.data() + text.size(), pid);
      if (parse_error == std::errc{} && end == text.data() + text.size()) session_pid = pid;
    } else if (refused.empty()) {
      refused = trimmed(PQresultErrorMessage(raw));
      if (refused.empty()) refused = PQresStatus(PQresultStatus(raw));
    }
  }
  if (PQstatus(conn) != CONNECTION_OK) co_return lost(sql);
  const int given = PQbackendPID(conn);
  if (session_pid && *session_pid == given) co_return error_code{};
  first_statement_refused = !session_pid;
  refused_first_statement = refused;
  unnamed_statements = true;  // (nothing was prepared yet)
  static std::atomic<bool> said{false};
  if (!said.exchange(true)) {
    const std::string why = session_pid
                                ? "the backend pid it gave at connect, " + std::to_string(given) +
                                      ", is not its session's, " + std::to_string(*session_pid)
                                : "it did not say which backend its session runs in: " +
                                      (refused.empty() ? std::string("no answer") : refused);
    spdlog::warn(
        "pgrt: {} looks like a pooler, not the server itself ({}). Going on as behind a "
        "transaction pooler on such connections: unnamed statements, and one sync segment in "
        "flight per connection. Set PGRT_POOLER=transaction (ConnectOptions::pooler) for a "
        "transaction-mode pooler, or PGRT_POOLER=session for one that gives each client a server "
        "session of its own (PgBouncer's session mode)",
        target(), why);
  }
  co_return error_code{};
}

}  // namespace pgrt
