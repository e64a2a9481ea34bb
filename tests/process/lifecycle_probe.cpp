// A service that misbehaves on purpose, for the lifecycle process tests:
//   lifecycle_probe hang-in-stop       a component blocks its thread in stop(): only the
//                                      watchdog can end the process (hard deadline 2 s)
//   lifecycle_probe exit-from-worker   a worker holding leases (one running pg_sleep(30)) calls
//                                      std::exit(3): the atexit handler must close the pool
//   lifecycle_probe exit-with-pending-writes  a component accepts 5 pending writes (not flushed
//                                      before stop()) and calls std::exit(0)
//   lifecycle_probe hold-connections   opens 3 pooled connections (one idle in a transaction),
//                                      prints "holding", and waits to be killed: a predecessor
//                                      whose leftovers a successor must clean up
//   lifecycle_probe singleton          a service with start-up hygiene (instance lock, cleanup)
//                                      and a pool, running until SIGTERM
//   lifecycle_probe budget-load        a pool of max 10 (PGRT_BUDGET_* from the environment)
//                                      under 30 tasks of short queries; prints "served <n>" every
//                                      100 ms until killed
// DATABASE_URL names the server; PGRT_APP and PGRT_INSTANCE tag the pool.
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>
#include <thread>
#include <unistd.h>

#include <pgrt/db.hpp>
#include <pgrt/lifecycle.hpp>
#include <pgrt/service.hpp>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;

struct Stuck {
  [[nodiscard]] std::string name() const { return "stuck"; }
  asio::awaitable<void> start() { co_return; }
  asio::awaitable<void> stop() {
    std::cout << "stuck: blocking in stop()" << std::endl;
    std::this_thread::sleep_for(1h);  // blocks the only thread: no deadline timer can fire
    co_return;
  }
};

// Holds two leases, one of them in a long statement, then exits from the middle of the service.
struct Quitter {
  asio::any_io_executor executor;
  [[nodiscard]] std::string name() const { return "quitter"; }
  asio::awaitable<void> start() {
    asio::co_spawn(
        executor,
        []() -> asio::awaitable<void> {
          auto sleeper = co_await pgrt::connection();
          try {
            co_await sleeper->query("SELECT pg_sleep(30)");
          } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): cut at exit
          }
        },
        asio::detached);
    asio::co_spawn(
        executor,
        []() -> asio::awaitable<void> {
          auto held = co_await pgrt::connection();
          asio::steady_timer timer(co_await asio::this_coro::executor, 300ms);
          co_await timer.async_wait(asio::use_awaitable);  // the sleeper is in its statement now
          std::cout << "quitter: calling std::exit(3) with " << pgrt::pool().stats().in_use
                    << " leases out" << std::endl;
          std::exit(3);  // NOLINT(concurrency-mt-unsafe): the point of this program
        },
        asio::detached);
    co_return;
  }
  asio::awaitable<void> stop() { co_return; }
};

// Has 5 writes accepted by the pending writes (not flushed before stop(): the interval is an
// hour), then exits from the middle of the service.
struct WriterThatQuits {
  std::shared_ptr<pgrt::PendingWrites> writes;
  [[nodiscard]] std::string name() const { return "writer_that_quits"; }
  asio::awaitable<void> start() {
    for (int i = 0; i < 5; ++i) co_await writes->enqueue("SELECT 1");
    std::cout << "writer: calling std::exit(0) with " << writes->report().pending
              << " accepted writes pending" << std::endl;
    std::exit(0);  // NOLINT(concurrency-mt-unsafe): the point of this program
  }
  asio::awaitable<void> stop() { co_return; }
};

}  // namespace

int exit_with_pending_writes() {
  pgrt::lifecycle::Manager app({.name = "probe", .threads = 1});
  pgrt::PoolConfig config = pgrt::PoolConfig::from_env(pgrt::PoolConfig::micro());
  auto& pool = pgrt::add_pool(app, config);
  auto writes = std::make_shared<pgrt::PendingWrites>(
      pgrt::pool(), app.executor(),
      pgrt::PendingWritesConfig{.name = "probe_writes",
                                .flush_interval = std::chrono::milliseconds(3'600'000)});
  app.add(writes, pgrt::lifecycle::after(pool));
  app.add(WriterThatQuits{writes}, pgrt::lifecycle::after(*writes));
  return app.run();
}

int hold_connections() {
  asio::io_context io;
  pgrt::Pool pool(io.get_executor(), pgrt::PoolConfig::from_env(pgrt::PoolConfig::micro()));
  asio::co_spawn(
      io,
      [&pool]() -> asio::awaitable<void> {
        auto first = co_await pool.acquire();
        auto second = co_await pool.acquire();
        auto third = co_await pool.acquire();
        co_await first->execute("BEGIN");
        co_await first->execute("SELECT 1");  // idle in transaction from here
        std::cout << "holding " << pool.application_name() << " pids " << first->backend_pid()
                  << "," << second->backend_pid() << "," << third->backend_pid() << std::endl;
        asio::steady_timer forever(co_await asio::this_coro::executor, 24h);
        co_await forever.async_wait(asio::use_awaitable);
      },
      asio::detached);
  io.run();
  return 0;
}

int singleton() {
  pgrt::lifecycle::Manager app({.name = "probe", .threads = 1});
  pgrt::PoolConfig config = pgrt::PoolConfig::from_env(pgrt::PoolConfig::micro());
  auto& hygiene = pgrt::add_startup_hygiene(app, config);
  pgrt::add_pool(app, config, {}, pgrt::lifecycle::after(hygiene));
  app.on_ready([] {
    std::cout << "probe: ready as pid " << ::getpid() << " with tag "
              << pgrt::pool().application_name() << std::endl;
  });
  return app.run();
}

int budget_load() {
  asio::io_context io;
  // The default connect backoff: a full budget is retried within 1 s whatever it says.
  pgrt::Pool pool(io.get_executor(), pgrt::PoolConfig::from_env(pgrt::PoolConfig::small()));
  std::uint64_t served = 0;
  for (int task = 0; task < 30; ++task) {
    asio::co_spawn(
        io,
        [&pool, &served]() -> asio::awaitable<void> {
          for (;;) {
            try {
              auto lease = co_await pool.acquire();
              co_await lease->execute("SELECT pg_sleep(0.005)");
              ++served;
            } catch (const pgrt::Error&) {  // budget_exhausted while others hold the slots
            }
          }
        },
        asio::detached);
  }
  asio::co_spawn(
      io,
      [&served]() -> asio::awaitable<void> {
        asio::steady_timer timer(co_await asio::this_coro::executor);
        for (;;) {
          timer.expires_after(std::chrono::milliseconds(100));
          co_await timer.async_wait(asio::use_awaitable);
          std::cout << "served " << served << std::endl;
        }
      },
      asio::detached);
  io.run();
  return 0;
}

int main(int argc, char** argv) {
  const std::string_view mode = argc == 2 ? argv[1] : "";
  if (mode == "hold-connections") return hold_connections();
  if (mode == "budget-load") return budget_load();
  if (mode == "singleton") return singleton();
  if (mode == "exit-with-pending-writes") return exit_with_pending_writes();
  if (mode != "hang-in-stop" && mode != "exit-from-worker") {
    std::cerr << "usage: lifecycle_probe hang-in-stop|exit-from-worker|hold-connections|singleton|"
                 "budget-load\n";
    return 64;
  }
  pgrt::lifecycle::Manager app({.name = "probe",
                                .threads = 1,
                                .stop_timeout = std::chrono::milliseconds(500),
                                .shutdown_budget = std::chrono::milliseconds(1500),
                                .hard_deadline = std::chrono::milliseconds(2000)});
  pgrt::PoolConfig config = pgrt::PoolConfig::from_env(pgrt::PoolConfig::micro());
  auto& pool = pgrt::add_pool(app, config);
  if (mode == "hang-in-stop") {
    app.add(Stuck{}, pgrt::lifecycle::after(pool));
    app.on_ready([&] { app.request_stop(0, "probe"); });
  } else {
    app.add(Quitter{app.executor()}, pgrt::lifecycle::after(pool));
  }
  app.on_ready(
      [] { std::cout << "probe: ready as " << pgrt::pool().application_name() << std::endl; });
  return app.run();
}
