// pgrt-diag: what holds the server's connection slots, which of an app's backends look leaked,
// and (on request) terminating them. See docs/operations.md.
//
//   pgrt-diag [--dsn CONNINFO] [--app NAME] [--idle-threshold SECONDS] [--json]
//             [--watch [SECONDS]] [--kill-leaked | --emergency]
//
// Exit codes: 0 nothing leaked (or everything asked for was terminated), 1 leaked backends found
// and left alone, 2 bad arguments, 3 the server cannot be reached or queried, 4 terminating was
// refused (the message names the grant).
#include <algorithm>
#include <atomic>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <libpq-fe.h>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <unistd.h>
#include <vector>

#include <pgrt/db.hpp>
#include <pgrt/runtime/identity.hpp>

#include "budget_key.hpp"  // (db/src: the check PoolConfig makes of the key)
#include "diag_metrics.hpp"
#include "json_text.hpp"
#include "sql_text.hpp"  // (db/src: the quoting the library itself uses)
#include "stop_signals.hpp"

namespace {

namespace asio = boost::asio;

constexpr int exit_clean = 0;
constexpr int exit_leaked = 1;
constexpr int exit_usage = 2;
constexpr int exit_unreachable = 3;
constexpr int exit_refused = 4;
constexpr int exit_config =
    78;  // sysexits' EX_CONFIG, as the lifecycle manager's exit_code::config
constexpr int exit_output = 74;        // sysexits' EX_IOERR: the report could not be written
constexpr int exit_interrupted = 130;  // Ctrl+C, as a shell reports SIGINT

struct Arguments {
  std::string conninfo;
  std::string app;
  // Above PoolConfig::idle_timeout (10 min by default): a pool closes its own idle connections
  // above min_idle before they would count.
  std::int64_t idle_threshold = 900;
  bool json = false;
  std::optional<int> watch_seconds;
  std::chrono::seconds timeout{10};  // each connect, and each snapshot
  bool kill_leaked = false;
  bool emergency = false;
  std::optional<std::string> role;              // --role: the app's role, when connected as another
  bool behind_transaction_pooler = false;       // PGRT_POOLER=transaction
  std::optional<std::string> malformed_pooler;  // PGRT_POOLER's value when it is none of them
  bool empty_database_url = false;              // DATABASE_URL= (set but empty), no --dsn
  bool empty_app = false;                       // PGRT_APP= (set but empty), no --app
};

// What the service says of DATABASE_URL= (PoolConfig::from_env()): set but empty, it is refused,
// not taken as unset.
const char* const empty_database_url_message =
    "DATABASE_URL is set but empty: unset it to use libpq's PG* variables (PGHOST, PGDATABASE, "
    "...), or give a URL (postgresql://user@host:5432/db) or key=value pairs (host=... "
    "dbname=...)";

// Whether DATABASE_URL is set but empty (or blanks only, as empty to libpq).
bool database_url_is_empty() {
  const char* url = std::getenv("DATABASE_URL");  // NOLINT(concurrency-mt-unsafe): at start-up
  return url != nullptr &&
         std::string_view(url).find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

const char* const usage =
    "usage: pgrt-diag [--dsn CONNINFO] [--app NAME] [--idle-threshold SECONDS] [--json]\n"
    "                 [--watch [SECONDS]] [--kill-leaked | --emergency] [--timeout SECONDS]\n"
    "                 [--role ROLE]\n"
    "       pgrt-diag budget --help   (the holders of a connection budget's slots)\n"
    "       pgrt-diag metrics --help  (a running process's metrics endpoint, summarized)\n"
    "  --dsn             the server (default: DATABASE_URL; unset: libpq's PG* variables);\n"
    "                    no password here: others can read a command line (use PGPASSWORD)\n"
    "  --app             the app whose backends to check (default: PGRT_APP; unset: \"pgrt\"),\n"
    "                    as configured: shortened like the tags (pgrt::tag_app_name())\n"
    "  --idle-threshold  idle (not in a transaction) longer than this counts as leaked, as\n"
    "                    PGRT_CLEANUP_IDLE_S does for the start-up cleanup (900; 0: off)\n"
    "  --json            one JSON object (with --watch: one per refresh)\n"
    "  --watch           refresh every SECONDS (default 2) until Ctrl+C or SIGTERM (the\n"
    "                    screen is cleared on a terminal only)\n"
    "  --kill-leaked     terminate the backends reported as leaked\n"
    "  --emergency       terminate every backend of the app (all instances, all incarnations)\n"
    "  --role            the app's role, when connected as another (a superuser, when the\n"
    "                    app's role has no free connection left: 53300): its backends in this\n"
    "                    database are the ones classified and terminated\n"
    "  --timeout         give up on the connect, or on a snapshot, after SECONDS (default 10;\n"
    "                    1-3600; cancelling it takes up to 1 s more): exit 3. Ctrl+C ends a\n"
    "                    snapshot that hangs within that second; Ctrl+C again at once\n"
    "  The app's backends are those tagged exactly <app>/<instance>/<incarnation> (8 lowercase\n"
    "  hex digits), as pgrt tags its connections; `<app>/console` is not one. Only those in this\n"
    "  connection's database and under its role (or --role) are classified and terminated (like\n"
    "  the start-up cleanup); the app's others are listed, never touched.\n"
    "  PGRT_POOLER=transaction: the DSN goes through a transaction-mode pooler; the backends\n"
    "  are then the pooler's: none sets exit code 1, and --kill-leaked and --emergency are\n"
    "  refused.\n"
    "exit codes: 0 nothing leaked or all terminated (or --watch ended), 1 leaked found (with\n"
    "            --kill-leaked or --emergency: backends of the app in this database left\n"
    "            alone as another role's, or that it could not see),\n"
    "            2 usage, 3 server unreachable or timed out, 4 terminating refused,\n"
    "            74 the report could not be written, 78 malformed DSN,\n"
    "            130 Ctrl+C before the report\n";

std::optional<std::int64_t> parse_number(std::string_view text, std::int64_t low,
                                         std::int64_t high) {
  if (text.empty()) return std::nullopt;
  std::int64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
    if (value > high) return std::nullopt;
  }
  if (value < low) return std::nullopt;
  return value;
}

using pgrt::diag::shown_argument;

// A --dsn value, taken off the command line: one that holds a password is overwritten in argv
// (every local user can read /proc/PID/cmdline for as long as the process runs), with a warning
// naming the safer ways to give it. So is one that libpq cannot parse: whether it holds a
// password cannot be told (an unterminated quote may be in the password itself), and it is
// refused later anyway (exit 78).
std::string take_dsn(char* value) {
  std::string dsn = value;
  char* parse_error = nullptr;
  PQconninfoOption* options = PQconninfoParse(dsn.c_str(), &parse_error);
  PQfreemem(parse_error);  // may quote the password: never shown
  if (options == nullptr) {
    std::fill(value, value + dsn.size(), 'x');
    return dsn;
  }
  // Every option libpq marks secret (dispchar "*"): password, sslpassword, ...
  bool has_password = false;
  for (PQconninfoOption* option = options; option != nullptr && option->keyword != nullptr;
       ++option) {
    if (option->dispchar != nullptr && std::string_view(option->dispchar) == "*" &&
        option->val != nullptr && *option->val != '\0') {
      has_password = true;
    }
  }
  PQconninfoFree(options);
  if (has_password) {
    std::fill(value, value + dsn.size(), 'x');
    std::cerr << "pgrt-diag: warning: --dsn holds a password (or another secret libpq knows, "
                 "such as sslpassword), which other local users can read on the command line "
                 "(/proc/PID/cmdline); give it through DATABASE_URL, PGPASSWORD or ~/.pgpass "
                 "instead\n";
  }
  return dsn;
}

std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  if (const char* url = std::getenv("DATABASE_URL")) arguments.conninfo = url;
  arguments.empty_database_url = database_url_is_empty();
  const char* app = std::getenv("PGRT_APP");
  // (PGRT_APP= is refused below, as the service refuses it, unless --app is given.)
  arguments.app = app != nullptr ? app : "pgrt";
  bool app_given = false;
  if (const char* pooler = std::getenv("PGRT_POOLER")) {
    const std::string_view value = pooler;
    arguments.behind_transaction_pooler = value == "transaction";
    if (value != "transaction" && value != "session" && value != "none") {
      arguments.malformed_pooler = std::string(value);
    }
  }
  for (int i = 1; i < argc; ++i) {
    const std::string_view argument = argv[i];
    const bool has_value = i + 1 < argc;
    if (argument == "--dsn" && has_value) {
      arguments.conninfo = take_dsn(argv[++i]);
      arguments.empty_database_url = false;
    } else if (argument == "--app" && has_value) {
      arguments.app = argv[++i];
      app_given = true;
    } else if (argument == "--idle-threshold" && has_value) {
      auto seconds = parse_number(argv[++i], 0, 31'536'000);
      if (!seconds) {
        std::cerr << "pgrt-diag: --idle-threshold takes whole seconds (0-31536000), got '"
                  << argv[i] << "'\n";
        return std::nullopt;
      }
      arguments.idle_threshold = *seconds;
    } else if (argument == "--json") {
      arguments.json = true;
    } else if (argument == "--watch") {
      arguments.watch_seconds = 2;
      if (has_value && argv[i + 1][0] != '-') {
        auto seconds = parse_number(argv[++i], 1, 3600);
        if (!seconds) {
          std::cerr << "pgrt-diag: --watch takes whole seconds (1-3600), got '" << argv[i] << "'\n";
          return std::nullopt;
        }
        arguments.watch_seconds = static_cast<int>(*seconds);
      }
    } else if (argument == "--timeout" && has_value) {
      auto seconds = parse_number(argv[++i], 1, 3600);
      if (!seconds) {
        std::cerr << "pgrt-diag: --timeout takes whole seconds (1-3600), got '" << argv[i] << "'\n";
        return std::nullopt;
      }
      arguments.timeout = std::chrono::seconds(*seconds);
    } else if (argument == "--role" && has_value) {
      arguments.role = argv[++i];
      if (arguments.role->empty()) {
        std::cerr << "pgrt-diag: --role takes the app's role, got ''\n";
        return std::nullopt;
      }
    } else if (argument == "--kill-leaked") {
      arguments.kill_leaked = true;
    } else if (argument == "--emergency") {
      arguments.emergency = true;
    } else if (argument == "--help" || argument == "-h") {
      std::cout << usage;
      std::exit(exit_clean);  // NOLINT(concurrency-mt-unsafe): single-threaded here
    } else {
      std::cerr << "pgrt-diag: unknown or incomplete argument " << shown_argument(argument) << "\n"
                << usage;
      return std::nullopt;
    }
  }
  if (arguments.kill_leaked && arguments.emergency) {
    std::cerr << "pgrt-diag: --kill-leaked and --emergency exclude each other\n";
    return std::nullopt;
  }
  if (arguments.behind_transaction_pooler && (arguments.kill_leaked || arguments.emergency)) {
    std::cerr << "pgrt-diag: behind a transaction pooler (PGRT_POOLER=transaction) the server's "
                 "backends are the pooler's, shared by its clients: pgrt-diag terminates none. "
                 "Leave out --kill-leaked and --emergency (the pooler closes idle server "
                 "connections itself), or point --dsn straight at the server\n";
    return std::nullopt;
  }
  if (!app_given && app != nullptr && *app == '\0') {
    arguments.empty_app = true;  // a malformed PGRT_* variable: exit_config, as the service's
    return arguments;
  }
  if (arguments.app.empty()) {
    std::cerr << "pgrt-diag: --app takes the app's name (PoolConfig::application), got ''\n";
    return std::nullopt;
  }
  return arguments;
}

using pgrt::diag::json_string;
using pgrt::diag::printable;

// One of the app's backends (pgrt::list_app_backends()), judged by the leftover rule.
struct Backend {
  pgrt::AppBackend activity;
  std::string reason;  // why it looks leaked (pgrt::leftover_reasons()); "" if it does not
  bool terminated = false;
};

struct Snapshot {
  int max_connections = 0;
  int reserved = 0;
  int used = 0;
  std::string database;  // this connection's: the scope of classifying and terminating
  std::string user;
  struct Group {
    std::string application;
    std::string state;
    std::int64_t count = 0;
  };
  std::vector<Group> groups;
  std::vector<Backend> app_backends;  // this app's, leaked ones marked
  // The app's backends in this database whose pg_stat_activity rows this role may not read
  // (another role's, without pg_read_all_stats): neither listed, classified nor terminated.
  std::size_t unseen = 0;
  std::string refused;  // a termination refused: the message with the grant
  [[nodiscard]] int free_slots() const { return std::max(0, max_connections - reserved - used); }
  [[nodiscard]] std::size_t leaked() const {
    return static_cast<std::size_t>(
        std::count_if(app_backends.begin(), app_backends.end(),
                      [](const Backend& b) { return !b.reason.empty(); }));
  }
};

asio::awaitable<Snapshot> take_snapshot(pgrt::Connection& connection, const Arguments& arguments) {
  Snapshot snapshot;
  auto server = co_await connection.query(
      // (Every name schema-qualified, operators too: a schema put before pg_catalog in the role's
      // search_path must not change what it reports.)
      "SELECT pg_catalog.current_setting('max_connections')::pg_catalog.int4, "
      "pg_catalog.current_setting('superuser_reserved_connections')::pg_catalog.int4 "
      "OPERATOR(pg_catalog.+) coalesce(pg_catalog.current_setting('reserved_connections', "
      "true)::pg_catalog.int4, 0), (SELECT pg_catalog.count(*)::pg_catalog.int4 FROM "
      "pg_catalog.pg_stat_activity a WHERE a.backend_type OPERATOR(pg_catalog.=) 'client "
      "backend'), pg_catalog.current_database()::pg_catalog.text, "
      "session_user::pg_catalog.text");
  const pgrt::Row server_row = server[0];
  snapshot.max_connections = server_row.get<int>(0);
  snapshot.reserved = server_row.get<int>(1);
  snapshot.used = server_row.get<int>(2);
  snapshot.database = server_row.get<std::string>(3);
  snapshot.user = server_row.get<std::string>(4);
  auto groups = co_await connection.query(
      "SELECT coalesce(CASE WHEN a.application_name OPERATOR(pg_catalog.<>) '' THEN "
      "a.application_name END, '(none)'), coalesce(a.state, '(none)'), pg_catalog.count(*) FROM "
      "pg_catalog.pg_stat_activity a WHERE a.backend_type OPERATOR(pg_catalog.=) 'client "
      "backend' GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2");
  for (const pgrt::Row row : groups) {
    snapshot.groups.push_back(
        {row.get<std::string>(0), row.get<std::string>(1), row.get<std::int64_t>(2)});
  }
  // The app's backends (exact tags of the app only), judged by the start-up cleanup's rule:
  // without an own tag, an incarnation is leaked when a newer one of its instance started.
  std::vector<pgrt::AppBackend> backends =
      co_await pgrt::list_app_backends(connection, arguments.app);
  if (arguments.role) {
    for (auto& backend : backends) {
      backend.in_scope = backend.database == snapshot.database && backend.user == *arguments.role;
    }
  }
  // Rows of another role that this one may not read show their tag but no backend_type (which
  // every readable backend has): list_app_backends() cannot tell them client backends.
  auto hidden = co_await connection.query(
      "SELECT a.application_name FROM pg_catalog.pg_stat_activity a WHERE a.backend_type IS "
      "NULL AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database() AND "
      "a.application_name OPERATOR(pg_catalog.~~) pg_catalog.like_escape($1, '\\')",
      pgrt::like_literal(pgrt::tag_app_name(arguments.app) + "/") + "%");
  for (const pgrt::Row row : hidden) {
    const auto name = row.get<std::optional<std::string>>(0);
    if (name && pgrt::parse_connection_tag(arguments.app, *name)) ++snapshot.unseen;
  }
  const std::vector<std::string> reasons = pgrt::leftover_reasons(
      backends, {.application = arguments.app,
                 .idle_threshold = std::chrono::seconds(arguments.idle_threshold)});
  for (std::size_t i = 0; i < backends.size(); ++i) {
    snapshot.app_backends.push_back({.activity = backends[i], .reason = reasons[i]});
  }
  if (arguments.kill_leaked || arguments.emergency) {
    for (auto& backend : snapshot.app_backends) {
      if (!backend.activity.in_scope || (arguments.kill_leaked && backend.reason.empty())) {
        continue;
      }
      try {
        backend.terminated = co_await pgrt::terminate_backend_if_unchanged(
            connection, backend.activity.pid, backend.activity.application_name,
            backend.activity.backend_start);
      } catch (const pgrt::Error& error) {
        if (pgrt::sqlstate_of(error.code()) != "42501") throw;
        snapshot.refused = "terminating backend " + std::to_string(backend.activity.pid) +
                           " was refused: " + error.diagnostics().message +
                           ". Fix: GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, "
                           "bigint) TO " +
                           pgrt::quote_identifier(snapshot.user) +
                           "; (only a superuser may terminate a superuser's backends)";
        break;
      }
    }
  }
  co_return snapshot;
}

std::int64_t seconds_in_state(const pgrt::AppBackend& backend) {
  return std::chrono::duration_cast<std::chrono::seconds>(backend.in_state).count();
}

void print_json(const Snapshot& snapshot, const Arguments& arguments) {
  std::ostringstream out;
  out << "{\"server\":{\"max_connections\":" << snapshot.max_connections
      << ",\"reserved\":" << snapshot.reserved << ",\"used\":" << snapshot.used
      << ",\"free\":" << snapshot.free_slots()
      << "},\"database\":" << json_string(snapshot.database)
      << ",\"user\":" << json_string(snapshot.user) << ",\"groups\":[";
  for (std::size_t i = 0; i < snapshot.groups.size(); ++i) {
    const auto& group = snapshot.groups[i];
    out << (i == 0 ? "" : ",") << "{\"application\":" << json_string(group.application)
        << ",\"state\":" << json_string(group.state) << ",\"count\":" << group.count << "}";
  }
  out << "],\"app\":" << json_string(arguments.app)
      << ",\"tag_app\":" << json_string(pgrt::tag_app_name(arguments.app)) << ",\"backends\":[";
  for (std::size_t i = 0; i < snapshot.app_backends.size(); ++i) {
    const auto& backend = snapshot.app_backends[i];
    const auto& activity = backend.activity;
    out << (i == 0 ? "" : ",") << "{\"pid\":" << activity.pid
        << ",\"application_name\":" << json_string(activity.application_name)
        << ",\"state\":" << json_string(activity.state)
        << ",\"idle_seconds\":" << seconds_in_state(activity)
        << ",\"user\":" << json_string(activity.user)
        << ",\"database\":" << json_string(activity.database)
        << ",\"client\":" << json_string(activity.client)
        << ",\"in_scope\":" << (activity.in_scope ? "true" : "false")
        << ",\"running_here\":" << (activity.running_here ? "true" : "false")
        << ",\"leaked\":" << (backend.reason.empty() ? "false" : "true")
        << ",\"reason\":" << json_string(backend.reason)
        << ",\"terminated\":" << (backend.terminated ? "true" : "false") << "}";
  }
  out << "],\"leaked\":" << snapshot.leaked() << ",\"refused\":" << json_string(snapshot.refused)
      << "}";
  std::cout << out.str() << std::endl;
}

void print_text(const Snapshot& snapshot, const Arguments& arguments) {
  std::cout << "server: max_connections " << snapshot.max_connections << ", reserved "
            << snapshot.reserved << ", used " << snapshot.used << ", free " << snapshot.free_slots()
            << "\n\nconnections by application and state:\n";
  for (const auto& group : snapshot.groups) {
    std::cout << "  " << group.count << "\t" << printable(group.application) << " ("
              << printable(group.state) << ")\n";
  }
  std::cout << "\nbackends of " << printable(arguments.app) << ": " << snapshot.app_backends.size()
            << ", leaked: " << snapshot.leaked() << " (checked: those of "
            << printable(snapshot.user) << "@" << printable(snapshot.database) << ")\n";
  for (const auto& backend : snapshot.app_backends) {
    const auto& activity = backend.activity;
    std::cout << "  pid " << activity.pid << "  " << printable(activity.application_name) << "  "
              << (activity.state.empty() ? "-" : printable(activity.state)) << " "
              << seconds_in_state(activity) << " s  " << printable(activity.user) << "@"
              << printable(activity.database) << " from " << printable(activity.client);
    if (!activity.in_scope) std::cout << "\n      another database or role: not checked";
    if (activity.running_here) std::cout << "\n      its process runs on this host";
    if (!backend.reason.empty()) std::cout << "\n      LEAKED: " << printable(backend.reason);
    if (backend.terminated) std::cout << "\n      terminated";
    std::cout << "\n";
  }
  if (!snapshot.refused.empty()) std::cout << "\n" << printable(snapshot.refused) << "\n";
  std::cout << std::flush;
}

// Ctrl+C (or, with --watch, SIGTERM) while a step ran: it was given up on.
struct Interrupted {};

// The signals that end pgrt-diag (Ctrl+C; with --watch, SIGTERM too): a StopSignals, made before
// the first step and kept to the end. One that comes while no step or wait watches (as a step
// completes) stays pending: the step's result stands, and the next step or wait ends at once.
using pgrt::diag::StopSignals;

// A step as run_bounded() spawns it: one that a signal came before ends at once, and `started`
// tells that a cancellation may now reach it. (asio 1.81's co_spawn lets a cancellation that
// reaches its coroutine before it first runs escape from io_context::run() as a system_error,
// "co_await: Operation canceled", instead of ending the coroutine.)
template <typename T>
asio::awaitable<T> stoppable_step(asio::awaitable<T> operation, const StopSignals& signals,
                                  bool& started) {
  if (signals.received() != 0) throw Interrupted{};
  started = true;
  co_return co_await std::move(operation);
}

// Runs `operation` on `io` until it completes, `timeout` passes (pgrt::Error, client_errc::timeout)
// or one of `signals` arrives (Interrupted): a server that stops answering never hangs pgrt-diag,
// and Ctrl+C always ends it. `signals` stays installed between steps.
template <typename T>
T run_bounded(asio::io_context& io, StopSignals& signals, asio::awaitable<T> operation,
              std::chrono::milliseconds timeout) {
  if (signals.received() != 0) throw Interrupted{};
  io.restart();
  asio::cancellation_signal stop;
  bool started = false;
  bool finished = false;
  bool cut_short = false;  // a signal came while the step ran
  // The first signal cancels the step (a statement's cancel request is waited for up to the
  // connection's cancel_timeout, 1 s here); a second one ends the process at once.
  std::function<void(int)> on_signal = [&](int /*number*/) {
    if (cut_short) {
      std::cerr << "pgrt-diag: interrupted again: exiting at once" << std::endl;
      std::_Exit(exit_interrupted);
    }
    if (finished) return;  // (kept for the next step: this one's result stands)
    cut_short = true;
    signals.watch(on_signal);
    // Not yet started: it ends as it starts (stoppable_step()).
    if (started) stop.emit(asio::cancellation_type::terminal);
  };
  signals.watch(on_signal);
  std::optional<T> result;
  std::exception_ptr failure;
  asio::co_spawn(
      io, stoppable_step(pgrt::with_timeout(std::move(operation), timeout), signals, started),
      asio::bind_cancellation_slot(stop.slot(), [&](std::exception_ptr error, T value) {
        finished = true;
        failure = error;
        if (!error) result.emplace(std::move(value));
        signals.stop_watching();
      }));
  io.run();
  if (cut_short) throw Interrupted{};
  if (failure) std::rethrow_exception(failure);
  return std::move(*result);
}

// Sleeps `duration`, or until one of `signals` arrives (or one came already): then false.
bool sleep_unless_signalled(asio::io_context& io, StopSignals& signals,
                            std::chrono::seconds duration) {
  if (signals.received() != 0) return false;
  io.restart();
  asio::steady_timer timer(io, duration);
  signals.watch([&](int /*number*/) { timer.cancel(); });
  timer.async_wait([&](const boost::system::error_code&) { signals.stop_watching(); });
  io.run();
  return signals.received() == 0;
}

// --- pgrt-diag budget: who holds the slots of a connection budget ------------------------------

const char* const budget_usage =
    "usage: pgrt-diag budget [--dsn CONNINFO] [--key KEY] [--slots N] [--json] [--timeout S]\n"
    "  --key    the budget's key (default: PGRT_BUDGET_KEY)\n"
    "  --slots  its size, to show the free slots (default: PGRT_BUDGET_SLOTS)\n"
    "  Lists each held slot of the budget in this connection's database: its backend's pid,\n"
    "  tag (app/instance/incarnation), client address, start and state (pg_locks joined with\n"
    "  pg_stat_activity). --timeout bounds the connect, and the listing (default 10 s each;\n"
    "  a listing given up on takes up to 1 s more to cancel).\n"
    "  exit codes: 0 listed, 2 usage, 3 server unreachable or timed out, 74 the listing could\n"
    "  not be written, 78 malformed DSN, 130 Ctrl+C\n";

int run_budget(int argc, char** argv) {
  std::string conninfo;
  if (const char* url = std::getenv("DATABASE_URL")) conninfo = url;
  bool empty_database_url = database_url_is_empty();
  std::string key;
  if (const char* from_env = std::getenv("PGRT_BUDGET_KEY")) key = from_env;
  bool key_given = false;  // by --key (a usage error if bad), else from PGRT_BUDGET_KEY
  std::optional<std::int64_t> slots;
  if (const char* from_env = std::getenv("PGRT_BUDGET_SLOTS")) {
    slots = parse_number(from_env, 1, 100'000);
    if (!slots) {
      std::cerr << "pgrt-diag budget: PGRT_BUDGET_SLOTS='" << from_env
                << "' is not valid: expected 1-100000\n";
      return exit_config;
    }
  }
  bool json = false;
  std::chrono::seconds timeout{10};
  for (int i = 2; i < argc; ++i) {
    const std::string_view argument = argv[i];
    const bool has_value = i + 1 < argc;
    if (argument == "--dsn" && has_value) {
      conninfo = take_dsn(argv[++i]);
      empty_database_url = false;
    } else if (argument == "--key" && has_value) {
      key = argv[++i];
      key_given = true;
    } else if (argument == "--slots" && has_value) {
      slots = parse_number(argv[++i], 1, 100'000);
      if (!slots) {
        std::cerr << "pgrt-diag budget: --slots takes 1-100000, got '" << argv[i] << "'\n";
        return exit_usage;
      }
    } else if (argument == "--json") {
      json = true;
    } else if (argument == "--timeout" && has_value) {
      auto seconds = parse_number(argv[++i], 1, 3600);
      if (!seconds) {
        std::cerr << "pgrt-diag budget: --timeout takes whole seconds (1-3600), got '" << argv[i]
                  << "'\n";
        return exit_usage;
      }
      timeout = std::chrono::seconds(*seconds);
    } else if (argument == "--help" || argument == "-h") {
      std::cout << budget_usage;
      return exit_clean;
    } else {
      std::cerr << "pgrt-diag budget: unknown or incomplete argument " << shown_argument(argument)
                << "\n"
                << budget_usage;
      return exit_usage;
    }
  }
  if (empty_database_url) {
    std::cerr << "pgrt-diag budget: " << empty_database_url_message << "\n";
    return exit_config;
  }
  if (key.empty()) {
    std::cerr << "pgrt-diag budget: no budget key: pass --key or set PGRT_BUDGET_KEY\n"
              << budget_usage;
    return exit_usage;
  }
  // The key the service would refuse names a budget nobody shares: refused as the service does.
  if (const std::string problem = pgrt::detail::budget_key_problem(key); !problem.empty()) {
    std::cerr << "pgrt-diag budget: " << (key_given ? "--key" : "PGRT_BUDGET_KEY") << "='"
              << pgrt::detail::shown_budget_key(key) << "' is not valid: it " << problem << ": "
              << pgrt::detail::budget_key_hint << "\n";
    return key_given ? exit_usage : exit_config;
  }
  asio::io_context io;
  StopSignals signals(io, {SIGINT});  // (SIGTERM keeps its default action)
  pgrt::ConnectOptions options;
  options.conninfo = conninfo;
  options.application_name = "pgrt-diag";
  options.connect_timeout = timeout;
  options.cancel_timeout = std::chrono::seconds(1);  // a step given up on ends within 1 s more
  pgrt::Connection connection =
      run_bounded(io, signals, pgrt::Connection::connect(std::move(options)), timeout);
  auto list_holders = [](pgrt::Connection& on,
                         std::string budget_key) -> asio::awaitable<pgrt::Result> {
    co_return co_await on.query(
        // (Every name schema-qualified, operators too, as the pool's own slot queries.)
        "SELECT l.objid::pg_catalog.int8, a.pid, coalesce(a.application_name, ''), "
        "coalesce(pg_catalog.host(a.client_addr), 'local'), "
        "coalesce(pg_catalog.to_char(pg_catalog.timezone('UTC', a.backend_start), "
        "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '?'), coalesce(a.state, ''), "
        "pg_catalog.current_database() FROM pg_catalog.pg_locks l JOIN "
        "pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid WHERE l.locktype "
        "OPERATOR(pg_catalog.=) 'advisory' AND l.granted AND l.objsubid OPERATOR(pg_catalog.=) 2 "
        "AND l.classid::pg_catalog.int4 OPERATOR(pg_catalog.=) $1 AND l.database "
        "OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname "
        "OPERATOR(pg_catalog.=) pg_catalog.current_database()) ORDER BY 1",
        pgrt::budget_lock_key(budget_key));
  };
  const pgrt::Result holders = run_bounded(io, signals, list_holders(connection, key), timeout);
  // Slots at or past --slots are held by a sharer given a larger PGRT_BUDGET_SLOTS: together
  // the sharers may then hold more than the budget meant.
  std::int64_t past_slots = 0;
  if (slots) {
    for (const pgrt::Row& row : holders) past_slots += row.get<std::int64_t>(0) >= *slots ? 1 : 0;
  }
  const std::int64_t held_within = static_cast<std::int64_t>(holders.size()) - past_slots;
  if (json) {
    std::ostringstream out;
    out << "{\"budget\":" << json_string(key) << ",\"lock_key\":" << pgrt::budget_lock_key(key)
        << ",\"slots\":" << (slots ? std::to_string(*slots) : "null")
        << ",\"held\":" << holders.size()
        << ",\"past_slots\":" << (slots ? std::to_string(past_slots) : "null") << ",\"holders\":[";
    bool first = true;
    for (const pgrt::Row& row : holders) {
      out << (first ? "" : ",") << "{\"slot\":" << row.get<std::int64_t>(0)
          << ",\"pid\":" << row.get<int>(1) << ",\"tag\":" << json_string(row.get<std::string>(2))
          << ",\"client\":" << json_string(row.get<std::string>(3))
          << ",\"since\":" << json_string(row.get<std::string>(4))
          << ",\"state\":" << json_string(row.get<std::string>(5)) << "}";
      first = false;
    }
    out << "]}";
    std::cout << out.str() << std::endl;
    return exit_clean;
  }
  std::cout << "budget '" << key << "' (advisory lock key " << pgrt::budget_lock_key(key)
            << "): " << holders.size() << " slot(s) held";
  if (slots) {
    std::cout << " of " << *slots << ", " << std::max<std::int64_t>(0, *slots - held_within)
              << " free";
  }
  std::cout << "\n";
  for (const pgrt::Row& row : holders) {
    const bool past = slots && row.get<std::int64_t>(0) >= *slots;
    std::cout << "  slot " << row.get<std::int64_t>(0) << "  pid " << row.get<int>(1) << "  "
              << printable(row.get<std::string>(2)) << "  from "
              << printable(row.get<std::string>(3)) << "  since " << row.get<std::string>(4) << "  "
              << printable(row.get<std::string>(5)) << (past ? "  (past --slots)" : "") << "\n";
  }
  if (past_slots > 0) {
    std::cout << past_slots << " slot(s) held past the budget's " << *slots
              << ": their holders were given a larger PGRT_BUDGET_SLOTS, and together the "
                 "sharers may hold more than "
              << *slots << " connections; give every sharer the same value\n";
  }
  std::cout << std::flush;
  if (!std::cout) {
    std::cerr << "pgrt-diag budget: cannot write the listing\n";
    return exit_output;
  }
  return exit_clean;
}

int run(const Arguments& arguments) {
  asio::io_context io;
  // --watch ends cleanly (exit 0, output flushed) on Ctrl+C or SIGTERM; without it SIGTERM keeps
  // its default action.
  StopSignals signals(
      io, arguments.watch_seconds ? std::vector<int>{SIGINT, SIGTERM} : std::vector<int>{SIGINT});
  pgrt::ConnectOptions options;
  options.conninfo = arguments.conninfo;
  options.application_name = "pgrt-diag";
  if (arguments.behind_transaction_pooler) options.pooler = pgrt::Pooler::transaction;
  options.connect_timeout = arguments.timeout;
  options.cancel_timeout = std::chrono::seconds(1);  // a step given up on ends within 1 s more
  pgrt::Connection connection =
      run_bounded(io, signals, pgrt::Connection::connect(std::move(options)), arguments.timeout);
  if (!arguments.behind_transaction_pooler) {
    // A login role whose sessions SET role to a group role: back to the login role, which the
    // app's backends show and which may see and signal them (behind a pooler a SET would stay
    // on the server connection for others).
    auto reset_role = [](pgrt::Connection& on) -> asio::awaitable<pgrt::Result> {
      co_return co_await on.query("SET ROLE NONE");
    };
    (void)run_bounded(io, signals, reset_role(connection), arguments.timeout);
  }
  for (;;) {
    const Snapshot snapshot =
        run_bounded(io, signals, take_snapshot(connection, arguments), arguments.timeout);
    if (arguments.watch_seconds && !arguments.json) {
      // Clear the screen on a terminal only: a file or a pipe gets no escape codes, just a blank
      // line between refreshes.
      std::cout << (::isatty(STDOUT_FILENO) == 1 ? "\033[H\033[2J" : "\n");
    }
    if (arguments.json) {
      print_json(snapshot, arguments);
    } else {
      print_text(snapshot, arguments);
    }
    if (arguments.behind_transaction_pooler && !arguments.json) {
      std::cout << "behind a transaction pooler (PGRT_POOLER=transaction) these backends are the "
                   "pooler's, shared by its clients: a 'leaked' one is the pooler's idle server "
                   "connection, and does not set the exit code\n";
    }
    // A report that could not be written (a full disk, a closed pipe) is no report.
    std::cout.flush();
    if (!std::cout) {
      std::cerr << "pgrt-diag: cannot write the report\n";
      return exit_output;
    }
    const bool acted = arguments.kill_leaked || arguments.emergency;
    const bool leaks_count = !acted && !arguments.behind_transaction_pooler;
    // Acting on the app's backends, and some in this database were left alone as another
    // role's: not "all terminated" (connected as a superuser because the app's role had no free
    // connection, say). Those in other databases are other deployments': listed, not counted.
    const auto left_alone = static_cast<std::size_t>(std::count_if(
        snapshot.app_backends.begin(), snapshot.app_backends.end(), [&](const auto& backend) {
          return !backend.activity.in_scope && backend.activity.database == snapshot.database;
        }));
    if (acted && left_alone > 0) {
      std::cerr << "pgrt-diag: " << left_alone << " of the app's backends in this database are "
                << "under another role than " << printable(arguments.role.value_or(snapshot.user))
                << ", and were left alone: connect as their role, or give it with --role ROLE\n";
    }
    if (acted && snapshot.unseen > 0) {
      std::cerr << "pgrt-diag: " << snapshot.unseen << " of the app's backends in this database "
                << "are another role's that " << printable(snapshot.user)
                << " may not see (pg_stat_activity hides them without pg_read_all_stats), and "
                   "were neither classified nor terminated: connect as their role, or GRANT "
                   "pg_read_all_stats TO "
                << printable(snapshot.user) << "\n";
    }
    const int code = !snapshot.refused.empty()                            ? exit_refused
                     : (leaks_count && snapshot.leaked() > 0)             ? exit_leaked
                     : (acted && (left_alone > 0 || snapshot.unseen > 0)) ? exit_leaked
                                                                          : exit_clean;
    if (!arguments.watch_seconds) return code;
    if (!sleep_unless_signalled(io, signals, std::chrono::seconds(*arguments.watch_seconds))) {
      return exit_clean;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string_view(argv[1]) == "metrics")
    return pgrt::diag::run_metrics(argc, argv);
  if (argc >= 2 && std::string_view(argv[1]) == "budget") {
    try {
      return run_budget(argc, argv);
    } catch (const Interrupted&) {
      std::cerr << "pgrt-diag budget: interrupted" << std::endl;
      return exit_interrupted;
    } catch (const pgrt::Error& error) {
      std::cerr << "pgrt-diag budget: " << printable(error.what(), true) << std::endl;
      return error.code() == pgrt::client_errc::invalid_config ? exit_config : exit_unreachable;
    } catch (const std::exception& error) {
      // (Such as its stop signals that could not be watched: StopSignals.)
      std::cerr << "pgrt-diag budget: " << printable(error.what(), true) << std::endl;
      return exit_unreachable;
    }
  }
  auto arguments = parse_arguments(argc, argv);
  if (!arguments) return exit_usage;
  if (arguments->malformed_pooler) {
    std::cerr << "pgrt-diag: PGRT_POOLER='" << *arguments->malformed_pooler
              << "' is not valid: expected 'transaction' (a transaction-mode pooler), or "
                 "'session' / 'none'\n";
    return exit_config;
  }
  if (arguments->empty_database_url) {
    std::cerr << "pgrt-diag: " << empty_database_url_message << "\n";
    return exit_config;
  }
  if (arguments->empty_app) {
    // The service's message (PoolConfig::from_env()).
    std::cerr << "pgrt-diag: PGRT_APP='' is not valid: give the application's name (it tags "
                 "every connection's application_name), or leave PGRT_APP unset for \"pgrt\"\n";
    return exit_config;
  }
  try {
    return run(*arguments);
  } catch (const Interrupted&) {
    std::cerr << "pgrt-diag: interrupted" << std::endl;
    return arguments->watch_seconds ? exit_clean : exit_interrupted;
  } catch (const pgrt::Error& error) {
    // pgrt's messages never contain a password.
    std::cerr << "pgrt-diag: " << printable(error.what(), true) << std::endl;
    if (pgrt::sqlstate_of(error.code()) == "53300") {
      std::cerr << "pgrt-diag: the server has no connection left for this role: connect as a "
                   "superuser (superuser_reserved_connections keeps slots for them) and name the "
                   "app's role with --role ROLE to see and terminate its backends"
                << std::endl;
    }
    return error.code() == pgrt::client_errc::invalid_config ? exit_config : exit_unreachable;
  } catch (const std::exception& error) {
    std::cerr << "pgrt-diag: " << printable(error.what(), true) << std::endl;
    return exit_unreachable;
  }
}
