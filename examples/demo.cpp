// pgrt demo: a small service. N worker coroutines read through `co_await pgrt::connection()` on
// the process-wide pool (micro preset: max 3 connections) and write one row per request through
// pending writes into `demo_events`. A status line every second; on Ctrl+C, SIGTERM or after
// --duration it shuts down in order, logging each phase (readiness false, intake stopped, pending
// writes flushed, workers stopped, pool closed), and prints a final report.
//
//   pgrt_demo [--duration SECONDS] [--workers N] [--json]
//
// DATABASE_URL: the server; unset, a throwaway local cluster is started (and removed, also when
// interrupted). PGRT_* variables override the pool (PGRT_POOL_MAX, PGRT_APP, PGRT_INSTANCE, ...).
// Exit codes: 0 stopped by SIGTERM or --duration, 130 by SIGINT, 129 by SIGHUP, 1 a failure (a
// start failed, a write accepted but not written), 2 bad arguments or the shutdown overran its hard
// deadline.
#include <algorithm>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sstream>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>

#include <pgrt/db.hpp>
#include <pgrt/lifecycle.hpp>
#include <pgrt/service.hpp>
#include <pgrt/testing/temp_cluster.hpp>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using pgrt::lifecycle::after;

constexpr int exit_usage = 2;

// With --json, stdout carries the JSON report only: everything meant for a human goes to stderr.
bool json_report = false;
std::ostream& human() {
  return json_report ? std::cerr : std::cout;
}

struct Arguments {
  std::optional<std::chrono::seconds> duration;
  std::size_t workers = 200;
  bool json = false;
  std::optional<std::uint16_t> metrics_port;
};

std::optional<std::size_t> parse_count(const char* text, std::size_t max) {
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || value < 0 || static_cast<unsigned long long>(value) > max) {
    return std::nullopt;
  }
  return static_cast<std::size_t>(value);
}

std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  const char* usage =
      "usage: pgrt_demo [--duration SECONDS] [--workers N] [--metrics-port PORT] [--json]\n"
      "                 [--help]\n"
      "  Serves N workers (default 200) on the process-wide pool, writing through pending\n"
      "  writes, until Ctrl+C, SIGTERM or --duration; then reports what was written.\n"
      "  --duration    stop after SECONDS (0-86400)\n"
      "  --workers     how many worker coroutines (1-100000)\n"
      "  --metrics-port  serve /metrics, /healthz and /readyz on 127.0.0.1:PORT (0: a free\n"
      "                port, logged; PGRT_METRICS_ADDRESS binds another address)\n"
      "  --json        stdout carries one JSON report only; everything else goes to stderr\n"
      "  DATABASE_URL  the server to use; unset: a throwaway local cluster (removed at exit)\n"
      "  PGRT_*        pool settings (see docs/pool.md), e.g. PGRT_POOL_MAX, PGRT_APP\n"
      "exit codes: 0 stopped gracefully, 1 failure or lost write, 2 usage, 78 malformed\n"
      "            configuration, 130 SIGINT\n";
  for (int i = 1; i < argc; ++i) {
    const std::string_view argument = argv[i];
    if (argument == "--duration" && i + 1 < argc) {
      auto seconds = parse_count(argv[++i], 86'400);
      if (!seconds) {
        std::cerr << "pgrt_demo: --duration takes whole seconds (0-86400), got '" << argv[i]
                  << "'\n";
        return std::nullopt;
      }
      arguments.duration = std::chrono::seconds(*seconds);
    } else if (argument == "--workers" && i + 1 < argc) {
      auto workers = parse_count(argv[++i], 100'000);
      if (!workers || *workers == 0) {
        std::cerr << "pgrt_demo: --workers takes a count (1-100000), got '" << argv[i] << "'\n";
        return std::nullopt;
      }
      arguments.workers = *workers;
    } else if (argument == "--metrics-port" && i + 1 < argc) {
      auto port = parse_count(argv[++i], 65'535);
      if (!port) {
        std::cerr << "pgrt_demo: --metrics-port takes a port (0-65535), got '" << argv[i] << "'\n";
        return std::nullopt;
      }
      arguments.metrics_port = static_cast<std::uint16_t>(*port);
    } else if (argument == "--json") {
      arguments.json = true;
    } else if (argument == "--help" || argument == "-h") {
      std::cout << usage;
      std::exit(0);  // NOLINT(concurrency-mt-unsafe): single-threaded here
    } else {
      std::cerr << "pgrt_demo: unknown argument '" << argument << "'\n" << usage;
      return std::nullopt;
    }
  }
  return arguments;
}

// While the throwaway cluster starts (before the lifecycle manager owns the signals), SIGINT and
// SIGTERM are blocked and taken by a thread of their own, which stops the start-up cleanly.
class StartupSignals {
 public:
  StartupSignals() {
    sigemptyset(&signals_);
    sigaddset(&signals_, SIGINT);
    sigaddset(&signals_, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals_, nullptr);  // before any other thread exists
    waiter_ = std::jthread([this](const std::stop_token& finished) {
      const timespec poll_interval{0, 50'000'000};
      while (!finished.stop_requested()) {
        if (const int number = sigtimedwait(&signals_, nullptr, &poll_interval); number > 0) {
          received_ = number;
          source_.request_stop();
          return;
        }
      }
    });
  }
  StartupSignals(const StartupSignals&) = delete;
  StartupSignals& operator=(const StartupSignals&) = delete;
  StartupSignals(StartupSignals&&) = delete;
  StartupSignals& operator=(StartupSignals&&) = delete;
  ~StartupSignals() { hand_over(); }

  [[nodiscard]] std::stop_token token() const { return source_.get_token(); }
  [[nodiscard]] int received() const { return received_; }
  // Ends the thread and unblocks the signals: a signal that arrived meanwhile is delivered now,
  // to whoever handles it then (the lifecycle manager's signal_set).
  void hand_over() {
    if (!waiter_.joinable()) return;
    waiter_.request_stop();
    waiter_.join();
    pthread_sigmask(SIG_UNBLOCK, &signals_, nullptr);
  }

 private:
  sigset_t signals_{};
  std::stop_source source_;
  std::atomic<int> received_{0};
  std::jthread waiter_;
};

// Failed requests, logged so that an outage gives a bounded log: the first error of a kind (its
// error code) at once, then at most one line per kind every 10 s saying how many more there were.
// One spdlog line per report (lines from several threads never interleave), newlines folded.
class ErrorLog {
 public:
  static constexpr std::chrono::seconds window{10};

  void report(const pgrt::Error& error) {
    const auto now = std::chrono::steady_clock::now();
    const std::string kind =
        std::string(error.code().category().name()) + ":" + std::to_string(error.code().value());
    const std::lock_guard lock(mutex_);
    auto [entry, first] = kinds_.try_emplace(kind);
    if (!first && now - entry->second.since < window) {
      ++entry->second.suppressed;
      return;
    }
    say_suppressed(kind, entry->second);
    entry->second = {now, 0};
    std::string line = error.what();
    std::replace(line.begin(), line.end(), '\n', ' ');
    spdlog::warn("pgrt-demo: request failed: {}", line);
  }

  // Says the counts whose window has passed (all of them with `everything`): called every second,
  // and at the end.
  void flush(bool everything = false) {
    const auto now = std::chrono::steady_clock::now();
    const std::lock_guard lock(mutex_);
    for (auto& [kind, entry] : kinds_) {
      if (everything || now - entry.since >= window) {
        say_suppressed(kind, entry);
        entry.suppressed = 0;
      }
    }
  }

 private:
  struct Kind {
    std::chrono::steady_clock::time_point since;
    std::uint64_t suppressed = 0;
  };
  static void say_suppressed(const std::string& kind, const Kind& entry) {
    if (entry.suppressed == 0) return;
    spdlog::warn("pgrt-demo: ... and {} more failed requests like it ({}) in the last {} s",
                 entry.suppressed, kind,
                 std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() -
                                                                  entry.since)
                     .count());
  }
  std::mutex mutex_;
  std::map<std::string, Kind> kinds_;
};

struct Counters {
  std::atomic<std::uint64_t> requests{0};
  std::atomic<std::uint64_t> errors{0};
  std::atomic<int> max_backends{0};
  ErrorLog error_log;
};

asio::awaitable<void> sleep_for(std::chrono::milliseconds duration) {
  asio::steady_timer timer(co_await asio::this_coro::executor, duration);
  co_await timer.async_wait(asio::use_awaitable);
}

// Creates demo_events before the writers start.
struct Schema {
  [[nodiscard]] std::string name() const { return "schema"; }
  asio::awaitable<void> start() {
    auto connection = co_await pgrt::connection();
    try {
      co_await connection->execute(
          "CREATE TABLE IF NOT EXISTS demo_events (run text NOT NULL, seq bigint NOT NULL, "
          "payload text NOT NULL, written_at timestamptz NOT NULL DEFAULT now(), "
          "PRIMARY KEY (run, seq))");
    } catch (const pgrt::Error& error) {
      // Two demos creating it at once: one of them loses the race, and the table exists.
      if (error.code() != pgrt::condition::unique_violation) throw;
    }
  }
  asio::awaitable<void> stop() { co_return; }
};

// Idempotent: pending writes are at-least-once (a batch whose COMMIT was lost is sent again), and
// a repeated row then changes nothing. A COPY append could not skip it (COPY has no ON CONFLICT).
constexpr std::string_view insert_event =
    "INSERT INTO demo_events (run, seq, payload) VALUES ($1, $2, $3) "
    "ON CONFLICT (run, seq) DO NOTHING";

// The front door, phase 2 of the shutdown. A worker takes a request only through enter(); as a
// shutdown begins, stop_intake() closes the door, and stop() waits until the requests already
// inside have finished, their writes accepted. Only then do the pending writes flush (phase 3).
class Intake {
 public:
  [[nodiscard]] std::string name() const { return "intake"; }
  asio::awaitable<void> start() {
    open_ = true;
    co_return;
  }
  void stop_intake() { closed_ = true; }
  asio::awaitable<void> stop() {
    closed_ = true;
    while (inside_ > 0) co_await sleep_for(1ms);
    spdlog::info("pgrt-demo: shutdown phase 2: intake stopped, the requests in flight finished");
  }

  // Whether a request may begin now; if so, leave() must follow when it has ended.
  [[nodiscard]] bool enter() {
    ++inside_;  // before the check, so that stop() cannot miss a request that got in
    if (open_ && !closed_) return true;
    --inside_;
    return false;
  }
  void leave() { --inside_; }
  [[nodiscard]] bool closed() const { return closed_; }

 private:
  std::atomic<bool> open_{false};
  std::atomic<bool> closed_{false};
  std::atomic<std::size_t> inside_{0};
};

// The service's work: each worker takes requests through the intake; a request reads through the
// pool, then writes one row through pending writes. The workers start idle (the intake opens
// last) and end once the intake has closed; stop() (phase 4, after the flush) joins them.
class Workers {
 public:
  Workers(asio::any_io_executor executor, std::size_t count, Intake& intake,
          std::shared_ptr<pgrt::PendingWrites> writes, std::string run, Counters& counters)
      : executor_(std::move(executor)),
        count_(count),
        intake_(intake),
        writes_(std::move(writes)),
        run_(std::move(run)),
        counters_(counters) {}

  [[nodiscard]] std::string name() const { return "workers"; }

  asio::awaitable<void> start() {
    for (std::size_t i = 0; i < count_; ++i) {
      ++running_;
      asio::co_spawn(executor_, work(), [this](const std::exception_ptr& failure) {
        if (failure) {
          try {
            std::rethrow_exception(failure);
          } catch (const std::exception& error) {
            std::cerr << "pgrt_demo: a worker failed: " << error.what() << std::endl;
          }
        }
        --running_;
      });
    }
    co_return;
  }

  asio::awaitable<void> stop() {
    stopping_ = true;  // also ends workers still waiting for an intake that never opened
    while (running_ > 0) co_await sleep_for(5ms);
    counters_.error_log.flush(/*everything=*/true);
    spdlog::info("pgrt-demo: shutdown phase 4: workers stopped, {} coroutines joined", count_);
  }

 private:
  // Leaves the intake when the request ends, however it ends.
  class Inside {
   public:
    explicit Inside(Intake& intake) : intake_(intake) {}
    Inside(const Inside&) = delete;
    Inside& operator=(const Inside&) = delete;
    Inside(Inside&&) = delete;
    Inside& operator=(Inside&&) = delete;
    ~Inside() { intake_.leave(); }

   private:
    Intake& intake_;
  };

  asio::awaitable<void> work() {
    while (!stopping_) {
      if (!intake_.enter()) {
        if (intake_.closed()) co_return;  // the shutdown began: this worker is done
        co_await sleep_for(10ms);         // not open yet
        continue;
      }
      bool back_off = false;
      {
        const Inside inside{intake_};
        try {
          co_await serve_one();
        } catch (const pgrt::Error& error) {
          ++counters_.errors;
          if (error.code() == pgrt::client_errc::writes_closed ||
              error.code() == pgrt::client_errc::pool_closed) {
            co_return;
          }
          counters_.error_log.report(error);
          back_off = true;
        }
      }
      if (back_off) co_await sleep_for(100ms);
    }
  }

  asio::awaitable<void> serve_one() {
    {
      auto connection = co_await pgrt::connection();
      const std::int64_t probe = static_cast<std::int64_t>(counters_.requests.load());
      auto rows = co_await connection->query("SELECT $1::bigint + 1", probe);
      if (rows[0].get<std::int64_t>(0) != probe + 1) throw std::logic_error("bad arithmetic");
    }  // the lease goes back before the write
    const std::int64_t seq = ++next_seq_;
    std::string payload = "request " + std::to_string(seq) + " of " + run_;
    co_await writes_->enqueue(std::string(insert_event), run_, seq, payload);
    ++counters_.requests;
  }

  asio::any_io_executor executor_;
  std::size_t count_;
  Intake& intake_;
  std::shared_ptr<pgrt::PendingWrites> writes_;
  std::string run_;
  Counters& counters_;
  std::atomic<bool> stopping_{false};
  std::atomic<std::size_t> running_{0};
  std::atomic<std::int64_t> next_seq_{0};
};

// Samples this pool's backends in pg_stat_activity (on a connection of its own, outside the
// pool) and prints a status line every second.
// Logs one line when it stops. Placed in the dependency graph so that it stops right after the
// component whose stop ends a shutdown phase: the phases the demo's own components do not log.
struct PhaseLog {
  std::string component_name;
  std::function<std::string()> line;
  [[nodiscard]] std::string name() const { return component_name; }
  asio::awaitable<void> start() { co_return; }
  asio::awaitable<void> stop() {
    spdlog::info("pgrt-demo: {}", line());
    co_return;
  }
};

class Status {
 public:
  Status(asio::any_io_executor executor, std::string conninfo, pgrt::Pooler pooler,
         std::string pool_tag, std::shared_ptr<pgrt::PendingWrites> writes, Counters& counters)
      : executor_(std::move(executor)),
        conninfo_(std::move(conninfo)),
        pooler_(pooler),
        pool_tag_(std::move(pool_tag)),
        writes_(std::move(writes)),
        counters_(counters) {}

  [[nodiscard]] std::string name() const { return "status"; }

  asio::awaitable<void> start() {
    // Connected on the service's executor (start() runs on the manager's strand). A server slow
    // to answer (a loaded machine) does not fail the start: the sampler connects again as it
    // does after a loss. A mistake (a wrong DSN or password) does.
    try {
      observer_ = co_await asio::co_spawn(executor_, connect(), asio::use_awaitable);
    } catch (const pgrt::Error& error) {
      if (error.code() != pgrt::condition::connection_error &&
          error.code() != pgrt::condition::timeout) {
        throw;
      }
      std::cerr << "pgrt_demo: the status sampler could not connect yet (" << error.what()
                << "); it tries again" << std::endl;
    }
    running_ = true;
    asio::co_spawn(executor_, sample(), [this](const std::exception_ptr& failure) {
      if (failure) {
        try {
          std::rethrow_exception(failure);
        } catch (const std::exception& error) {
          std::cerr << "pgrt_demo: the status sampler stopped: " << error.what() << std::endl;
        }
      }
      running_ = false;
    });
  }

  asio::awaitable<void> stop() {
    stopping_ = true;
    while (running_) co_await sleep_for(5ms);
    observer_.close();
  }

 private:
  asio::awaitable<pgrt::Connection> connect() const {
    pgrt::ConnectOptions options;
    options.conninfo = conninfo_;
    options.pooler = pooler_;
    // This run's tag, as the pool's connections carry: a crashed run's observer is a leftover
    // that the next start's cleanup terminates, like its pool's.
    options.application_name = pool_tag_;
    options.connect_timeout = 2s;
    co_return co_await pgrt::Connection::connect(std::move(options));
  }

  // One status line a second, and the most backends of the pool seen on the server. A lost
  // observer connection is said once and reconnected with a growing pause (100 ms to 2 s); the
  // lines go on meanwhile, without the backend count.
  asio::awaitable<void> sample() {
    const std::string count_sql =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> "
        "pg_backend_pid()";
    auto last_print = std::chrono::steady_clock::now();
    std::uint64_t last_requests = 0;
    std::chrono::milliseconds pause = 20ms;
    while (!stopping_) {
      std::optional<int> backends;
      std::string failure;
      try {
        if (!observer_.is_open()) {
          observer_ = co_await connect();
          std::cerr << "pgrt_demo: the status sampler reconnected" << std::endl;
        }
        auto rows = co_await observer_.query(count_sql, pool_tag_);
        backends = static_cast<int>(rows[0].get<std::int64_t>(0));
        counters_.max_backends = std::max(counters_.max_backends.load(), *backends);
        pause = 20ms;
      } catch (const pgrt::Error& error) {
        failure = error.what();
      }
      if (!failure.empty()) {
        if (observer_.is_open() || pause == 20ms) {
          std::cerr << "pgrt_demo: the status sampler lost its connection (" << failure
                    << "); reconnecting" << std::endl;
        }
        observer_.close();
        pause = std::clamp(pause * 2, 100ms, std::chrono::milliseconds(2s));
      }
      const auto now = std::chrono::steady_clock::now();
      if (now - last_print >= 1s) {
        counters_.error_log.flush();
        const auto seconds = std::chrono::duration<double>(now - last_print).count();
        const std::uint64_t requests = counters_.requests;
        const auto pool = pgrt::pool().stats();
        const auto writes = writes_->report();
        std::ostringstream line;
        line.precision(1);
        line << std::fixed << "requests/s "
             << static_cast<double>(requests - last_requests) / seconds << " | pool in use "
             << pool.in_use << ", idle " << pool.idle << ", waiting "
             << pool.waiting_normal + pool.waiting_high << " | acquire wait p99 "
             << static_cast<double>(pool.wait_p99.count()) / 1000.0 << " ms | pending writes "
             << writes.pending << " (flushed " << writes.flushed << ") | backends "
             << (backends ? std::to_string(*backends) : std::string("? (reconnecting)")) << " (max "
             << counters_.max_backends << ")";
        human() << line.str() << std::endl;
        last_print = now;
        last_requests = requests;
      }
      co_await sleep_for(pause);
    }
  }

  asio::any_io_executor executor_;
  std::string conninfo_;
  pgrt::Pooler pooler_;
  std::string pool_tag_;
  std::shared_ptr<pgrt::PendingWrites> writes_;
  Counters& counters_;
  pgrt::Connection observer_;
  std::atomic<bool> running_{false};
  std::atomic<bool> stopping_{false};
};

std::string exit_reason(const std::string& stop_reason) {
  if (stop_reason == "SIGTERM") return "sigterm";
  if (stop_reason == "SIGINT") return "sigint";
  if (stop_reason == "SIGHUP") return "sighup";
  if (stop_reason == "duration") return "duration";
  if (stop_reason.empty()) return "unknown";
  return "start_failed";
}

int run_service(const Arguments& arguments, const std::string& conninfo,
                StartupSignals& startup_signals) {
  pgrt::lifecycle::Manager app({.name = "pgrt-demo", .threads = 2});
  // The manager's signal_set exists now: it takes SIGINT and SIGTERM from here on, including one
  // that arrived while they were blocked.
  startup_signals.hand_over();

  // The process-wide pool: micro (max 3) unless PGRT_POOL_PRESET or PGRT_* say otherwise.
  pgrt::PoolConfig defaults = pgrt::PoolConfig::micro();
  defaults.application = "pgrt-demo";
  defaults.acquire_timeout = 5s;  // a demo should fail fast
  pgrt::PoolConfig pool_config = pgrt::PoolConfig::from_env(defaults);
  if (!conninfo.empty()) pool_config.conninfo = conninfo;
  // One demo per app/instance; the leftovers of a crashed predecessor are terminated first.
  auto& hygiene = pgrt::add_startup_hygiene(app, pool_config);
  // What a metrics reader sees; served with --metrics-port by an endpoint that the pool depends
  // on, so that it stops last: /readyz goes false at the first signal while /metrics still shows
  // the drain.
  auto metrics = std::make_shared<pgrt::Metrics>();
  pgrt::lifecycle::After pool_dependencies = after(hygiene);
  if (arguments.metrics_port) {
    auto endpoint_options = pgrt::MetricsEndpointOptions::from_env();
    endpoint_options.port = *arguments.metrics_port;
    auto& endpoint = pgrt::add_metrics_endpoint(app, metrics, endpoint_options);
    pool_dependencies.names.push_back(endpoint.name());
  }
  // Stops right after the pool (the pool depends on it): the end of shutdown phase 5.
  auto& pool_closed =
      app.add(PhaseLog{"pool_closed_log",
                       [] { return std::string("shutdown phase 5: the pool is closed"); }},
              pool_dependencies);
  pool_dependencies.names.push_back(pool_closed.name());
  auto& pool =
      pgrt::add_pool(app, pool_config, pgrt::PoolComponentOptions::from_env(), pool_dependencies);
  const std::string run = pgrt::pool().application_name();
  // Warns once when the pool or the server crosses a threshold, and once when it clears.
  auto& watchdog = pgrt::add_watchdog(app, after(pool));
  metrics->add_process_pool();
  metrics->add_watchdog(watchdog);

  auto& schema = app.add(Schema{}, after(pool));
  auto writes = std::make_shared<pgrt::PendingWrites>(pgrt::pool(), app.executor(),
                                                      pgrt::PendingWritesConfig{});
  // The shutdown stops along the reverse dependencies: the intake (phase 2), the pending writes,
  // flushed (3), the workers (4), the pool (5). So the writes start after the workers, and the
  // intake opens last.
  Counters counters;
  auto& intake = app.add(std::make_shared<Intake>(), after(*writes));
  auto& workers = app.add(
      std::make_shared<Workers>(app.executor(), arguments.workers, intake, writes, run, counters),
      after(pool));
  // Stops after the pending writes and before the workers: the end of shutdown phase 3.
  auto& writes_flushed = app.add(PhaseLog{"writes_flushed_log",
                                          [writes] {
                                            const auto report = writes->report();
                                            return "shutdown phase 3: pending writes stopped, " +
                                                   std::to_string(report.flushed) + " of " +
                                                   std::to_string(report.accepted) +
                                                   " accepted writes flushed";
                                          }},
                                 after(workers));
  app.add(writes, after(pool, schema, workers, writes_flushed));
  metrics->add_pending_writes("demo", *writes);
  app.add(std::make_shared<Status>(app.executor(), pool_config.conninfo, pool_config.connect.pooler,
                                   run, writes, counters),
          after(pool, *writes));
  app.on_stopping([&] {
    spdlog::info("pgrt-demo: shutdown phase 1: readiness false ({})", app.stop_reason());
  });

  app.on_ready([&] {
    human() << "serving: " << arguments.workers << " workers on pool " << run << " (max "
            << pgrt::pool().config().max_size << "); Ctrl+C or SIGTERM stops" << std::endl;
    if (arguments.duration) {
      asio::co_spawn(
          app.executor(),
          [&app, duration = *arguments.duration]() -> asio::awaitable<void> {
            co_await sleep_for(std::chrono::duration_cast<std::chrono::milliseconds>(duration));
            app.request_stop(pgrt::lifecycle::exit_code::ok, "duration");
          },
          asio::detached);
    }
  });

  const int code = app.run();
  // spdlog is shut down now: report on stdout.
  const auto report = writes->report();
  const std::string reason = exit_reason(app.stop_reason());
  if (arguments.json) {
    std::cout << R"({"writes_accepted":)" << report.accepted << R"(,"writes_flushed":)"
              << report.flushed << R"(,"writes_failed":)" << report.failed
              << R"(,"writes_unconfirmed":)" << report.unconfirmed << R"(,"max_backends_observed":)"
              << counters.max_backends << R"(,"exit_reason":")" << reason << R"(","exit_code":)"
              << code << R"(,"requests":)" << counters.requests << R"(,"run":")" << run << "\"}"
              << std::endl;
  } else {
    human() << "stopped (" << reason << ", exit code " << code << "): " << counters.requests
            << " requests; writes accepted " << report.accepted << ", flushed " << report.flushed
            << ", failed " << report.failed
            << (report.unconfirmed > 0
                    ? " (" + std::to_string(report.unconfirmed) + " of them may be stored)"
                    : std::string())
            << "; at most " << counters.max_backends << " backends of the pool seen on the server"
            << std::endl;
  }
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  auto arguments = parse_arguments(argc, argv);
  if (!arguments) return exit_usage;
  json_report = arguments->json;
  // Logs go to stderr: stdout is for the status lines and the report.
  spdlog::set_default_logger(spdlog::stderr_color_mt("pgrt-demo"));
  try {
    StartupSignals startup_signals;
    std::unique_ptr<pgrt::testing::TempCluster> cluster;
    // Says when the throwaway cluster goes, however main() ends.
    struct AnnouncedRemoval {
      std::unique_ptr<pgrt::testing::TempCluster>& cluster;
      explicit AnnouncedRemoval(std::unique_ptr<pgrt::testing::TempCluster>& owned)
          : cluster(owned) {}
      AnnouncedRemoval(const AnnouncedRemoval&) = delete;
      AnnouncedRemoval& operator=(const AnnouncedRemoval&) = delete;
      ~AnnouncedRemoval() {
        if (!cluster) return;
        human() << "removing the throwaway cluster " << cluster->directory().string() << std::endl;
        cluster.reset();
        human() << "the throwaway cluster is removed" << std::endl;
      }
    } removal{cluster};
    std::string conninfo;
    // (Set but empty, it is refused by PoolConfig::from_env(), naming it: not taken as unset.)
    if (std::getenv("DATABASE_URL") == nullptr) {
      human() << "DATABASE_URL is unset: starting a throwaway PostgreSQL cluster" << std::endl;
      try {
        cluster = std::make_unique<pgrt::testing::TempCluster>(
            pgrt::testing::TempClusterOptions{.stop_token = startup_signals.token()});
      } catch (const pgrt::testing::ClusterInterrupted&) {
        const int number = startup_signals.received();
        human() << "stopped by " << (number == SIGINT ? "SIGINT" : "SIGTERM")
                << " while the cluster started; it is removed" << std::endl;
        return 128 + number;
      }
      human() << "cluster ready in " << cluster->directory().string() << " (port "
              << cluster->port() << ")" << std::endl;
      conninfo = cluster->dsn();
    }
    return run_service(*arguments, conninfo, startup_signals);
  } catch (const std::exception& error) {
    // A malformed setting (exit code 78) is not worth a restart; pgrt's messages never carry a
    // password.
    std::cerr << "pgrt_demo: " << error.what() << std::endl;
    return pgrt::lifecycle::exit_code::for_error(std::current_exception());
  }
}
