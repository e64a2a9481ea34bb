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

}  // namespace

int main(int argc, char**) {
  // Compiled, not run against a server: configuring needs DATABASE_URL.
  if (argc > 1) {
    configure_once();
    auto coroutine = handle(1);
    (void)coroutine;
  }
  return 0;
}
