// pgrt demo: borrows a connection from the process-wide pool (micro preset), prints the server's
// version and exits.
//
// With DATABASE_URL unset it runs on a throwaway cluster that it starts and removes, also when it
// is interrupted with Ctrl+C (SIGINT) or SIGTERM. With DATABASE_URL set it uses that server.
//
//   pgrt_demo [--serve-seconds N]   keep running N seconds after connecting, as a service would
#include <atomic>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>

#include <pgrt/db.hpp>
#include <pgrt/runtime/version.hpp>
#include <pgrt/testing/temp_cluster.hpp>

namespace {

constexpr int exit_ok = 0;
constexpr int exit_failure = 1;
constexpr int exit_usage = 2;

struct Arguments {
  std::chrono::seconds serve_for{0};
};

std::optional<Arguments> parse_arguments(int argc, char** argv) {
  Arguments arguments;
  for (int i = 1; i < argc; ++i) {
    std::string_view argument = argv[i];
    if (argument == "--serve-seconds" && i + 1 < argc) {
      char* end = nullptr;
      long seconds = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || seconds < 0) {
        std::cerr << "pgrt_demo: --serve-seconds takes a whole number of seconds, got '" << argv[i]
                  << "'\n";
        return std::nullopt;
      }
      arguments.serve_for = std::chrono::seconds(seconds);
    } else {
      std::cerr << "pgrt_demo: unknown argument '" << argument << "'\n"
                << "usage: pgrt_demo [--serve-seconds N]\n"
                << "  DATABASE_URL  the server to use; unset: a throwaway local cluster\n";
      return std::nullopt;
    }
  }
  return arguments;
}

// Turns SIGINT and SIGTERM into a stop request, handled by a thread of its own, so every blocking
// step can end early and still clean up.
class SignalStop {
 public:
  SignalStop() {
    sigemptyset(&signals_);
    sigaddset(&signals_, SIGINT);
    sigaddset(&signals_, SIGTERM);
    // A shell starts background jobs with SIGINT ignored; an ignored signal is never delivered.
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
    pthread_sigmask(SIG_BLOCK, &signals_, nullptr);  // before any other thread exists
    waiter_ = std::jthread([this](const std::stop_token& finished) {
      const timespec poll_interval{0, 100'000'000};
      while (!finished.stop_requested()) {
        int signal_number = sigtimedwait(&signals_, nullptr, &poll_interval);
        if (signal_number > 0) {
          received_ = signal_number;
          std::lock_guard lock(mutex_);
          source_.request_stop();
          woken_.notify_all();
          if (callback_) callback_();
          return;
        }
      }
    });
  }
  [[nodiscard]] std::stop_token token() const { return source_.get_token(); }
  // Also called (on the signal thread) when a signal arrives.
  void on_signal(std::function<void()> callback) {
    std::lock_guard lock(mutex_);
    callback_ = std::move(callback);
    if (source_.stop_requested() && callback_) callback_();
  }
  [[nodiscard]] int received() const { return received_; }
  // Waits up to `duration`; false if a signal ended the wait.
  bool sleep_for(std::chrono::seconds duration) {
    std::unique_lock lock(mutex_);
    return !woken_.wait_for(lock, duration, [this] { return source_.stop_requested(); });
  }

 private:
  sigset_t signals_{};
  std::stop_source source_;
  std::atomic<int> received_{0};
  std::mutex mutex_;
  std::condition_variable woken_;
  std::function<void()> callback_;
  std::jthread waiter_;
};

int run(const Arguments& arguments, SignalStop& signal_stop) {
  std::unique_ptr<pgrt::testing::TempCluster> cluster;
  std::string conninfo;
  if (const char* url = std::getenv("DATABASE_URL"); url != nullptr && *url != '\0') {
    conninfo = url;
  } else {
    std::cout << "DATABASE_URL is unset: starting a throwaway PostgreSQL cluster" << std::endl;
    cluster = std::make_unique<pgrt::testing::TempCluster>(
        pgrt::testing::TempClusterOptions{.stop_token = signal_stop.token()});
    std::cout << "cluster ready in " << cluster->directory().string() << " (port "
              << cluster->port() << ")" << std::endl;
    conninfo = cluster->dsn();
  }

  // The query runs on an io_context; a signal stops it (the coroutine is then destroyed, which
  // closes the connection).
  boost::asio::io_context io;
  // A signal cancels the running coroutine (on its own thread, through the io_context), which then
  // closes the pool before io.run() returns: asio objects must go before their io_context.
  boost::asio::cancellation_signal interrupt;
  signal_stop.on_signal([&io, &interrupt] {
    boost::asio::post(io,
                      [&interrupt] { interrupt.emit(boost::asio::cancellation_type::terminal); });
  });
  int code = exit_failure;
  // The process-wide pool, micro preset (max 3 connections): what a small service on a
  // db-f1-micro instance would use.
  pgrt::PoolConfig pool_config = pgrt::PoolConfig::micro();
  pool_config.conninfo = conninfo;
  pool_config.application = "pgrt-demo";
  pool_config.acquire_timeout = std::chrono::seconds(3);  // a demo should fail fast
  pgrt::configure(std::move(pool_config));
  boost::asio::co_spawn(
      io,
      [&]() -> boost::asio::awaitable<void> {
        std::string failure;
        try {
          auto connection = co_await pgrt::connection();
          auto rows = co_await connection->query(
              "SELECT version(), current_user, current_database(), $1::text, "
              "current_setting('application_name')",
              "hello from pgrt");
          const pgrt::Row row = rows[0];
          std::cout << "pgrt " << pgrt::version_string() << " (libpq " << pgrt::libpq_version()
                    << ") connected to " << row.get<std::string_view>(2) << " as "
                    << row.get<std::string_view>(1) << " (application_name "
                    << row.get<std::string_view>(4) << ")\nserver: " << row.get<std::string_view>(0)
                    << "\nparameter round trip: " << row.get<std::string_view>(3) << std::endl;
        } catch (const std::exception& error) {  // the lease went back to the pool already
          // pgrt's messages say what failed and what to check, and never contain a password.
          failure = error.what();
        }
        std::cout << "pool: " << pgrt::pool().stats().to_json() << std::endl;
        // Closing the pool ends its background work, so io.run() returns; it must run even when
        // this coroutine was cancelled.
        co_await boost::asio::this_coro::throw_if_cancelled(false);
        co_await boost::asio::this_coro::reset_cancellation_state();
        co_await pgrt::shutdown_pool(std::chrono::seconds(1));
        if (!failure.empty()) {
          std::cerr << "pgrt_demo: " << failure << std::endl;
        } else {
          code = exit_ok;
        }
      },
      boost::asio::bind_cancellation_slot(interrupt.slot(), [](std::exception_ptr failure) {
        if (!failure) return;
        try {
          std::rethrow_exception(failure);
        } catch (const std::exception& error) {
          std::cerr << "pgrt_demo: " << error.what() << std::endl;
        }
      }));
  io.run();
  if (code != exit_ok) return code;

  if (arguments.serve_for.count() > 0) {
    std::cout << "serving for " << arguments.serve_for.count() << " s (Ctrl+C to stop)"
              << std::endl;
    signal_stop.sleep_for(arguments.serve_for);
  }
  return exit_ok;
}

}  // namespace

int main(int argc, char** argv) {
  auto arguments = parse_arguments(argc, argv);
  if (!arguments) return exit_usage;
  SignalStop signal_stop;
  int code = exit_failure;
  try {
    code = run(*arguments, signal_stop);
  } catch (const pgrt::testing::ClusterInterrupted&) {
    // Cleaned up already; reported below.
  } catch (const std::exception& error) {
    std::cerr << "pgrt_demo: " << error.what() << std::endl;
    code = exit_failure;
  }
  if (int signal_number = signal_stop.received(); signal_number != 0) {
    std::cout << "stopped by " << (signal_number == SIGINT ? "SIGINT" : "SIGTERM")
              << "; the throwaway cluster, if any, is removed" << std::endl;
    return 128 + signal_number;
  }
  return code;
}
