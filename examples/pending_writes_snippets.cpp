// The snippets of docs/pending_writes.md, compiled (pgrt_docs_pending_writes_snippets checks they
// appear here verbatim); the server-free one (the config) also runs.
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/signals2/connection.hpp>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include <pgrt/db.hpp>

namespace {

boost::asio::awaitable<void> start_up(pgrt::Pool& pool, boost::asio::any_io_executor executor) {
  // clang-format off
// at start-up, next to the pool:
pgrt::PendingWrites writes(pool, executor, {.name = "events", .capacity = 20'000});
co_await writes.start();
  // clang-format on
  co_await writes.stop();
}

boost::asio::awaitable<void> handle(pgrt::PendingWrites& writes, std::int64_t seq,
                                    std::string payload, std::int64_t counter_id) {
  // clang-format off
// in a request handler: each co_await returns once the write is accepted
auto events = writes.table<std::int64_t, std::string>("demo_events", {"seq", "payload"});
co_await events.append(seq, payload);
co_await writes.enqueue("UPDATE counters SET n = n + 1 WHERE id = $1", counter_id);
  // clang-format on
}

boost::asio::awaitable<void> shut_down(pgrt::PendingWrites& writes) {
  // clang-format off
// at shutdown: flushes everything accepted, or says how much was lost
try {
  co_await writes.stop();
} catch (const pgrt::Error& error) {
  if (error.code() != pgrt::client_errc::writes_failed) throw;
  std::cerr << error.what() << '\n';  // "... 3 of 120 accepted writes were not written: ..."
}
  // clang-format on
}

void configure() {
  // clang-format off
pgrt::PendingWritesConfig config{
    .name = "audit",
    .capacity = 50'000,
    .when_full = pgrt::PendingWritesConfig::WhenFull::fail,  // shed load instead of waiting
    .batch_size = 1'000,
    .flush_interval = std::chrono::milliseconds(250),
};
config.validate();
  // clang-format on
}

boost::asio::awaitable<void> pay(pgrt::PendingWrites& writes, std::string payment_id,
                                 std::int64_t account, double amount) {
  // clang-format off
co_await writes.enqueue(
    "INSERT INTO payments (id, account, amount) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
    payment_id, account, amount);
  // clang-format on
}

void subscribe(pgrt::PendingWrites& writes) {
  // clang-format off
boost::signals2::scoped_connection on_failed = writes.events().failed.connect(
    [](const std::vector<std::string>& lost, const pgrt::Error& error) {
      for (const auto& write : lost) std::cerr << "lost [" << error.sqlstate() << "] " << write << '\n';
    });
  // clang-format on
}

boost::asio::awaitable<void> stop_with_deadline(pgrt::PendingWrites& writes) {
  // clang-format off
try {
  co_await pgrt::with_timeout(writes.stop(), std::chrono::seconds(10));
} catch (const pgrt::Error& error) {
  const pgrt::PendingWritesReport report = writes.report();
  std::cerr << "pending writes: " << report.failed << " of " << report.accepted
            << " accepted writes lost (" << error.what() << ")\n";
}
  // clang-format on
}

}  // namespace

int main(int argc, char**) {
  configure();  // server-free: validates the documented config
  // The rest is compiled, not run: it needs a server.
  if (argc > 1) {
    boost::asio::io_context io;
    pgrt::Pool pool(io.get_executor(), pgrt::PoolConfig{});
    pgrt::PendingWrites writes(pool, io.get_executor());
    subscribe(writes);
    auto started = start_up(pool, io.get_executor());
    auto handled = handle(writes, 1, "x", 1);
    auto paid = pay(writes, "p-1", 1, 9.5);
    auto stopped = shut_down(writes);
    auto deadline = stop_with_deadline(writes);
    (void)started, (void)handled, (void)paid, (void)stopped, (void)deadline;
  }
  return 0;
}
