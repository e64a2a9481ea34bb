// Every C++ snippet of docs/usage.md, verbatim, so that the guide cannot drift from the API.
//
// tests/docs_snippets_test.cmake checks that each ```cpp block of docs/usage.md appears in this
// file character for character; building this file checks that the snippets compile. Edit a
// snippet in both places at once.
//
// The snippets need a server; main() does not call them. It only checks, without a server, the
// parts of the guide that need none: the user codec of the "Your own types" section and
// mask_password().

// ---- Preamble
#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <pgrt/db.hpp>

namespace asio = boost::asio;
using namespace std::chrono_literals;

// ---- Connecting
asio::awaitable<void> app() {
  const pgrt::ConnectOptions options{
      .conninfo =
          "postgresql://orders_app@db.internal:5432/orders"
          "?sslmode=verify-full&sslrootcert=/etc/ssl/certs/db-ca.pem",
      .application_name = "orders-api",
      .connect_timeout = 5s,
      .session_settings = {{"statement_timeout", "30s"}, {"TimeZone", "UTC"}},
      .keepalives = pgrt::TcpKeepalives{.idle = 30s, .interval = 10s, .count = 3},
      .tcp_user_timeout = 20s,
  };
  pgrt::Connection conn = co_await pgrt::Connection::connect(options);
  pgrt::Result version = co_await conn.query("SELECT version()");
  std::cout << "connected to " << version.scalar<std::string>() << " (backend pid "
            << conn.backend_pid() << ")\n";
}

// ---- Running the event loop
int run_application() {
  asio::io_context io;  // run by this thread only
  asio::co_spawn(io, app(), [](const std::exception_ptr& failure) {
    if (failure) std::rethrow_exception(failure);  // io.run() throws it
  });
  io.run();
  return 0;
}

asio::awaitable<pgrt::Connection> connect_from_environment() {
  const char* url = std::getenv("DATABASE_URL");
  const std::string conninfo = url != nullptr ? url : "";  // empty: PGHOST, PGUSER, ... or defaults
  const pgrt::ConnectOptions options{.conninfo = conninfo};
  try {
    co_return co_await pgrt::Connection::connect(options);
  } catch (const pgrt::Error& error) {
    std::cerr << "cannot connect to " << pgrt::mask_password(conninfo) << ": " << error.what()
              << '\n';
    throw;
  }
}

// ---- Queries and parameters
asio::awaitable<void> add_user(pgrt::Connection& conn, std::int64_t id, std::string name,
                               std::optional<std::string> email) {
  const std::uint64_t inserted = co_await conn.execute(
      "INSERT INTO users (id, name, email, active) VALUES ($1, $2, $3, $4)", id, name, email, true);
  std::cout << "inserted " << inserted << " user\n";  // std::nullopt email: stored as NULL
}

asio::awaitable<void> record_event(pgrt::Connection& conn) {
  co_await conn.execute("INSERT INTO events (day, amount, payload) VALUES ($1, $2, $3)",
                        "2024-05-01", "12.50", R"({"kind": "signup"})");
}

// ---- Reading results
asio::awaitable<void> print_team(pgrt::Connection& conn, std::int64_t team_id) {
  pgrt::Result users = co_await conn.query(
      "SELECT id, name, email FROM users WHERE team_id = $1 AND active = $2 ORDER BY id", team_id,
      true);
  for (pgrt::Row row : users) {
    const auto id = row.get<std::int64_t>(0);
    const auto name = row.get<std::string_view>("name");              // a view into `users`
    const auto email = row.get<std::optional<std::string>>("email");  // NULL: std::nullopt
    std::cout << id << ' ' << name << ' ' << email.value_or("(no email)") << '\n';
  }
  std::cout << users.size() << " rows; columns:";
  for (std::size_t i = 0; i < users.columns(); ++i) {
    const pgrt::Column column = users.column(i);
    std::cout << ' ' << column.name << " (" << pgrt::type_name(column.type) << ')';
  }
  std::cout << '\n';
}

asio::awaitable<void> deactivate_idle_users(pgrt::Connection& conn,
                                            std::chrono::system_clock::time_point cutoff) {
  pgrt::Result updated =
      co_await conn.query("UPDATE users SET active = false WHERE last_login < $1", cutoff);
  std::cout << updated.command_tag() << ": " << updated.affected_rows() << " users\n";

  pgrt::Result count = co_await conn.query("SELECT count(*) FROM users WHERE active");
  std::cout << count.scalar<std::int64_t>() << " active users left\n";
}

// ---- Types
asio::awaitable<void> save_avatar(pgrt::Connection& conn, std::int64_t user_id, pgrt::Bytes png) {
  co_await conn.execute("UPDATE users SET avatar = $1, avatar_at = $2 WHERE id = $3", png,
                        std::chrono::system_clock::now(), user_id);
  pgrt::Result saved =
      co_await conn.query("SELECT avatar, avatar_at FROM users WHERE id = $1", user_id);
  const auto avatar = saved[0].get<pgrt::Bytes>("avatar");
  const auto at = saved[0].get<std::chrono::system_clock::time_point>("avatar_at");
  std::cout << avatar.size() << " bytes saved at "
            << std::chrono::duration_cast<std::chrono::seconds>(at.time_since_epoch()).count()
            << '\n';
}

namespace shop {
struct OrderId {
  std::array<std::byte, 16> bytes{};
  bool operator==(const OrderId&) const = default;
};
}  // namespace shop

namespace pgrt {
template <>
struct Codec<shop::OrderId> {
  static constexpr std::string_view name = "shop::OrderId";

  // uuid's binary format is its 16 bytes.
  static void encode(const shop::OrderId& id, ParamSink& sink) { sink.binary(id.bytes, oid::uuid); }

  // Results arrive as text: "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".
  static shop::OrderId decode(const Field& field) {
    field.require_type({oid::uuid}, name);
    shop::OrderId id;
    std::size_t digits = 0;
    for (const char c : field.text) {
      if (c == '-') continue;
      unsigned value = 0;
      if (c >= '0' && c <= '9') {
        value = static_cast<unsigned>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        value = static_cast<unsigned>(c - 'a' + 10);
      } else {
        field.fail(name, "not a hexadecimal digit");
      }
      if (digits == 32) field.fail(name, "more than 32 digits");
      id.bytes[digits / 2] |= static_cast<std::byte>(digits % 2 == 0 ? value << 4U : value);
      ++digits;
    }
    if (digits != 32) field.fail(name, "fewer than 32 digits");
    return id;
  }
};
}  // namespace pgrt

asio::awaitable<std::optional<shop::OrderId>> ship_latest_order(pgrt::Connection& conn,
                                                                std::int64_t customer_id) {
  pgrt::Result latest = co_await conn.query(
      "SELECT id FROM orders WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 1", customer_id);
  if (latest.empty()) co_return std::nullopt;
  const auto id = latest.scalar<shop::OrderId>();
  co_await conn.execute("UPDATE orders SET shipped = true WHERE id = $1", id);
  co_return id;
}

// ---- Memory: Result and stream()
asio::awaitable<void> export_events(pgrt::Connection& conn, std::ostream& out,
                                    std::chrono::system_clock::time_point since) {
  const std::uint64_t exported = co_await conn.stream(
      "SELECT id, kind, payload FROM events WHERE created_at >= $1 ORDER BY id",
      [&out](const pgrt::Row& row) {
        out << row.get<std::int64_t>(0) << '\t' << row.get<std::string_view>(1) << '\t'
            << row.get<std::optional<std::string_view>>(2).value_or("") << '\n';
      },
      since);
  std::cout << "exported " << exported << " events\n";
}

// ---- Prepared statements
asio::awaitable<std::optional<std::string>> user_email(pgrt::Connection& conn,
                                                       std::int64_t user_id) {
  pgrt::Result found =
      co_await conn.query_prepared("SELECT email FROM users WHERE id = $1", user_id);
  if (found.empty()) co_return std::nullopt;
  co_return found.scalar<std::optional<std::string>>();
}

// ---- Transactions
asio::awaitable<void> transfer_by_hand(pgrt::Connection& conn, std::int64_t from, std::int64_t to,
                                       std::int64_t cents) {
  co_await conn.begin();
  std::exception_ptr failure;
  try {
    co_await conn.execute("UPDATE accounts SET cents = cents - $1 WHERE id = $2", cents, from);
    co_await conn.execute("UPDATE accounts SET cents = cents + $1 WHERE id = $2", cents, to);
    co_await conn.commit();
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) {
    const auto status = conn.transaction_status();
    if (status == pgrt::TransactionStatus::in_transaction ||
        status == pgrt::TransactionStatus::in_error) {
      co_await conn.rollback();
    }
    std::rethrow_exception(failure);
  }
}

asio::awaitable<std::int64_t> place_order(pgrt::Connection& conn, std::int64_t customer_id) {
  auto body = [customer_id](pgrt::Connection& tx) -> asio::awaitable<std::int64_t> {
    pgrt::Result order = co_await tx.query(
        "INSERT INTO orders (customer_id) VALUES ($1) RETURNING order_number", customer_id);
    co_await tx.execute("UPDATE customers SET orders = orders + 1 WHERE id = $1", customer_id);
    co_return order.scalar<std::int64_t>();
  };
  co_return co_await pgrt::transaction(conn, body);
}

asio::awaitable<std::int64_t> audited_balance(pgrt::Connection& conn, std::int64_t account_id) {
  auto body = [account_id](pgrt::Connection& tx) -> asio::awaitable<std::int64_t> {
    pgrt::Result balance = co_await tx.query(
        "SELECT coalesce(sum(cents), 0)::int8 FROM ledger WHERE account_id = $1", account_id);
    co_return balance.scalar<std::int64_t>();
  };
  const pgrt::TransactionOptions options{.isolation = pgrt::IsolationLevel::serializable,
                                         .read_only = true};
  for (int attempt = 1;; ++attempt) {
    try {
      co_return co_await pgrt::transaction(conn, body, options);
    } catch (const pgrt::Error& error) {
      const bool retry = error.code() == pgrt::condition::serialization_failure ||
                         error.code() == pgrt::condition::deadlock;
      if (!retry || attempt == 3) throw;
    }
  }
}

// ---- Pipelines
asio::awaitable<void> record_signups(pgrt::Connection& conn) {
  pgrt::Pipeline batch;
  batch.add("INSERT INTO users (id, name) VALUES ($1, $2)", 1, "alice")
      .add("INSERT INTO users (id, name) VALUES ($1, $2)", 2, "bob")
      .sync()  // segment 1: both users, or neither
      .add("UPDATE stats SET signups = signups + $1", 2)
      .sync();  // segment 2
  const std::vector<pgrt::PipelineOutcome> outcomes = co_await conn.run(batch);
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    const pgrt::PipelineOutcome& outcome = outcomes[i];
    if (outcome.ok()) {
      std::cout << i << ": " << outcome.result.affected_rows() << " rows\n";
    } else if (outcome.error == pgrt::client_errc::pipeline_aborted) {
      std::cout << i << ": skipped, an earlier statement of its segment failed\n";
    } else {
      std::cout << i << ": " << outcome.diagnostics.message << " [" << outcome.diagnostics.sqlstate
                << "]\n";
    }
  }
}

asio::awaitable<void> purge_one_off(pgrt::Connection& conn, const std::string& table) {
  pgrt::Pipeline cleanup;
  cleanup
      .prepare_statements(false)  // generated once, never run again: keep it out of the cache
      .add("DELETE FROM " + table + " WHERE expires_at < now()")
      .add("ANALYZE " + table);
  const std::vector<pgrt::PipelineOutcome> outcomes = co_await conn.run(cleanup);
  for (const pgrt::PipelineOutcome& outcome : outcomes) {
    if (!outcome.ok()) std::cout << outcome.diagnostics.message << "\n";
  }
}

// ---- COPY FROM STDIN
asio::awaitable<void> import_scores(pgrt::Connection& conn) {
  std::string data;
  const auto now = std::chrono::system_clock::now();
  pgrt::copy_text_row(data, 1, "alice", 9.5, now);
  pgrt::copy_text_row(data, 2, "bob\twith a tab", std::optional<double>{}, now);  // NULL score
  const std::uint64_t copied =
      co_await conn.copy_from("COPY scores (user_id, name, score, at) FROM STDIN", data);
  std::cout << "copied " << copied << " rows\n";
}

// ---- Errors
asio::awaitable<bool> create_user(pgrt::Connection& conn, std::int64_t id, std::string name) {
  try {
    co_await conn.execute("INSERT INTO users (id, name) VALUES ($1, $2)", id, name);
    co_return true;
  } catch (const pgrt::Error& error) {
    if (error.code() == pgrt::condition::unique_violation) {
      std::cout << "user " << id << " exists: " << error.diagnostics().detail << '\n';
      co_return false;
    }
    if (error.code() == pgrt::condition::connection_error) {
      std::cerr << "database unreachable [" << error.code() << "]\n";
    } else {
      std::cerr << "SQLSTATE " << error.sqlstate() << ": " << error.diagnostics().message << '\n';
    }
    throw;
  }
}

asio::awaitable<void> delete_user(pgrt::Connection& conn, std::int64_t id) {
  pgrt::ParamSink params;
  pgrt::encode_params(params, id);
  auto [error, deleted] =
      co_await conn.async_query("DELETE FROM users WHERE id = $1 RETURNING name", std::move(params),
                                asio::as_tuple(asio::use_awaitable));
  if (error) {
    const pgrt::Diagnostics& why = conn.last_error();
    std::cerr << "delete failed: " << why.message << " [" << error.message() << "]\n";
    co_return;
  }
  for (pgrt::Row row : deleted) std::cout << "deleted " << row.get<std::string_view>(0) << '\n';
}

// ---- Cancellation and timeouts
asio::awaitable<std::optional<pgrt::Result>> monthly_report(pgrt::Connection& conn, int month) {
  try {
    co_return co_await pgrt::with_timeout(conn.query("SELECT * FROM monthly_report($1)", month),
                                          2s);
  } catch (const pgrt::Error& error) {
    if (error.code() != pgrt::condition::timeout) throw;
  }
  // Cancelled on the server, or, if its answer was on the way, it ran (error.what() says
  // which). The connection is idle again, or closed if the server did not end the statement
  // within cancel_timeout.
  std::cerr << "report timed out; connection "
            << (conn.is_broken() ? "closed, reconnect" : "still usable") << '\n';
  co_return std::nullopt;
}

// ---- Threading
asio::awaitable<void> count_both(pgrt::Connection& orders_db, pgrt::Connection& users_db) {
  using namespace asio::experimental::awaitable_operators;
  auto [orders, users] = co_await (orders_db.query("SELECT count(*) FROM orders") &&
                                   users_db.query("SELECT count(*) FROM users"));
  std::cout << orders.scalar<std::int64_t>() << " orders, " << users.scalar<std::int64_t>()
            << " users\n";
}

// ---- Checks that need no server

#include <cstring>

namespace {

int failures = 0;

void check(bool ok, std::string_view what) {
  if (!ok) {
    std::cerr << "usage_snippets: FAILED: " << what << '\n';
    ++failures;
  }
}

// The field of a uuid column as Row::get() hands it to a codec.
pgrt::Field uuid_field(std::string_view text) {
  return pgrt::Field{.text = text, .type = pgrt::oid::uuid, .column_name = "id", .column_index = 0};
}

bool decode_fails(std::string_view text, pgrt::Oid type) {
  try {
    (void)pgrt::Codec<shop::OrderId>::decode(
        pgrt::Field{.text = text, .type = type, .column_name = "id", .column_index = 0});
  } catch (const pgrt::Error& error) {
    return error.code() == pgrt::client_errc::conversion;
  }
  return false;
}

void check_order_id_codec() {
  static_assert(pgrt::Encodable<shop::OrderId> && pgrt::Decodable<shop::OrderId>);
  static_assert(pgrt::Encodable<std::optional<shop::OrderId>>);

  const shop::OrderId id =
      pgrt::Codec<shop::OrderId>::decode(uuid_field("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
  check(id.bytes[0] == std::byte{0xa0} && id.bytes[1] == std::byte{0xee} &&
            id.bytes[15] == std::byte{0x11},
        "OrderId decodes a uuid's text");

  pgrt::ParamSink sink;
  pgrt::encode_params(sink, id, std::optional<shop::OrderId>{});
  check(sink.size() == 2, "OrderId encodes exactly one parameter");
  check(sink.types()[0] == pgrt::oid::uuid && sink.formats()[0] == 1 && sink.lengths()[0] == 16,
        "OrderId travels as a 16-byte binary uuid");
  const auto values = sink.values();
  check(values[0] != nullptr && std::memcmp(values[0], id.bytes.data(), id.bytes.size()) == 0,
        "OrderId's parameter holds its bytes");
  check(values[1] == nullptr, "an empty std::optional<OrderId> is NULL");

  check(decode_fails("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", pgrt::oid::uuid), "too short fails");
  check(decode_fails("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111", pgrt::oid::uuid), "too long fails");
  check(decode_fails("z0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", pgrt::oid::uuid), "bad digit fails");
  check(decode_fails("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", pgrt::oid::text), "wrong type fails");
}

void check_mask_password() {
  const std::string masked = pgrt::mask_password("postgresql://app:s3cret@db.internal/orders");
  check(masked.find("s3cret") == std::string::npos, "mask_password hides the password");
  check(masked.find("db.internal") != std::string::npos, "mask_password keeps the host");
}

}  // namespace

int main() {
  check_order_id_codec();
  check_mask_password();
  if (failures == 0) std::cout << "usage_snippets: the snippets compile and the checks pass\n";
  return failures == 0 ? 0 : 1;
}
