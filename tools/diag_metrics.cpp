// pgrt-diag metrics URL: a running process's /metrics (pgrt::MetricsEndpoint), summarized.
#include "diag_metrics.hpp"

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <pthread.h>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "stop_signals.hpp"
#include "utf8_text.hpp"  // (db/src)

namespace pgrt::diag {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

constexpr int exit_usage = 2;
constexpr int exit_unreachable = 3;
constexpr int exit_output = 74;  // sysexits' EX_IOERR: the summary could not be written
// Ctrl+C or SIGTERM while the endpoint was read: 128 + the signal's number, as a shell reports a
// process it ended (130 for SIGINT, as the other pgrt-diag commands; 143 for SIGTERM).
constexpr int exit_signalled_base = 128;

// Flushes std::cout: exit_output (said on stderr) when the output could not be written (a full
// disk, a closed pipe), else 0.
int written() {
  std::cout.flush();
  if (std::cout) return 0;
  std::cerr << "pgrt-diag metrics: cannot write the output\n";
  return exit_output;
}

const char* const metrics_usage =
    "usage: pgrt-diag metrics URL [--raw]\n"
    "  Reads a running process's metrics endpoint (the demo's --metrics-port, or any\n"
    "  pgrt::MetricsEndpoint), e.g. http://127.0.0.1:9464/metrics, and summarizes each pool\n"
    "  (connections in use, waiting, timeouts, mean wait and use, discards, consumers), the\n"
    "  pending writes, the watchdog's conditions and the lifecycle state.\n"
    "  --raw   print the Prometheus text as it came\n"
    "  --timeout S   give up on a step (lookup, connect, request, answer) after S seconds\n"
    "                (default 10)\n"
    "  Ctrl+C or SIGTERM ends it at once while it reads the endpoint (\"interrupted\"); once\n"
    "  the answer is in, the output is written whole\n"
    "exit codes: 0 read, 2 usage, 3 unreachable or not a metrics endpoint, 74 the output could\n"
    "  not be written, 130 Ctrl+C (143 SIGTERM) before the output\n";

struct Url {
  std::string host;
  std::string port;
  std::string target;
};

std::optional<Url> parse_url(std::string_view text) {
  constexpr std::string_view scheme = "http://";
  if (!text.starts_with(scheme)) return std::nullopt;
  text.remove_prefix(scheme.size());
  const auto slash = text.find('/');
  const std::string_view authority = text.substr(0, slash);
  Url url;
  url.target = slash == std::string_view::npos ? "/metrics" : std::string(text.substr(slash));
  const auto colon = authority.rfind(':');
  // (An '@' anywhere: credentials, whose password may hold a '/' and so reach past the authority.)
  if (authority.empty() || text.find('@') != std::string_view::npos) return std::nullopt;
  if (colon == std::string_view::npos || authority.back() == ']') {
    url.host = std::string(authority);
    url.port = "80";
  } else {
    url.host = std::string(authority.substr(0, colon));
    url.port = std::string(authority.substr(colon + 1));
  }
  if (url.host.size() > 2 && url.host.front() == '[' && url.host.back() == ']') {
    url.host = url.host.substr(1, url.host.size() - 2);
  }
  int port = 0;
  const auto [end, error] =
      std::from_chars(url.port.data(), url.port.data() + url.port.size(), port);
  if (error != std::errc() || end != url.port.data() + url.port.size() || port < 1 ||
      port > 65535) {
    return std::nullopt;
  }
  return url;
}

// A signal came while the endpoint was read.
struct Interrupted {};

// The host's addresses, looked up on a thread of its own that is left behind (detached) when it
// takes longer than `limit` or a signal comes: getaddrinfo() cannot be cancelled, and waiting for
// it (as asio's resolver does when its io_context ends) would hold the command for the system
// resolver's own timeouts, whatever --timeout says. `io` runs meanwhile (in slices of 10 ms), so
// that `signals` are seen.
asio::ip::tcp::resolver::results_type resolve(const Url& url, std::chrono::seconds limit,
                                              asio::io_context& io, const StopSignals& signals) {
  using Results = asio::ip::tcp::resolver::results_type;
  using Clock = std::chrono::steady_clock;
  auto answer = std::make_shared<std::promise<Results>>();
  std::future<Results> found = answer->get_future();
  // The lookup's thread blocks every signal (it starts with the mask of the thread that makes
  // it): nothing meant for the command is handled on a thread that is left behind.
  sigset_t every_signal;
  sigset_t previous;
  sigfillset(&every_signal);
  pthread_sigmask(SIG_BLOCK, &every_signal, &previous);
  std::thread([answer, host = url.host, port = url.port] {
    try {
      asio::io_context lookup;
      asio::ip::tcp::resolver resolver(lookup);
      answer->set_value(resolver.resolve(host, port));
    } catch (...) {
      answer->set_exception(std::current_exception());
    }
  }).detach();
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  const auto until = Clock::now() + limit;
  while (found.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    if (signals.received() != 0) throw Interrupted{};
    const auto now = Clock::now();
    if (now >= until) throw boost::system::system_error(asio::error::timed_out);
    io.restart();
    io.run_for(std::min<Clock::duration>(std::chrono::milliseconds(10), until - now));
  }
  return found.get();
}

// The endpoint's answer, each step (lookup, connect, request, answer) cut at `limit`: beast's
// timeouts apply to asynchronous operations only, so a listener that never answers would
// otherwise hold the command for good. One of `signals` ends it at once (Interrupted).
std::string fetch(const Url& url, std::chrono::seconds limit, asio::io_context& io,
                  StopSignals& signals) {
  // (Stopping `io` leaves whatever step was under way, which goes with `io`.)
  signals.watch([&](int /*number*/) { io.stop(); });
  const auto addresses = resolve(url, limit, io, signals);
  // (One read as the lookup ended. One not read yet ends the run_for() below at once.)
  if (signals.received() != 0) throw Interrupted{};
  beast::tcp_stream stream(io);
  http::request<http::empty_body> request{http::verb::get, url.target, 11};
  request.set(http::field::host, url.host);
  request.set(http::field::connection, "close");
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 * 1024 * 1024);
  boost::system::error_code failure = asio::error::timed_out;
  // The chain's end: the signal wait goes, so that `io` runs out of work.
  const auto end = [&](boost::system::error_code error) {
    failure = error;
    signals.stop_watching();
  };
  stream.expires_after(limit);
  stream.async_connect(addresses, [&](boost::system::error_code connect_error, const auto&) {
    if (connect_error) {
      end(connect_error);
      return;
    }
    stream.expires_after(limit);
    http::async_write(
        stream, request, [&](boost::system::error_code write_error, std::size_t /*written*/) {
          if (write_error) {
            end(write_error);
            return;
          }
          stream.expires_after(limit);
          http::async_read(
              stream, buffer, parser,
              [&](boost::system::error_code read_error, std::size_t /*read*/) { end(read_error); });
        });
  });
  io.restart();
  io.run_for(limit * 3);
  if (signals.received() != 0) throw Interrupted{};
  if (failure == beast::error::timeout) failure = asio::error::timed_out;
  if (failure) throw boost::system::system_error(failure);
  auto& response = parser.get();
  if (response.result() != http::status::ok) {
    throw std::runtime_error("HTTP " + std::to_string(response.result_int()) + " from " +
                             url.target + ": " + response.body());
  }
  return std::move(response.body());
}

// One sample: its family name, labels and value.
}  // namespace

std::string printable(std::string_view text, bool keep_line_breaks) {
  // (Valid UTF-8 first: a byte that starts no sequence, such as a lone 0x9b, is CSI to a terminal
  // that takes C1 controls as bytes.)
  const std::string valid = pgrt::detail::valid_utf8(text);
  std::string out;
  out.reserve(valid.size());
  for (std::size_t i = 0; i < valid.size(); ++i) {
    const auto byte = static_cast<unsigned char>(valid[i]);
    if (byte == 0xc2 && i + 1 < valid.size() && static_cast<unsigned char>(valid[i + 1]) >= 0x80 &&
        static_cast<unsigned char>(valid[i + 1]) <= 0x9f) {
      out += '?';  // U+0080-U+009F
      ++i;
    } else if ((byte < 0x20 && !(keep_line_breaks && byte == '\n')) || byte == 0x7f) {
      out += '?';
    } else {
      out += valid[i];
    }
  }
  return out;
}

// (Shared by pgrt-diag's commands.) One that may hold a password (a URL with credentials, a
// conninfo's password=, a --dsn= misspelt, another secret's name such as oauth_client_secret= or
// MYSQL_PWD=, a one-letter option with a value, mysql's -ps3cret) is named, not shown.
std::string shown_argument(std::string_view argument) {
  // (psql's flags, which take no value: they hold no password.)
  if (argument == "--password" || argument == "--no-password") {
    return "'" + std::string(argument) +
           "' (pgrt-diag takes no password on its command line: give it through PGPASSWORD, "
           "~/.pgpass or DATABASE_URL)";
  }
  std::string lowered(argument);
  std::transform(lowered.begin(), lowered.end(), lowered.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // (pgrt-diag's only one-letter option is -h, which takes no value.)
  const bool short_option_with_value =
      argument.size() > 2 && argument[0] == '-' && argument[1] != '-';
  if (lowered.find("://") == std::string::npos && lowered.find('@') == std::string::npos &&
      lowered.find("pass") == std::string::npos && lowered.find("pwd") == std::string::npos &&
      lowered.find("secret") == std::string::npos && !short_option_with_value) {
    return "'" + printable(std::string(argument)) + "'";
  }
  const std::size_t equals = argument.find('=');
  const std::string name =
      short_option_with_value ? "'" + printable(std::string(argument.substr(0, 2))) + "...'"
      : argument.starts_with("--") && equals != std::string_view::npos
          ? "'" + printable(std::string(argument.substr(0, equals + 1))) + "...'"
          : std::string();
  // ("unexpected argument (not shown: ...)" when nothing of it can be shown.)
  return (name.empty() ? std::string() : name + " ") + "(not shown: it may hold a password)";
}

namespace {

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

std::vector<Sample> parse_samples(const std::string& text) {
  std::vector<Sample> samples;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line.front() == '#') continue;
    Sample sample;
    std::size_t at = line.find_first_of("{ ");
    if (at == std::string::npos) continue;
    sample.name = line.substr(0, at);
    if (line[at] == '{') {
      ++at;
      while (at < line.size() && line[at] != '}') {
        const auto equals = line.find('=', at);
        if (equals == std::string::npos || equals + 1 >= line.size() || line[equals + 1] != '"') {
          break;
        }
        std::string key = line.substr(at, equals - at);
        std::string value;
        std::size_t i = equals + 2;
        for (; i < line.size() && line[i] != '"'; ++i) {
          if (line[i] == '\\' && i + 1 < line.size()) {
            ++i;
            value += line[i] == 'n' ? '\n' : line[i];
          } else {
            value += line[i];
          }
        }
        sample.labels[std::move(key)] = printable(value);  // (a "\n" in it must not start a line)
        at = i + 1;
        if (at < line.size() && line[at] == ',') ++at;
      }
      at = line.find(' ', at);
      if (at == std::string::npos) continue;
    }
    try {
      sample.value = std::stod(line.substr(at + 1));
    } catch (const std::exception&) {
      continue;
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

// A count as a whole number. The exposition format allows NaN, infinities and any double (an
// endpoint that is not pgrt's): those, and values past long long's range (converting them is
// undefined behaviour), are shown as they are.
std::string whole(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  std::ostringstream out;
  // -2^63 and 2^63, both exact doubles: the range a long long holds (the latter excluded).
  if (value >= -9223372036854775808.0 && value < 9223372036854775808.0) {
    out << static_cast<long long>(value);
  } else {
    out << value;
  }
  return out.str();
}

std::string milliseconds(double seconds) {
  std::ostringstream out;
  out.precision(seconds * 1000 < 10 ? 2 : 0);
  out << std::fixed << seconds * 1000 << " ms";
  return out.str();
}

// A sample's label; "?" when it has none (another exporter's names, a partial scrape).
std::string label(const Sample& sample, const std::string& name) {
  const auto found = sample.labels.find(name);
  return found == sample.labels.end() ? std::string("?") : found->second;
}

void summarize(const std::vector<Sample>& samples, std::ostream& out) {
  const std::string pool_label = "db_client_connection_pool_name";
  std::map<std::string, std::map<std::string, double>> pools;  // pool -> key -> value
  std::map<std::string, std::map<std::string, double>> discards;
  std::map<std::string, std::vector<std::string>> consumers;
  std::map<std::string, std::map<std::string, double>> writes;
  std::vector<std::string> holding;
  std::string state;
  std::optional<bool> ready;
  for (const Sample& s : samples) {
    const auto pool = s.labels.find(pool_label);
    if (pool != s.labels.end()) {
      auto& values = pools[pool->second];
      if (s.name == "db_client_connection_count") {
        values[label(s, "state")] = s.value;
      } else if (s.name == "pgrt_pool_discards_total") {
        if (s.value > 0) discards[pool->second][label(s, "reason")] = s.value;
      } else if (s.name == "pgrt_pool_consumer_in_use") {
        consumers[pool->second].push_back(label(s, "consumer") + " " + whole(s.value));
      } else {
        values[s.name] = s.value;
      }
    } else if (s.name.starts_with("pgrt_pending_writes_")) {
      writes[s.labels.count("pending_writes") ? label(s, "pending_writes") : ""][s.name] = s.value;
    } else if (s.name == "pgrt_watchdog_condition" && s.value > 0) {
      holding.push_back(label(s, "condition"));
    } else if (s.name == "pgrt_lifecycle_state" && s.value > 0) {
      state = label(s, "state");
    } else if (s.name == "pgrt_lifecycle_ready") {
      ready = s.value > 0;
    }
  }
  for (auto& [name, v] : pools) {
    const auto mean = [&](const std::string& histogram) {
      const double count = v[histogram + "_count"];
      return count > 0 ? milliseconds(v[histogram + "_sum"] / count) : std::string("-");
    };
    out << "pool " << name << ": " << whole(v["used"]) << " of max "
        << whole(v["db_client_connection_max"]) << " in use, " << whole(v["idle"]) << " idle, "
        << whole(v["db_client_connection_pending_requests"]) << " waiting (longest "
        << milliseconds(v["pgrt_pool_longest_wait_seconds"]) << ")\n"
        << "  acquires " << whole(v["pgrt_pool_acquires_total"]) << ", timeouts "
        << whole(v["db_client_connection_timeouts_total"]) << ", mean wait "
        << mean("db_client_connection_wait_time_seconds") << ", mean use "
        << mean("db_client_connection_use_time_seconds") << ", mean connect "
        << mean("db_client_connection_create_time_seconds") << "\n"
        << "  connects " << whole(v["pgrt_pool_connect_attempts_total"]) << ", failed "
        << whole(v["pgrt_pool_connect_failures_total"]) << " (in a row "
        << whole(v["pgrt_pool_connect_failures_in_a_row"]) << "), suspected leaks now "
        << whole(v["pgrt_pool_leases_past_leak_threshold"]) << "\n";
    out << "  discards:";
    if (discards[name].empty()) out << " none";
    for (const auto& [reason, count] : discards[name]) out << " " << reason << " " << whole(count);
    out << "\n";
    if (!consumers[name].empty()) {
      out << "  consumers in use:";
      for (const auto& entry : consumers[name]) out << " " << entry;
      out << "\n";
    }
  }
  for (auto& [name, v] : writes) {
    out << "pending writes " << name << ": accepted "
        << whole(v["pgrt_pending_writes_accepted_total"]) << ", flushed "
        << whole(v["pgrt_pending_writes_flushed_total"]) << ", failed "
        << whole(v["pgrt_pending_writes_failed_total"])
        << (v.contains("pgrt_pending_writes_unconfirmed_total") &&
                    v["pgrt_pending_writes_unconfirmed_total"] > 0
                ? " (" + whole(v["pgrt_pending_writes_unconfirmed_total"]) + " may be stored)"
                : std::string())
        << ", queued " << whole(v["pgrt_pending_writes_queued"]) << "\n";
  }
  if (samples.end() != std::find_if(samples.begin(), samples.end(), [](const Sample& s) {
        return s.name == "pgrt_watchdog_condition";
      })) {
    out << "watchdog: ";
    if (holding.empty()) out << "no condition holds";
    for (std::size_t i = 0; i < holding.size(); ++i) out << (i ? ", " : "") << holding[i];
    out << "\n";
  }
  if (!state.empty()) {
    out << "lifecycle: " << state;
    if (ready) out << (*ready ? ", ready" : ", not ready");
    out << "\n";
  }
}

}  // namespace

int run_metrics(int argc, char** argv) {
  std::optional<Url> url;
  bool raw = false;
  std::chrono::seconds limit{10};
  for (int i = 2; i < argc; ++i) {
    const std::string_view argument = argv[i];
    if (argument == "--help" || argument == "-h") {
      std::cout << metrics_usage;
      return 0;
    }
    if (argument == "--raw") {
      raw = true;
    } else if (argument == "--timeout" && i + 1 < argc) {
      const std::string_view value = argv[++i];
      int seconds = 0;
      const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), seconds);
      if (error != std::errc() || end != value.data() + value.size() || seconds < 1 ||
          seconds > 3600) {
        std::cerr << "pgrt-diag metrics: --timeout takes whole seconds from 1 to 3600, not '"
                  << value << "'\n";
        return exit_usage;
      }
      limit = std::chrono::seconds(seconds);
    } else if (!url && (url = parse_url(argument))) {
      continue;
    } else if (argument.find('@') != std::string_view::npos) {
      // (Never echoed: it may hold a password.)
      std::cerr << "pgrt-diag metrics: the URL holds credentials (user:password@), which the "
                   "metrics endpoint does not take: give http://HOST:PORT/metrics\n";
      return exit_usage;
    } else {
      std::cerr << "pgrt-diag metrics: unexpected argument " << shown_argument(argument)
                << " (the URL is http://HOST:PORT/metrics)\n"
                << metrics_usage;
      return exit_usage;
    }
  }
  if (!url) {
    std::cerr << "pgrt-diag metrics: give the endpoint's URL\n" << metrics_usage;
    return exit_usage;
  }
  // (From here to the exit: a signal never takes its default action, which cut the output short.)
  asio::io_context io;
  std::optional<StopSignals> signals;
  try {
    // SIGINT and SIGTERM, from before the lookup until the exit: one that comes while the
    // endpoint is read ends the read at once (Interrupted); one that comes once the answer is in
    // is left pending, and the output is written whole.
    signals.emplace(io, std::vector<int>{SIGINT, SIGTERM});
  } catch (const boost::system::system_error& error) {
    std::cerr << "pgrt-diag metrics: " << error.what() << "\n";
    return exit_unreachable;
  }
  std::string text;
  try {
    text = fetch(*url, limit, io, *signals);
  } catch (const Interrupted&) {
    std::cerr << "pgrt-diag metrics: interrupted\n";
    return exit_signalled_base + signals->received();
  } catch (const std::exception& error) {
    // A system error's own message, without Boost's source location.
    const auto* system = dynamic_cast<const boost::system::system_error*>(&error);
    std::cerr << "pgrt-diag metrics: cannot read http://" << url->host << ":" << url->port
              << url->target << ": "
              << printable(system != nullptr ? system->code().message() : error.what(), true)
              << " (is the process running with its metrics endpoint on that port?)\n";
    return exit_unreachable;
  }
  if (raw) {
    std::cout << text;
    return written();
  }
  const auto samples = parse_samples(text);
  if (samples.empty()) {
    std::cerr << "pgrt-diag metrics: no metrics in the answer of " << url->target
              << " (not a Prometheus endpoint?)\n";
    return exit_unreachable;
  }
  std::ostringstream summary;
  try {
    summarize(samples, summary);
  } catch (const std::exception& error) {
    std::cerr << "pgrt-diag metrics: could not read the answer of " << url->target
              << " as pgrt's metrics: " << printable(error.what(), true)
              << " (use --raw to see it)\n";
    return exit_unreachable;
  }
  // Names from the endpoint are shown with their control bytes (a terminal's escape sequences)
  // replaced.
  std::string shown = summary.str();
  for (char& c : shown) {
    if ((static_cast<unsigned char>(c) < 0x20 && c != '\n') || c == 0x7f) c = '?';
  }
  std::cout << shown;
  return written();
}

}  // namespace pgrt::diag
