// The snippets of docs/pool.md, compiled (pgrt_docs_snippets checks they appear here verbatim).
#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <string_view>

#include <pgrt/db.hpp>

namespace {

void use(std::string_view name) {
  (void)name;
}

void configure_once() {
  // clang-format off
// main(), once:
pgrt::configure(pgrt::PoolConfig::from_env());   // DATABASE_URL + PGRT_* variables
                                                  // clang-format on
}

// clang-format off
// anywhere in an async service:
boost::asio::awaitable<void> handle(std::int64_t id) {
  auto conn = co_await pgrt::connection();        // a Lease; waits FIFO when all are busy
  auto rows = co_await conn->query("SELECT name FROM users WHERE id = $1", id);
  for (const pgrt::Row row : rows) use(row.get<std::string_view>(0));
}                                                  // returned here, also on throw or cancel
// clang-format on

pgrt::PoolConfig shared_by_two_scrapers() {
  // clang-format off
pgrt::PoolConfig config = pgrt::PoolConfig::micro();          // max 3
config.consumers = {{.name = "scraper-a", .min = 1, .max = 2},
                    {.name = "scraper-b", .min = 1, .max = 2}};
  // clang-format on
  return config;
}

// clang-format off
boost::asio::awaitable<void> scrape(pgrt::Pool& pool) {
  auto conn = co_await pool.acquire("scraper-a");   // or pgrt::connection("scraper-a")
  co_await conn->execute("UPDATE pages SET seen = now() WHERE id = 1");
}
// clang-format on

boost::asio::awaitable<std::string> user_name(std::int64_t id) {
  auto rows = co_await pgrt::query("SELECT name FROM users WHERE id = $1", id);
  co_return rows.scalar<std::string>();
}

}  // namespace

int main(int argc, char**) {
  // Compiled, not run against a server: configuring needs DATABASE_URL.
  if (argc > 1) {
    configure_once();
    auto coroutine = handle(1);
    (void)coroutine;
    pgrt::Pool pool(shared_by_two_scrapers());
    auto scraping = scrape(pool);
    (void)scraping;
    auto name = user_name(1);
    (void)name;
  }
  return 0;
}
