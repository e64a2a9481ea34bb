// The db layer against a real server: connect, types, errors, cancellation, pipelines,
// transactions, COPY, and faults.
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <limits>
#include <malloc.h>
#include <mutex>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <optional>
#include <set>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sstream>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

#include <pgrt/db.hpp>

#include "connection/name_lookup.hpp"
#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"
#include "pgrt/testing/expect_error.hpp"
#include "pgrt/testing/fault_proxy.hpp"
#include "pgrt/testing/run_coroutine.hpp"

// A user type plugged in through the customization point: PostgreSQL's point, as "(x,y)".
namespace geometry {
struct Point {
  double x = 0;
  double y = 0;
  bool operator==(const Point&) const = default;
};
}  // namespace geometry

template <>
struct pgrt::Codec<geometry::Point> {
  static constexpr std::string_view name = "geometry::Point";
  static constexpr Oid point_oid = 600;
  static void encode(const geometry::Point& point, ParamSink& sink) {
    sink.text("(" + std::to_string(point.x) + "," + std::to_string(point.y) + ")", point_oid);
  }
  static geometry::Point decode(const Field& field) {
    field.require_type({point_oid}, name);
    geometry::Point point;
    if (std::sscanf(std::string(field.text).c_str(), "(%lf,%lf)", &point.x, &point.y) != 2) {
      field.fail(name, "expected (x,y)");
    }
    return point;
  }
};

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::BlockingConnection;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::run_coroutine;
using awaitable_void = asio::awaitable<void>;

// A socket option of `conn`'s socket (getsockopt), or -1 if it cannot be read.
int socket_option(const Connection& conn, int level, int name) {
  int value = -1;
  socklen_t size = sizeof value;
  if (getsockopt(PQsocket(conn.native_handle()), level, name, &value, &size) != 0) return -1;
  return value;
}

class ConnectionTest : public testing::DbTest {
 protected:
  static ConnectOptions options() { return ConnectOptions{.conninfo = cluster().dsn()}; }
  static asio::awaitable<Connection> open() { return Connection::connect(options()); }
  // Runs "SELECT pg_sleep(0.2), 7" on `conn` in the background (prepared or not), and `misuse`
  // 20 ms into it; returns misuse's error once the running statement has its own answer.
  static asio::awaitable<Error> beside_a_running_statement(
      Connection& conn, bool prepared, std::function<asio::awaitable<Error>()> misuse) {
    auto executor = co_await asio::this_coro::executor;
    bool first_done = false;
    asio::co_spawn(
        executor,
        [&]() -> awaitable_void {
          const char* sql = "SELECT pg_sleep(0.2), 7";
          Result rows;  // (g++ 12: no co_await inside ?:)
          if (prepared) {
            rows = co_await conn.query_prepared(sql);
          } else {
            rows = co_await conn.query(sql);
          }
          EXPECT_EQ(rows[0].get<int>(1), 7);
          first_done = true;
        },
        asio::detached);
    co_await testing::sleep_for(20ms);
    Error error = co_await misuse();
    while (!first_done) co_await testing::sleep_for(10ms);
    co_return error;
  }
  // A connection through `proxy`, whose wind-down after a cancellation waits at most
  // `cancel_timeout`.
  static asio::awaitable<Connection> open_through(const testing::FaultProxy& proxy,
                                                  std::chrono::milliseconds cancel_timeout) {
    ConnectOptions through{.conninfo = proxy.conninfo_prefix() + " user=postgres dbname=postgres",
                           .cancel_timeout = cancel_timeout};
    return Connection::connect(std::move(through));
  }
};

// Note: option aggregates are built in named variables, never inside a co_await expression:
// g++ 12 miscompiles a braced temporary with std::string members there (its SSO buffers end up
// pointing into the wrong object).

using testing::expect_error;

// ---------------------------------------------------------------- types

TEST_F(ConnectionTest, EveryParameterTypeRoundTripsIncludingNulls) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto echo = [&](std::string_view cast, const auto& value) -> asio::awaitable<Result> {
      const std::string sql = "SELECT $1" + std::string(cast);
      co_return co_await conn.query(sql, value);
    };
    EXPECT_TRUE((co_await echo("", true)).scalar<bool>());
    EXPECT_FALSE((co_await echo("", false)).scalar<bool>());
    EXPECT_EQ((co_await echo("", std::int16_t{-32768})).scalar<std::int16_t>(), -32768);
    EXPECT_EQ((co_await echo("", std::int32_t{2147483647})).scalar<std::int32_t>(), 2147483647);
    EXPECT_EQ((co_await echo("", std::numeric_limits<std::int64_t>::min())).scalar<std::int64_t>(),
              std::numeric_limits<std::int64_t>::min());
    EXPECT_EQ((co_await echo("", std::uint32_t{4000000000})).scalar<std::uint32_t>(), 4000000000U);
    EXPECT_EQ(
        (co_await echo("", std::numeric_limits<std::uint64_t>::max())).scalar<std::uint64_t>(),
        std::numeric_limits<std::uint64_t>::max());
    EXPECT_FLOAT_EQ((co_await echo("", 1.5F)).scalar<float>(), 1.5F);
    EXPECT_DOUBLE_EQ((co_await echo("", 0.1)).scalar<double>(), 0.1);
    EXPECT_EQ((co_await echo("::text", std::string("it's \"quoted\"; DROP TABLE x; --")))
                  .scalar<std::string>(),
              std::string_view("it's \"quoted\"; DROP TABLE x; --"));
    EXPECT_EQ((co_await echo("::text", std::string_view("view"))).scalar<std::string>(),
              std::string_view("view"));
    EXPECT_EQ((co_await echo("::text", "literal")).scalar<std::string>(),
              std::string_view("literal"));
    const char* c_string = "c string";
    EXPECT_EQ((co_await echo("::text", c_string)).scalar<std::string>(),
              std::string_view("c string"));
    const std::string unicode = "žluťoučký kůň 🐎 日本語";
    EXPECT_EQ((co_await echo("::text", unicode)).scalar<std::string>(), unicode);
    EXPECT_EQ((co_await conn.query("SELECT length($1::text)", unicode)).scalar<int>(), 19);

    const auto now =
        std::chrono::time_point_cast<std::chrono::microseconds>(std::chrono::system_clock::now());
    EXPECT_EQ((co_await echo("", std::chrono::system_clock::time_point(now)))
                  .scalar<std::chrono::system_clock::time_point>(),
              now);
    auto known = co_await conn.query(
        "SELECT $1::timestamptz = '2024-02-29 12:34:56.789+00'",
        std::chrono::system_clock::time_point(
            std::chrono::sys_days(std::chrono::year(2024) / std::chrono::February / 29) + 12h +
            34min + 56s + 789ms));
    EXPECT_TRUE(known.scalar<bool>());
    co_await conn.execute("SET TIME ZONE 'Asia/Kolkata'");
    auto offset = co_await conn.query("SELECT '2024-01-01 00:00:00+00'::timestamptz");
    EXPECT_EQ(offset.scalar<std::chrono::system_clock::time_point>(),
              std::chrono::sys_days(std::chrono::year(2024) / 1 / 1));

    Bytes mebibyte(1024 * 1024);
    for (std::size_t i = 0; i < mebibyte.size(); ++i) {
      mebibyte[i] = static_cast<std::byte>((i * 31 + 7) % 256);
    }
    EXPECT_EQ((co_await echo("", mebibyte)).scalar<Bytes>(), mebibyte);
    EXPECT_EQ((co_await conn.query("SELECT length($1)", mebibyte)).scalar<int>(), 1024 * 1024);

    auto nulls = co_await conn.query(
        "SELECT $1::bool, $2::int2, $3::int4, $4::int8, $5::float8, $6::text, $7::bytea, "
        "$8::timestamptz",
        std::optional<bool>{}, std::optional<std::int16_t>{}, std::optional<std::int32_t>{},
        std::optional<std::int64_t>{}, std::optional<double>{}, std::optional<std::string>{},
        std::optional<Bytes>{}, std::optional<std::chrono::system_clock::time_point>{});
    const Row row = nulls[0];
    EXPECT_EQ(row.get<std::optional<bool>>(0), std::nullopt);
    EXPECT_EQ(row.get<std::optional<std::int16_t>>(1), std::nullopt);
    EXPECT_EQ(row.get<std::optional<std::int32_t>>(2), std::nullopt);
    EXPECT_EQ(row.get<std::optional<std::int64_t>>(3), std::nullopt);
    EXPECT_EQ(row.get<std::optional<double>>(4), std::nullopt);
    EXPECT_EQ(row.get<std::optional<std::string>>(5), std::nullopt);
    EXPECT_EQ(row.get<std::optional<Bytes>>(6), std::nullopt);
    EXPECT_EQ(row.get<std::optional<std::chrono::system_clock::time_point>>(7), std::nullopt);
    auto present = co_await conn.query("SELECT $1::int8", std::optional<std::int64_t>{42});
    EXPECT_EQ(present.scalar<std::optional<std::int64_t>>(), 42);
  });
}

TEST_F(ConnectionTest, UserTypesPlugInThroughCodec) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const geometry::Point point{1.5, -2.25};
    auto rows = co_await conn.query("SELECT $1::point, point($1[0] * 2, $1[1] * 2)", point);
    EXPECT_EQ(rows[0].get<geometry::Point>(0), point);
    EXPECT_EQ(rows[0].get<geometry::Point>(1), (geometry::Point{3, -4.5}));
    EXPECT_EQ(rows[0].get<std::optional<geometry::Point>>(1), (geometry::Point{3, -4.5}));
    auto wrong = co_await conn.query("SELECT 1");
    EXPECT_THROW((void)wrong[0].get<geometry::Point>(0), Error);
  });
}

// libpq sends a text parameter up to its first NUL: "a\0b" would be stored as "a" without a
// word. It is refused at the statement's co_await (not at the call, which may be a co_spawn's
// argument), nothing is sent, and the connection goes on.
TEST_F(ConnectionTest, ATextParameterHoldingANulFailsAtItsCoAwaitAndSendsNothing) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto statement = conn.query("SELECT $1::text", std::string("a\0b", 3));  // no throw here
    const Error error = co_await expect_error(std::move(statement));
    EXPECT_EQ(error.code(), client_errc::conversion);
    EXPECT_THAT(error.what(), HasSubstr("parameter $1 holds a NUL byte at offset 1"));
    EXPECT_EQ((co_await conn.query("SELECT $1::text", std::string("ab"))).scalar<std::string>(),
              "ab");
  });
}

// A float stands for the shortest decimal text that reads back as that float (the text
// PostgreSQL's own float4 output gives): COPY writes that text, so a float stores in a real,
// numeric or text column what it stores as a parameter (0.1F is 0.1, not 0.10000000149011612).
TEST_F(ConnectionTest, AFloatStoresTheSameThroughCopyAsAsAParameter) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE floats (id int4, n numeric, t text, r real)");
    const std::vector<float> values{0.1F, 1.5F, -2.75F, 3.3F, 1e-7F, 123456.0F, 0.0F};
    std::string data;
    for (std::size_t i = 0; i < values.size(); ++i) {
      const auto id = static_cast<std::int32_t>(i);
      co_await conn.execute("INSERT INTO floats VALUES ($1, $2, $2, $2)", id, values[i]);
      copy_text_row(data, id + 100, values[i], values[i], values[i]);
    }
    EXPECT_EQ(co_await conn.copy_from("COPY floats FROM STDIN", data), values.size());
    auto compared = co_await conn.query(
        "SELECT a.id, a.n::text, b.n::text, a.t, b.t, a.r = b.r FROM floats a JOIN floats b "
        "ON b.id = a.id + 100 ORDER BY a.id");
    EXPECT_EQ(compared.size(), values.size());
    for (const Row row : compared) {
      const auto id = row.get<int>(0);
      EXPECT_EQ(row.get<std::string>(1), row.get<std::string>(2)) << "numeric, value " << id;
      EXPECT_EQ(row.get<std::string>(3), row.get<std::string>(4)) << "text, value " << id;
      EXPECT_TRUE(row.get<bool>(5)) << "real, value " << id;
    }
    auto tenth = co_await conn.query("SELECT n::text, t FROM floats WHERE id = 100");
    EXPECT_EQ(tenth[0].get<std::string>(0), "0.1");
    EXPECT_EQ(tenth[0].get<std::string>(1), "0.1");
  });
}

// A time_point is an instant (a timestamptz). Into a timestamp (without time zone) column, a
// parameter is converted by the server to the session's TimeZone wall time, while COPY stores
// the UTC wall time (timestamp input ignores the +00 COPY writes): docs/usage.md says so, and
// how to make them agree.
TEST_F(ConnectionTest, ATimePointInATimestampColumnIsTheSessionWallTimeAsAParameterUtcInCopy) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE stamps (id int4, plain timestamp, zoned timestamptz)");
    const auto at = std::chrono::system_clock::time_point(
        std::chrono::sys_days(std::chrono::year(2024) / 1 / 1) + 12h);
    co_await conn.execute("SET TIME ZONE 'Asia/Kolkata'");
    co_await conn.execute("INSERT INTO stamps VALUES (1, $1, $1)", at);
    co_await conn.execute("INSERT INTO stamps VALUES (2, $1 AT TIME ZONE 'UTC', $1)", at);
    std::string data;
    copy_text_row(data, 3, at, at);
    co_await conn.copy_from("COPY stamps FROM STDIN", data);
    auto rows = co_await conn.query("SELECT plain::text, zoned = $1 FROM stamps ORDER BY id", at);
    EXPECT_EQ(rows[0].get<std::string>(0), "2024-01-01 17:30:00");  // Kolkata is UTC+05:30
    EXPECT_EQ(rows[1].get<std::string>(0), "2024-01-01 12:00:00");
    EXPECT_EQ(rows[2].get<std::string>(0), "2024-01-01 12:00:00");
    for (const Row row : rows) EXPECT_TRUE(row.get<bool>(1));  // the same instant everywhere
    co_await conn.execute("SET TIME ZONE 'UTC'");
    co_await conn.execute("INSERT INTO stamps VALUES (4, $1, $1)", at);
    auto utc = co_await conn.query("SELECT plain::text FROM stamps WHERE id = 4");
    EXPECT_EQ(utc.scalar<std::string>(), "2024-01-01 12:00:00");
  });
}

// A real is a float: read as double it is that float widened exactly, as C++ widens a float and
// as the server's own ::float8 cast does, not the double nearest its shortest text.
TEST_F(ConnectionTest, ARealReadAsDoubleIsTheFloatWidenedExactly) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto rows = co_await conn.query(
        "SELECT 0.1::real, 0.1::real::float8, 16777217::real, 3.4028235e38::real, "
        "'-Infinity'::real");
    const Row row = rows[0];
    EXPECT_EQ(row.get<double>(0), static_cast<double>(0.1F));
    EXPECT_EQ(row.get<double>(0), row.get<double>(1));
    EXPECT_EQ(row.get<float>(0), 0.1F);
    EXPECT_EQ(row.get<double>(2), 16777216.0);
    EXPECT_EQ(row.get<double>(3), static_cast<double>(std::numeric_limits<float>::max()));
    EXPECT_EQ(row.get<float>(3), std::numeric_limits<float>::max());
    EXPECT_EQ(row.get<double>(4), -std::numeric_limits<double>::infinity());
  });
}

// The server refuses a NUL byte in COPY text input (22021) and fails the whole COPY: refused
// before anything is sent, naming the row and column, as a text parameter holding one is.
TEST_F(ConnectionTest, CopyDataHoldingANulIsRefusedBeforeAnythingIsSentNamingRowAndColumn) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE nuls (id int4, a text, b text)");
    std::string data;
    copy_text_row(data, 1, "x", "y");
    copy_text_row(data, 2, "x", std::string("a\0b", 3));
    const Error error = co_await expect_error(conn.copy_from("COPY nuls FROM STDIN", data));
    EXPECT_EQ(error.code(), client_errc::conversion);
    EXPECT_THAT(error.what(), HasSubstr("row 2, column 3"));
    EXPECT_THAT(error.what(), HasSubstr("NUL"));
    // Not sent at all: a COPY into a table that does not exist fails the same way, not 42P01.
    const Error unsent =
        co_await expect_error(conn.copy_from("COPY no_such_table FROM STDIN", data));
    EXPECT_EQ(unsent.code(), client_errc::conversion);
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM nuls")).scalar<int>(), 0);
    data.clear();
    copy_text_row(data, 1, "x", "y");
    EXPECT_EQ(co_await conn.copy_from("COPY nuls FROM STDIN", data), 1U);
  });
}

// A numeric beyond double's range is said to be out of range for double, with what to do, not
// "not a number".
TEST_F(ConnectionTest, ANumericBeyondDoublesRangeIsSaidToBeOutOfRange) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto rows = co_await conn.query(
        "SELECT ('1' || repeat('0', 400))::numeric AS huge, -('1' || repeat('0', 400))::numeric, "
        "('0.' || repeat('0', 400) || '1')::numeric AS tiny");
    for (int column = 0; column < 3; ++column) {
      try {
        (void)rows[0].get<double>(column);
        ADD_FAILURE() << "column " << column << " read as double";
      } catch (const Error& error) {
        EXPECT_EQ(error.code(), client_errc::conversion);
        EXPECT_THAT(error.what(), HasSubstr("out of range for double"));
        EXPECT_THAT(error.what(), Not(HasSubstr("not a number")));
        EXPECT_THAT(error.what(), HasSubstr("std::string"));
        // A value cut short in the message says how long it is.
        if (column == 0) {
          EXPECT_THAT(error.what(), HasSubstr("...' (401 characters)"));
        }
      }
    }
  });
}

// A numeric with a zero fraction (numeric(10,2) 5.00) is exactly an integer: it reads as one;
// a fraction (5.50) is still refused, saying so.
TEST_F(ConnectionTest, ANumericWithAZeroFractionReadsAsAnInteger) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto rows = co_await conn.query(
        "SELECT 5.00::numeric(10,2), -7.000::numeric, 5.50::numeric(10,2), "
        "99999999999999999999.00::numeric, 0.00::numeric(10,2), 5.::numeric");
    const Row row = rows[0];
    EXPECT_EQ(row.get<int>(0), 5);
    EXPECT_EQ(row.get<std::int64_t>(0), 5);
    EXPECT_EQ(row.get<std::uint32_t>(0), 5U);
    EXPECT_EQ(row.get<std::int16_t>(1), -7);
    EXPECT_EQ(row.get<int>(4), 0);
    EXPECT_EQ(row.get<int>(5), 5);
    try {
      (void)row.get<int>(2);
      ADD_FAILURE() << "5.50 read as int";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::conversion);
      EXPECT_THAT(error.what(), HasSubstr("fraction"));
    }
    EXPECT_THROW((void)row.get<std::uint64_t>(2), Error);
    try {
      (void)row.get<std::int64_t>(3);
      ADD_FAILURE() << "1e20 read as int64";
    } catch (const Error& error) {
      EXPECT_THAT(error.what(), HasSubstr("out of range"));
    }
  });
}

TEST_F(ConnectionTest, ResultsExposeRowsColumnsAndCounts) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto rows = co_await conn.query(
        "SELECT g AS id, 'n' || g AS name FROM generate_series(1, 3) g ORDER BY g");
    EXPECT_EQ(rows.size(), 3U);
    if (rows.size() != 3U) co_return;
    EXPECT_EQ(rows.columns(), 2U);
    EXPECT_EQ(rows.column(0).name, "id");
    EXPECT_EQ(rows.column(0).type, oid::int4);
    EXPECT_EQ(rows.column(1).type, oid::text);
    EXPECT_EQ(rows.column_index("name"), 1U);
    int expected = 1;
    for (const Row row : rows) {
      EXPECT_EQ(row.get<int>("id"), expected);
      EXPECT_EQ(row.get<std::string_view>("name"), "n" + std::to_string(expected));
      ++expected;
    }
    EXPECT_EQ(rows.command_tag(), "SELECT 3");
    co_await conn.execute("CREATE TEMP TABLE counted (v int)");
    EXPECT_EQ(co_await conn.execute("INSERT INTO counted SELECT generate_series(1, 5)"), 5U);
    EXPECT_EQ(co_await conn.execute("UPDATE counted SET v = v + 1 WHERE v > $1", 2), 3U);
  });
}

TEST_F(ConnectionTest, TypeMismatchAndUnexpectedNullNameColumnAndTypes) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto rows = co_await conn.query(
        "SELECT 1.5::numeric AS total, NULL::int4 AS missing, "
        "99999::int4 AS big");
    try {
      (void)rows[0].get<bool>("total");
      ADD_FAILURE() << "numeric read as bool";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::conversion);
      EXPECT_THAT(error.what(), HasSubstr("'total'"));
      EXPECT_THAT(error.what(), HasSubstr("numeric"));
      EXPECT_THAT(error.what(), HasSubstr("bool"));
    }
    try {
      (void)rows[0].get<int>("missing");
      ADD_FAILURE() << "NULL read as int";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::unexpected_null);
      EXPECT_THAT(error.what(), HasSubstr("'missing'"));
      EXPECT_THAT(error.what(), HasSubstr("std::optional"));
    }
    EXPECT_THROW((void)rows[0].get<std::int16_t>("big"), Error);
    EXPECT_THROW((void)rows[0].get<int>("nope"), Error);
    EXPECT_THROW((void)rows[0].get<int>(7), Error);
  });
}

// ---------------------------------------------------------------- large results

std::size_t heap_in_use() {
  return mallinfo2().uordblks;
}

TEST_F(ConnectionTest, MillionRowResultIteratesAndStreamingStaysBounded) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const std::size_t before = heap_in_use();
    {
      auto rows = co_await conn.query("SELECT g::int8 FROM generate_series(1, 1000000) g");
      const std::size_t held = heap_in_use() - before;
      std::int64_t sum = 0;
      for (const Row row : rows) sum += row.get<std::int64_t>(0);
      EXPECT_EQ(rows.size(), 1'000'000U);
      EXPECT_EQ(sum, 500'000'500'000);
      // result.hpp documents about 24 MB for this result.
      EXPECT_LT(held, 32U * 1024 * 1024) << "a materialized 1M-row result took " << held;
      std::printf("materialized 1,000,000 x int8: %zu bytes of heap\n", held);
    }
    std::size_t peak = 0;
    std::int64_t sum = 0;
    const std::size_t stream_before = heap_in_use();
    const auto count = co_await conn.stream(
        "SELECT g::int8 FROM generate_series(1, $1) g",
        [&](const Row& row) {
          sum += row.get<std::int64_t>(0);
          peak = std::max(peak, heap_in_use() - std::min(heap_in_use(), stream_before));
        },
        std::int64_t{1'000'000});
    EXPECT_EQ(count, 1'000'000U);
    EXPECT_EQ(sum, 500'000'500'000);
    EXPECT_LT(peak, 1U * 1024 * 1024) << "streaming held " << peak << " bytes at its peak";
    std::printf("streamed 1,000,000 x int8: peak %zu bytes of extra heap\n", peak);
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
  });
}

TEST_F(ConnectionTest, StreamCallbackExceptionCancelsAndLeavesConnectionUsable) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    int seen = 0;
    try {
      co_await conn.stream("SELECT generate_series(1, 1000000)", [&](const Row&) {
        if (++seen == 10) throw std::runtime_error("enough");
      });
      ADD_FAILURE() << "the callback's exception was lost";
    } catch (const std::runtime_error& error) {
      EXPECT_STREQ(error.what(), "enough");
    }
    EXPECT_EQ(seen, 10);
    EXPECT_EQ((co_await conn.query("SELECT 2")).scalar<int>(), 2);
  });
}

// ---------------------------------------------------------------- server errors

TEST_F(ConnectionTest, ServerErrorsCarrySqlstateAndConnectionStillWorks) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto syntax = co_await expect_error(conn.query("SELEC 1"));
    EXPECT_EQ(syntax.sqlstate(), "42601");
    EXPECT_EQ(syntax.code(), make_sqlstate_error("42601"));
    EXPECT_THAT(syntax.what(), HasSubstr("syntax error"));
    EXPECT_EQ(syntax.diagnostics().statement, "SELEC 1");
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);

    co_await conn.execute("CREATE TEMP TABLE uniq (id int PRIMARY KEY)");
    co_await conn.execute("INSERT INTO uniq VALUES ($1)", 1);
    auto duplicate = co_await expect_error(conn.execute("INSERT INTO uniq VALUES ($1)", 1));
    EXPECT_EQ(duplicate.sqlstate(), "23505");
    EXPECT_TRUE(duplicate.code() == condition::unique_violation);
    EXPECT_FALSE(duplicate.code() == condition::connection_error);
    EXPECT_THAT(duplicate.diagnostics().detail, HasSubstr("Key (id)=(1) already exists"));
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM uniq")).scalar<int>(), 1);

    auto division = co_await expect_error(conn.query("SELECT 1 / $1", 0));
    EXPECT_EQ(division.sqlstate(), "22012");
    EXPECT_THAT(division.what(), HasSubstr("division by zero"));
    EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);
    EXPECT_EQ((co_await conn.query("SELECT 3")).scalar<int>(), 3);
  });
}

TEST_F(ConnectionTest, NoThrowTokenReportsErrorCodeAndDiagnostics) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    ParamSink params;
    encode_params(params, 0);
    auto [error, result] = co_await conn.async_query("SELECT 1 / $1", std::move(params),
                                                     asio::as_tuple(asio::use_awaitable));
    EXPECT_EQ(error, make_sqlstate_error("22012"));
    EXPECT_EQ(conn.last_error().sqlstate, "22012");
    auto [ok, rows] =
        co_await conn.async_execute("SELECT 1", {}, asio::as_tuple(asio::use_awaitable));
    EXPECT_FALSE(ok);
    EXPECT_EQ(rows, 1U);

    auto executor = co_await asio::this_coro::executor;
    ConnectOptions wrong_database{.conninfo = cluster().dsn() + " dbname=no_such_db"};
    auto [connect_error, failed] = co_await Connection::async_connect(
        executor, std::move(wrong_database), asio::as_tuple(asio::use_awaitable));
    EXPECT_EQ(connect_error, make_sqlstate_error("3D000"));
    EXPECT_FALSE(failed.is_open());
    EXPECT_THAT(failed.last_error().message, HasSubstr("no_such_db"));
  });
}

TEST_F(ConnectionTest, ConcurrentUseIsDetectedAndDoesNotDisturbTheRunningQuery) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto misuse = co_await beside_a_running_statement(
        conn, /*prepared=*/false, [&] { return expect_error(conn.query("SELECT 1")); });
    EXPECT_EQ(misuse.code(), client_errc::concurrent_use);
    EXPECT_EQ((co_await conn.query("SELECT 8")).scalar<int>(), 8);
  });
}

// The caller's own DISCARD ALL or DEALLOCATE ALL empties the statement cache: the statements are
// prepared again as they are used, and the server's forgetting them is never taken for a
// transaction pooler (twice was: the connection went on unnamed for the rest of its life).
TEST_F(ConnectionTest, TheCallersOwnDiscardAllOrDeallocateAllEmptiesTheStatementCache) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    for (const char* forget : {"DEALLOCATE ALL", "DISCARD ALL", "DEALLOCATE ALL", "DISCARD ALL"}) {
      EXPECT_EQ((co_await conn.query_prepared("SELECT $1::int", 3)).scalar<int>(), 3);
      co_await conn.execute(forget);
      EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>(),
                0);
    }
    EXPECT_EQ((co_await conn.query_prepared("SELECT $1::int", 4)).scalar<int>(), 4);
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>(), 1)
        << "the connection went on with unnamed statements";
  });
}

// discard_all() during a running statement is refused before it touches the statement cache:
// it cleared the cache first, and the running query_prepared() read its freed name afterwards.
TEST_F(ConnectionTest, DiscardAllDuringARunningStatementIsRefusedAndDisturbsNothing) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto misuse = co_await beside_a_running_statement(
        conn, /*prepared=*/true, [&] { return expect_error(conn.discard_all()); });
    EXPECT_EQ(misuse.code(), client_errc::concurrent_use);
    const auto again = co_await conn.query_prepared("SELECT pg_sleep(0.2), 7");
    EXPECT_EQ(again[0].get<int>(1), 7);
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>(), 1)
        << "the cache was cleared under the running statement (so it was prepared again)";
  });
}

// COPY TO STDOUT through query() is refused after its data is read to its end, without blocking
// the thread (libpq's synchronous read waited in poll(): no timer of the io_context could fire
// meanwhile); COPY FROM STDIN through query() is the client's error, not the server's 57014
// (query_canceled), which reads as a timeout.
TEST_F(ConnectionTest, CopyThroughQueryIsRefusedWithoutBlockingTheThread) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto executor = co_await asio::this_coro::executor;
    const auto started = std::chrono::steady_clock::now();
    std::optional<std::chrono::steady_clock::duration> timer_fired_after;
    // (The COPY's first data comes after its first row's 0.3 s; the rest over 0.9 s more.)
    asio::steady_timer timer(executor, 500ms);
    timer.async_wait([&](boost::system::error_code) {
      timer_fired_after = std::chrono::steady_clock::now() - started;
    });
    auto refused = co_await expect_error(
        conn.query("COPY (SELECT repeat('x', 100000), pg_sleep(0.3) FROM generate_series(1, 4)) "
                   "TO STDOUT"));
    EXPECT_EQ(refused.code(), client_errc::protocol_error) << refused.what();
    while (!timer_fired_after) co_await testing::sleep_for(5ms);
    EXPECT_LT(*timer_fired_after, 900ms) << "the thread was blocked in the COPY's read";
    EXPECT_EQ((co_await conn.query("SELECT 5")).scalar<int>(), 5);
    co_await conn.execute("CREATE TEMP TABLE copy_by_query (v int)");
    auto copy_in = co_await expect_error(conn.execute("COPY copy_by_query FROM STDIN"));
    EXPECT_EQ(copy_in.code(), client_errc::protocol_error) << copy_in.what();
    EXPECT_FALSE(copy_in.code() == condition::query_canceled);
    EXPECT_THAT(copy_in.diagnostics().hint, HasSubstr("copy_from"));
    EXPECT_EQ((co_await conn.query("SELECT 6")).scalar<int>(), 6);
  });
}

// A COPY TO STDOUT cancelled before its data came: the drain read the COPY's first result and
// then spun for ever on it (libpq hands it out again until the data is read), at 100% CPU, beyond
// cancel_timeout's reach. It ends now, within cancel_timeout.
TEST_F(ConnectionTest, ACancelledCopyToStdoutEndsWithinTheCancelTimeout) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        auto conn = co_await open_through(proxy, 3s);
        proxy.set_latency(300ms);
        const auto started = std::chrono::steady_clock::now();
        auto error =
            co_await expect_error(with_timeout(conn.query("COPY (SELECT 1) TO STDOUT"), 100ms));
        EXPECT_EQ(error.code(), client_errc::timeout) << error.what();
        EXPECT_LT(std::chrono::steady_clock::now() - started, 4s);
        proxy.set_latency(0ms);
        if (!conn.is_broken()) {
          EXPECT_EQ((co_await conn.query("SELECT 9")).scalar<int>(), 9);
        }
      },
      30s);
}

// A statement whose answer was on its way when its deadline passed had run: the cancel request
// came too late, and the error says that it ran (a caller who took it for not run would run it
// twice), not that the server cancelled it.
TEST_F(ConnectionTest, AStatementThatCompletedBeforeItsCancelIsReportedAsRun) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        auto conn = co_await open_through(proxy, 5s);
        co_await conn.execute("CREATE TEMP TABLE ran (x int)");
        // The INSERT reaches the server after 300 ms and runs; its cancel request, sent at the
        // 200 ms deadline, reaches it after 500 ms.
        proxy.set_latency(300ms);
        auto error =
            co_await expect_error(with_timeout(conn.execute("INSERT INTO ran VALUES (1)"), 200ms));
        EXPECT_EQ(error.code(), client_errc::timeout) << error.what();
        EXPECT_THAT(error.what(), HasSubstr("had already completed on the server")) << error.what();
        EXPECT_THAT(error.what(), Not(HasSubstr("cancelled on the server"))) << error.what();
        EXPECT_THAT(error.diagnostics().hint, HasSubstr("do not run it again"));
        EXPECT_EQ(error.diagnostics().statement, "INSERT INTO ran VALUES (1)");
        proxy.set_latency(0ms);
        EXPECT_FALSE(conn.is_broken());
        EXPECT_EQ((co_await conn.query("SELECT count(*)::int FROM ran")).scalar<int>(), 1);
        // One the server did cancel says so.
        auto cancelled =
            co_await expect_error(with_timeout(conn.execute("SELECT pg_sleep(5)"), 100ms));
        EXPECT_THAT(cancelled.what(), HasSubstr("cancelled on the server")) << cancelled.what();
      },
      30s);
}

// transaction() whose BEGIN completed on the server just before its deadline: the BEGIN opened a
// transaction block, and transaction() rolls it back as it would after a failed body. Left
// open, the caller's next statements would run inside it, and be rolled back silently when the
// connection is reset or closed.
TEST_F(ConnectionTest, ATransactionWhoseBeginRanBeforeItsDeadlineLeavesNoBlockOpen) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        auto conn = co_await open_through(proxy, 5s);
        co_await conn.execute("CREATE TEMP TABLE after_begin (x int)");
        // BEGIN reaches the server after 300 ms and runs; its cancel request, sent at the 200 ms
        // deadline, reaches it after 500 ms.
        proxy.set_latency(300ms);
        bool body_ran = false;
        auto error = co_await expect_error(
            with_timeout(transaction(conn,
                                     [&](Connection& in) -> awaitable_void {
                                       body_ran = true;
                                       co_await in.execute("INSERT INTO after_begin VALUES (1)");
                                     }),
                         200ms));
        EXPECT_EQ(error.code(), client_errc::timeout) << error.what();
        EXPECT_THAT(error.what(), HasSubstr("had already completed on the server")) << error.what();
        EXPECT_FALSE(body_ran);
        proxy.set_latency(0ms);
        EXPECT_FALSE(conn.is_broken());
        EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);
        co_await conn.execute("INSERT INTO after_begin VALUES (2)");  // autocommit: it stays
        EXPECT_EQ((co_await conn.query("SELECT count(*)::int FROM after_begin")).scalar<int>(), 1);
      },
      30s);
}

// A statement cancelled while it is still being sent (a server that stopped reading, a large
// parameter) cannot be drained: the connection closes at once, not after cancel_timeout.
TEST_F(ConnectionTest, AStatementCancelledWhileBeingSentEndsAtOnce) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        auto conn = co_await open_through(proxy, 5s);
        proxy.pause();  // nothing more reaches the server: the socket's buffers fill
        const std::string large(std::size_t{64} << 20, 'x');
        const auto started = std::chrono::steady_clock::now();
        auto error = co_await expect_error(
            with_timeout(conn.query("SELECT length($1::text)", large), 200ms));
        const auto took = std::chrono::steady_clock::now() - started;
        EXPECT_EQ(error.code(), client_errc::timeout) << error.what();
        EXPECT_THAT(error.what(), HasSubstr("still being sent")) << error.what();
        EXPECT_LT(took, 4s) << "it waited for the cancel_timeout (5 s)";
        EXPECT_TRUE(conn.is_broken());
        proxy.resume();
      },
      30s);
}

// ---------------------------------------------------------------- connecting

TEST_F(ConnectionTest, ConnectOptionsReachTheServerAndTheSocket) {
  run_coroutine([]() -> awaitable_void {
    // Built outside the co_await: g++ 12 rejects an initializer list inside a co_await expression.
    ConnectOptions options{
        .conninfo = "postgresql://postgres@127.0.0.1:" + std::to_string(cluster().port()) +
                    "/postgres?application_name=ignored",
        .application_name = "pgrt-test/options",
        .session_settings = {{"statement_timeout", "4321ms"}, {"search_path", "\"a b\", public"}},
        .keepalives = TcpKeepalives{.idle = 17s, .interval = 3s, .count = 4},
        .tcp_user_timeout = 7000ms,
    };
    auto conn = co_await Connection::connect(std::move(options));
    EXPECT_EQ((co_await conn.query("SHOW application_name")).scalar<std::string>(),
              std::string_view("pgrt-test/options"));
    EXPECT_EQ((co_await conn.query("SHOW statement_timeout")).scalar<std::string>(),
              std::string_view("4321ms"));
    EXPECT_EQ((co_await conn.query("SHOW search_path")).scalar<std::string>(),
              std::string_view("\"a b\", public"));
    EXPECT_EQ((co_await conn.query("SHOW DateStyle")).scalar<std::string>(),
              std::string_view("ISO, MDY"));
    EXPECT_EQ(socket_option(conn, SOL_SOCKET, SO_KEEPALIVE), 1);
    EXPECT_EQ(socket_option(conn, IPPROTO_TCP, TCP_KEEPIDLE), 17);
    EXPECT_EQ(socket_option(conn, IPPROTO_TCP, TCP_KEEPCNT), 4);
    EXPECT_EQ(socket_option(conn, IPPROTO_TCP, TCP_USER_TIMEOUT), 7000);
  });
}

// A TCP keepalive setting or tcp_user_timeout the conninfo gives itself is the one the socket
// gets: pgrt's own (ConnectOptions' defaults, or the pool's guards) fill in only those the conninfo
// leaves out (libpq keeps the last value given for a keyword, so pgrt's own never follow the
// conninfo's).
TEST_F(ConnectionTest, KeepalivesAndTcpUserTimeoutInTheConninfoWinOverPgrtsOwn) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions options{
        .conninfo = "postgresql://postgres@127.0.0.1:" + std::to_string(cluster().port()) +
                    "/postgres?keepalives_idle=5&tcp_user_timeout=9000",
        .tcp_user_timeout = 7000ms,
    };
    auto conn = co_await Connection::connect(std::move(options));
    EXPECT_EQ(socket_option(conn, SOL_SOCKET, SO_KEEPALIVE), 1);
    EXPECT_EQ(socket_option(conn, IPPROTO_TCP, TCP_KEEPIDLE), 5)
        << "the conninfo's keepalives_idle";
    EXPECT_EQ(socket_option(conn, IPPROTO_TCP, TCP_KEEPINTVL), 10)
        << "pgrt's default, which the conninfo leaves out";
    EXPECT_EQ(socket_option(conn, IPPROTO_TCP, TCP_USER_TIMEOUT), 9000)
        << "the conninfo's tcp_user_timeout";
    // keepalives=0 in the conninfo turns them off.
    ConnectOptions off{.conninfo = "host=127.0.0.1 port=" + std::to_string(cluster().port()) +
                                   " user=postgres dbname=postgres keepalives=0"};
    auto plain = co_await Connection::connect(std::move(off));
    EXPECT_EQ(socket_option(plain, SOL_SOCKET, SO_KEEPALIVE), 0) << "the conninfo's keepalives=0";
  });
}

TEST_F(ConnectionTest, HostNamesAreResolvedAndEveryAddressAndHostIsTried) {
  run_coroutine([]() -> awaitable_void {
    // "localhost" may resolve to ::1 first, where the cluster does not listen: the next address
    // must be tried. The first host of the list refuses; the second is the cluster.
    ConnectOptions options{.conninfo = "host=localhost,localhost port=1," +
                                       std::to_string(cluster().port()) +
                                       " user=postgres dbname=postgres"};
    auto conn = co_await Connection::connect(std::move(options));
    EXPECT_EQ((co_await conn.query("SELECT inet_server_port()")).scalar<int>(), cluster().port());
  });
}

// A name lookup that hangs (a DNS server that does not answer), put in getaddrinfo()'s place:
// "hangs.pgrt.test" answers 127.0.0.1 once released, "answers.pgrt.test" at once.
namespace hung_dns {
std::mutex mutex;
std::condition_variable changed;
bool released = false;
bool back = false;  // DNS is back: a new lookup answers at once (the first one still hangs)
int hung_lookups = 0;
detail::HostAddresses look_up(const std::string& host) {
  if (host == "hangs.pgrt.test") {
    std::unique_lock lock(mutex);
    ++hung_lookups;
    if (back) return {.addresses = {"127.0.0.1"}, .error = {}};
    changed.wait(lock, [] { return released; });
    return {.addresses = {"127.0.0.1"}, .error = {}};
  }
  if (host == "answers.pgrt.test") return {.addresses = {"127.0.0.1"}, .error = {}};
  return {.addresses = {}, .error = "Name or service not known"};
}
}  // namespace hung_dns

// A name whose lookup hangs holds up no other name (asio's resolver looked every name of an
// io_context up on one thread, one after the other: the healthy host's lookup waited behind the
// hung one and the connect failed). A second connect meanwhile joins the running lookup; once it
// has run for a few seconds, a connect starts a fresh one (DNS may be back).
TEST_F(ConnectionTest, AHostNameWhoseLookupHangsHoldsUpNoOtherName) {
  // Released and put back however the test ends (a lookup left hanging would outlive it).
  struct Restore {
    detail::BlockingLookup previous = detail::replace_blocking_lookup(&hung_dns::look_up);
    void release() {
      {
        std::lock_guard lock(hung_dns::mutex);
        hung_dns::released = true;
      }
      hung_dns::changed.notify_all();
    }
    ~Restore() {
      release();
      detail::replace_blocking_lookup(previous);
    }
  } restore;
  const std::string port = std::to_string(cluster().port());
  const std::string conninfo = "host=hangs.pgrt.test,answers.pgrt.test port=" + port + "," + port +
                               " user=postgres dbname=postgres";
  using Outcome = std::pair<std::string, std::chrono::milliseconds>;
  auto connect = [&] {
    return run_coroutine([&]() -> asio::awaitable<Outcome> {
      const auto started = std::chrono::steady_clock::now();
      ConnectOptions options{.conninfo = conninfo, .connect_timeout = 2s};
      auto conn = co_await Connection::connect(std::move(options));
      co_return Outcome{std::string(PQhost(conn.native_handle())),
                        std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - started)};
    });
  };
  // Two hosts in 2 s: the hung name has its 1 s, then the other is looked up and connected.
  const auto first_lookup = std::chrono::steady_clock::now();
  const auto [target, took] = connect();
  EXPECT_THAT(target, HasSubstr("answers.pgrt.test"));
  EXPECT_GE(took, 900ms);
  EXPECT_LT(took, 1900ms);
  const auto [target_again, took_again] = connect();
  EXPECT_THAT(target_again, HasSubstr("answers.pgrt.test"));
  EXPECT_LT(took_again, 1900ms);
  {
    std::lock_guard lock(hung_dns::mutex);
    EXPECT_EQ(hung_dns::hung_lookups, 1) << "the second connect started a lookup of its own";
    hung_dns::back = true;
  }
  // The first lookup still hangs, past the time it is joined for: a fresh one answers, and the
  // first host is connected to at once.
  std::this_thread::sleep_until(first_lookup + 5500ms);
  const auto [target_after, took_after] = connect();
  EXPECT_THAT(target_after, HasSubstr("hangs.pgrt.test"));
  EXPECT_LT(took_after, 900ms);
  std::lock_guard lock(hung_dns::mutex);
  EXPECT_EQ(hung_dns::hung_lookups, 2);
}

TEST_F(ConnectionTest, EnvironmentVariablesFillAnEmptyConninfo) {
  ::setenv("PGHOST", cluster().directory().c_str(), 1);
  ::setenv("PGPORT", std::to_string(cluster().port()).c_str(), 1);
  ::setenv("PGUSER", "postgres", 1);
  ::setenv("PGDATABASE", "postgres", 1);
  ::setenv("PGAPPNAME", "from-env", 1);
  run_coroutine([]() -> awaitable_void {
    ConnectOptions defaults;
    auto conn = co_await Connection::connect(std::move(defaults));
    EXPECT_EQ((co_await conn.query("SHOW application_name")).scalar<std::string>(),
              std::string_view("from-env"));
  });
  for (const char* name : {"PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGAPPNAME"})
    ::unsetenv(name);
}

TEST_F(ConnectionTest, ConnectFailuresAreClearDistinctAndWithinTheTimeout) {
  auto own = start_own_cluster({
      .max_connections = 3,
      .settings = {{"superuser_reserved_connections", "0"}},
      .password_role = testing::PasswordRole{"app", "right-password"},
  });
  const std::string port = std::to_string(own->port());
  auto attempt = [&](std::string conninfo) {
    return run_coroutine([conninfo]() -> asio::awaitable<Error> {
      ConnectOptions options{.conninfo = conninfo, .connect_timeout = 5s};
      co_return co_await expect_error(Connection::connect(std::move(options)));
    });
  };
  auto timed = [&](std::string conninfo) {
    const auto start = std::chrono::steady_clock::now();
    Error error = attempt(std::move(conninfo));
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
    EXPECT_THAT(error.what(), Not(HasSubstr("right-password")));
    EXPECT_THAT(error.what(), Not(HasSubstr("wrong-password")));
    return error;
  };

  auto wrong_password =
      timed("host=127.0.0.1 port=" + port + " user=app password=wrong-password dbname=postgres");
  EXPECT_EQ(wrong_password.sqlstate(), "28P01");
  EXPECT_THAT(wrong_password.what(), HasSubstr("password authentication failed"));

  auto unknown_database = timed(own->dsn() + " dbname=missing_db");
  EXPECT_EQ(unknown_database.sqlstate(), "3D000");
  EXPECT_THAT(unknown_database.what(), HasSubstr("missing_db"));

  // A role the server does not know, with "database" in its name: the role's error, not the
  // database's.
  auto unknown_role = timed(own->dsn() + " user=database_reader");
  EXPECT_EQ(unknown_role.sqlstate(), "28000") << unknown_role.what();
  EXPECT_THAT(unknown_role.what(), HasSubstr("database_reader"));
  EXPECT_THAT(unknown_role.diagnostics().hint, HasSubstr("role"));

  // Port 1 on loopback: nothing listens there.
  auto refused = timed("host=127.0.0.1 port=1 user=postgres dbname=postgres");
  EXPECT_EQ(refused.code(), client_errc::connect_failed);
  EXPECT_TRUE(refused.code() == condition::connection_error);
  EXPECT_THAT(refused.what(), HasSubstr("refused"));

  auto unresolvable = timed("host=no-such-host.invalid port=5432 user=postgres");
  EXPECT_EQ(unresolvable.code(), client_errc::name_resolution);
  EXPECT_THAT(unresolvable.what(), HasSubstr("no-such-host.invalid"));
  // A name that does not resolve among several hosts is skipped, first or last, as libpq does.
  for (const std::string hosts :
       {"no-such-host.invalid,127.0.0.1", "127.0.0.1,no-such-host.invalid"}) {
    const std::string conninfo =
        "host=" + hosts + " port=" + port + " user=postgres dbname=postgres";
    EXPECT_EQ(run_coroutine([&]() -> asio::awaitable<int> {
                ConnectOptions options{.conninfo = conninfo, .connect_timeout = 5s};
                auto conn = co_await Connection::connect(std::move(options));
                co_return (co_await conn.query("SELECT 1")).scalar<int>();
              }),
              1)
        << hosts;
  }
  // A port list must match the hosts; a single name given two ports is refused, not cut short.
  auto ports_for_one = timed("host=localhost port=1," + port + " user=postgres");
  EXPECT_EQ(ports_for_one.code(), client_errc::invalid_config) << ports_for_one.what();

  BlockingConnection first(own->dsn());
  BlockingConnection second(own->dsn());
  BlockingConnection third(own->dsn());
  auto full = timed(own->dsn());
  EXPECT_EQ(full.sqlstate(), "53300");
  // A full host passed over for the next: the connection that results carries none of its error
  // (a later loss would have named the full host and its hint).
  const std::string passed_over = run_coroutine([&]() -> asio::awaitable<std::string> {
    ConnectOptions options{.conninfo = "host=" + own->directory().string() + "," +
                                       cluster().directory().string() + " port=" + port + "," +
                                       std::to_string(cluster().port()) +
                                       " user=postgres dbname=postgres",
                           .connect_timeout = 5s};
    auto conn = co_await Connection::connect(std::move(options));
    co_return conn.last_error().sqlstate + conn.last_error().message;
  });
  EXPECT_EQ(passed_over, "");
  EXPECT_TRUE(full.code() == condition::too_many_connections);
  EXPECT_THAT(full.diagnostics().hint, HasSubstr("max_connections"));

  for (const char* conninfo :
       {"host=127.0.0.1 password=wrong-password port", "host=127.0.0.1 PASSWORD=wrong-password"}) {
    auto malformed = timed(conninfo);
    EXPECT_EQ(malformed.code(), client_errc::invalid_config);  // not worth a retry
    EXPECT_THAT(malformed.what(), HasSubstr("could not be parsed: host=127.0.0.1"));
    EXPECT_THAT(malformed.what(), Not(HasSubstr("wrong-password")));
  }
  // Values libpq refuses before it connects anywhere: mistakes, not connection errors.
  const std::string server = " user=postgres dbname=postgres port=" + std::to_string(own->port());
  for (const std::string& conninfo :
       {"host=127.0.0.1 target_session_attrs=readwrite" + server,
        "host=127.0.0.1 sslmode=verify_full" + server,
        "host=127.0.0.1 channel_binding=requierd" + server,
        std::string("host=127.0.0.1,127.0.0.1,127.0.0.1 port=1,2 user=postgres")}) {
    auto refused_value = timed(conninfo);
    EXPECT_EQ(refused_value.code(), client_errc::invalid_config)
        << conninfo << ": " << refused_value.what();
    EXPECT_FALSE(refused_value.code() == condition::connection_error) << conninfo;
  }
}

TEST_F(ConnectionTest, ConnectToABlackholeTimesOut) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  proxy.pause();
  auto error = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{.conninfo = proxy.conninfo_prefix() + " user=postgres dbname=postgres",
                           .connect_timeout = 300ms};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(error.code(), client_errc::timeout);
  EXPECT_THAT(error.what(), HasSubstr("within 300 ms"));
  EXPECT_THAT(error.what(), HasSubstr(":" + std::to_string(proxy.port()) + " (database"));
}

// Failover to a host that takes the connection and never answers (a hung server, a proxy in
// front of a dead one): each host but the last gets its share of connect_timeout, or the
// conninfo's connect_timeout (per host, as libpq counts it), and the connect moves on.
TEST_F(ConnectionTest, AHostThatTakesTheConnectionAndNeverAnswersIsPassedOverInItsShare) {
  testing::FaultProxy hung("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  hung.pause();
  const std::string hosts =
      "host=127.0.0.1,127.0.0.1 user=postgres dbname=postgres port=" + std::to_string(hung.port()) +
      "," + std::to_string(cluster().port());
  auto connect_in = [&](std::string conninfo, std::chrono::milliseconds connect_timeout) {
    return run_coroutine([&]() -> asio::awaitable<std::pair<int, std::chrono::milliseconds>> {
      const auto started = std::chrono::steady_clock::now();
      ConnectOptions options{.conninfo = conninfo, .connect_timeout = connect_timeout};
      auto conn = co_await Connection::connect(std::move(options));
      const int port = (co_await conn.query("SELECT inet_server_port()")).scalar<int>();
      co_return std::pair{port, std::chrono::duration_cast<std::chrono::milliseconds>(
                                    std::chrono::steady_clock::now() - started)};
    });
  };
  // Two hosts, 3 s: the hung one gets half.
  const auto [port, took] = connect_in(hosts, 3s);
  EXPECT_EQ(port, cluster().port());
  EXPECT_GE(took, 1400ms);
  EXPECT_LT(took, 2900ms);
  // The conninfo's connect_timeout (2 s per host) in place of the share of 20 s.
  const auto [port_again, took_again] = connect_in(hosts + " connect_timeout=2", 20s);
  EXPECT_EQ(port_again, cluster().port());
  EXPECT_GE(took_again, 1900ms);
  EXPECT_LT(took_again, 5s);

  // Every host hung: the whole connect times out, and says what the first host did.
  testing::FaultProxy hung_too("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  hung_too.pause();
  auto both_hung = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{
        .conninfo = "host=127.0.0.1,127.0.0.1 port=" + std::to_string(hung.port()) + "," +
                    std::to_string(hung_too.port()) + " user=postgres",
        .connect_timeout = 600ms};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(both_hung.code(), client_errc::timeout);
  EXPECT_THAT(both_hung.what(), HasSubstr("within 600 ms"));
  EXPECT_THAT(both_hung.what(), HasSubstr(std::to_string(hung.port()) + " (database"));
  EXPECT_THAT(both_hung.what(), HasSubstr(std::to_string(hung_too.port()) + " (database"));
  EXPECT_THAT(both_hung.what(), HasSubstr("): no answer within "));

  // A mistake every host would answer alike ends the connect at the first host to say it.
  auto unknown_database = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{
        .conninfo = "host=127.0.0.1,127.0.0.1 port=" + std::to_string(cluster().port()) + "," +
                    std::to_string(hung.port()) + " user=postgres dbname=missing_db",
        .connect_timeout = 5s};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(unknown_database.sqlstate(), "3D000") << unknown_database.what();

  auto malformed = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{.conninfo = hosts + " connect_timeout=5s"};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(malformed.code(), client_errc::invalid_config) << malformed.what();
  EXPECT_THAT(malformed.what(), HasSubstr("connect_timeout"));
  // Read as libpq reads it: a sign and blanks around the number are fine.
  EXPECT_EQ(connect_in(hosts + " connect_timeout=' +2 '", 20s).first, cluster().port());

  // The conninfo's connect_timeout is a most, not a claim on the whole connect: with 3 s in all,
  // the hung host still gets only its share, and the second host is tried.
  const auto [port_shared, took_shared] = connect_in(hosts + " connect_timeout=10", 3s);
  EXPECT_EQ(port_shared, cluster().port());
  EXPECT_LT(took_shared, 2900ms);
  // One host: the conninfo's connect_timeout bounds it, as libpq's would.
  const auto one_hung_started = std::chrono::steady_clock::now();
  auto one_hung = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{.conninfo = "host=127.0.0.1 user=postgres connect_timeout=2 port=" +
                                       std::to_string(hung.port()),
                           .connect_timeout = 20s};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(one_hung.code(), client_errc::timeout) << one_hung.what();
  EXPECT_LT(std::chrono::steady_clock::now() - one_hung_started, 5s);

  // An empty port in a list is libpq's default port, not "the whole list for one host" (a URL
  // "host1:port1,host2" gives one).
  const std::string cluster_port = std::to_string(cluster().port());
  EXPECT_EQ(
      connect_in("host=127.0.0.1,127.0.0.1 port=" + cluster_port + ", user=postgres", 5s).first,
      cluster().port());
  EXPECT_EQ(
      connect_in("postgresql://postgres@127.0.0.1:" + cluster_port + ",127.0.0.1/postgres", 5s)
          .first,
      cluster().port());

  // Every host failed: the error says what each said, a name that did not resolve included.
  auto none = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{.conninfo = "host=no-such-host.invalid,127.0.0.1 port=1,1 user=postgres",
                           .connect_timeout = 5s};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(none.code(), client_errc::connect_failed) << none.what();
  EXPECT_THAT(none.what(), HasSubstr("no-such-host.invalid"));
}

// target_session_attrs over a primary and its hot standby, with pgrt trying the hosts one by
// one: read-write skips the standby, standby skips the primary, and prefer-standby (as libpq
// reads it: a standby if any host is one, else any server) takes the standby listed second.
TEST_F(ConnectionTest, TargetSessionAttrsPickTheRightServerOfAPrimaryAndItsStandby) {
  testing::TempCluster standby({.standby_of = cluster().dsn()});
  auto server_port = [&](const std::string& hosts_in_order, const std::string& attrs) {
    return run_coroutine([&]() -> asio::awaitable<int> {
      ConnectOptions options{
          .conninfo = "host=127.0.0.1,127.0.0.1 port=" + hosts_in_order +
                      " user=postgres dbname=postgres target_session_attrs=" + attrs,
          .connect_timeout = 10s};
      auto conn = co_await Connection::connect(std::move(options));
      co_return (co_await conn.query("SELECT inet_server_port()")).scalar<int>();
    });
  };
  const std::string primary_first =
      std::to_string(cluster().port()) + "," + std::to_string(standby.port());
  const std::string standby_first =
      std::to_string(standby.port()) + "," + std::to_string(cluster().port());
  EXPECT_EQ(server_port(standby_first, "read-write"), cluster().port());
  EXPECT_EQ(server_port(primary_first, "standby"), standby.port());
  EXPECT_EQ(server_port(primary_first, "prefer-standby"), standby.port());
  EXPECT_EQ(server_port(primary_first, "any"), cluster().port());
  // No standby among the hosts: prefer-standby takes the first server that answers.
  EXPECT_EQ(server_port("1," + std::to_string(cluster().port()), "prefer-standby"),
            cluster().port());
  // target_session_attrs from a service file (which parse_conninfo() does not read): libpq tries
  // the hosts itself, and reads it.
  const auto service_file = standby.directory() / "pg_service.conf";
  {
    std::ofstream out(service_file);
    out << "[ps]\ntarget_session_attrs=prefer-standby\n";
  }
  ::setenv("PGSERVICEFILE", service_file.c_str(), 1);
  const int by_service = run_coroutine([&]() -> asio::awaitable<int> {
    ConnectOptions options{.conninfo = "service=ps host=127.0.0.1,127.0.0.1 port=" + primary_first +
                                       " user=postgres dbname=postgres",
                           .connect_timeout = 10s};
    auto conn = co_await Connection::connect(std::move(options));
    co_return (co_await conn.query("SELECT inet_server_port()")).scalar<int>();
  });
  ::unsetenv("PGSERVICEFILE");
  EXPECT_EQ(by_service, standby.port());
}

// load_balance_hosts, libpq 16's keyword, which pgrt applies itself (it tries the hosts one by one,
// and its libpq may be older): random shuffles the host list on every connect, so 40 connects over
// two servers reach both (all on one by chance: 2^-39); disable, and no keyword, keep the order
// written. Any other value is a configuration error, as libpq 16 makes it.
TEST_F(ConnectionTest, LoadBalanceHostsRandomSpreadsTheConnectsOverTheHosts) {
  testing::TempCluster second;
  const std::string first_port = std::to_string(cluster().port());
  const std::string second_port = std::to_string(second.port());
  const std::string hosts = "host=127.0.0.1,127.0.0.1 port=" + first_port + "," + second_port +
                            " user=postgres dbname=postgres";
  auto ports_reached = [&](const std::string& conninfo, int connects) {
    return run_coroutine([&]() -> asio::awaitable<std::set<int>> {
      std::set<int> ports;
      for (int round = 0; round < connects; ++round) {
        ConnectOptions options{.conninfo = conninfo, .connect_timeout = 10s};
        auto conn = co_await Connection::connect(std::move(options));
        ports.insert(std::stoi(
            (co_await conn.query("SELECT current_setting('port')")).scalar<std::string>()));
        conn.close(CloseMode::immediate);
      }
      co_return ports;
    });
  };
  const std::set<int> both{cluster().port(), second.port()};
  const std::set<int> first_only{cluster().port()};
  EXPECT_EQ(ports_reached(hosts + " load_balance_hosts=random", 40), both);
  EXPECT_EQ(ports_reached("postgresql://postgres@127.0.0.1:" + first_port +
                              ",127.0.0.1:" + second_port + "/postgres?load_balance_hosts=random",
                          40),
            both);
  EXPECT_EQ(ports_reached(hosts + " load_balance_hosts=disable", 10), first_only);
  EXPECT_EQ(ports_reached(hosts, 10), first_only);
  auto wrong = run_coroutine([&]() -> asio::awaitable<Error> {
    ConnectOptions options{.conninfo = hosts + " load_balance_hosts=sometimes password=hunter2",
                           .connect_timeout = 10s};
    co_return co_await expect_error(Connection::connect(std::move(options)));
  });
  EXPECT_EQ(wrong.code(), client_errc::invalid_config) << wrong.what();
  EXPECT_THAT(wrong.what(), HasSubstr("load_balance_hosts"));
  EXPECT_THAT(wrong.what(), HasSubstr("random"));
  EXPECT_THAT(wrong.what(), ::testing::Not(HasSubstr("hunter2")));
}

TEST_F(ConnectionTest, CloseGracefullyOrImmediatelyEndsTheBackend) {
  for (CloseMode mode : {CloseMode::graceful, CloseMode::immediate}) {
    int pid = run_coroutine([mode]() -> asio::awaitable<int> {
      auto conn = co_await open();
      const int backend = conn.backend_pid();
      conn.close(mode);
      EXPECT_FALSE(conn.is_open());
      auto closed = co_await expect_error(conn.query("SELECT 1"));
      EXPECT_EQ(closed.code(), client_errc::not_connected);
      co_return backend;
    });
    EXPECT_TRUE(testing::eventually([&] { return !testing::backend_exists(cluster().dsn(), pid); }))
        << "the backend outlived close()";
  }
}

TEST_F(ConnectionTest, CloseAndWaitReturnsOnlyOnceTheServerHasEndedTheBackend) {
  BlockingConnection observer(cluster().dsn());
  for (int round = 0; round < 20; ++round) {
    const int pid = run_coroutine([]() -> asio::awaitable<int> {
      auto conn = co_await open();
      const int backend = conn.backend_pid();
      EXPECT_TRUE(co_await conn.close_and_wait(2s));
      EXPECT_FALSE(conn.is_open());
      co_return backend;
    });
    // No "eventually": the backend is gone from pg_stat_activity already.
    ASSERT_EQ(
        observer.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = " + std::to_string(pid)),
        "0")
        << "round " << round;
  }
}

TEST_F(ConnectionTest, CloseAndWaitGivesUpOnAServerThatDoesNotAnswer) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        ConnectOptions options{.conninfo =
                                   proxy.conninfo_prefix() + " user=postgres dbname=postgres"};
        auto conn = co_await Connection::connect(std::move(options));
        proxy.pause();
        const auto start = std::chrono::steady_clock::now();
        EXPECT_FALSE(co_await conn.close_and_wait(300ms));
        const auto took = std::chrono::steady_clock::now() - start;
        EXPECT_GE(took, 250ms);
        EXPECT_LT(took, 2s);
        EXPECT_FALSE(conn.is_open());
      },
      20s);
  proxy.resume();
}

TEST(ErrorText, MaskPasswordHidesPasswordsInUrlsAndKeyValueStrings) {
  const std::string masked = mask_password("host=db user=app password=secret dbname=x");
  EXPECT_THAT(masked, HasSubstr("password=****"));
  EXPECT_THAT(masked, HasSubstr("host=db"));
  EXPECT_THAT(masked, HasSubstr("user=app"));
  EXPECT_THAT(masked, Not(HasSubstr("secret")));
  EXPECT_THAT(mask_password("postgresql://app:secret@db:5432/x"), Not(HasSubstr("secret")));
  EXPECT_THAT(mask_password("postgresql://app:secret@db:5432/x"), HasSubstr("password=****"));
  EXPECT_THAT(mask_password("password=secret host"), Not(HasSubstr("secret")));
}

// ---------------------------------------------------------------- cancellation and faults

TEST_F(ConnectionTest, CancelledSleepEndsQuicklyAndConnectionRunsAgain) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto executor = co_await asio::this_coro::executor;
    asio::cancellation_signal cancel;
    std::optional<Error> outcome;
    bool done = false;
    const auto start = std::chrono::steady_clock::now();
    asio::co_spawn(
        executor,
        [&]() -> awaitable_void {
          outcome = co_await expect_error(conn.query("SELECT pg_sleep(10)"));
          done = true;
        },
        asio::bind_cancellation_slot(cancel.slot(), asio::detached));
    asio::steady_timer timer(executor, 100ms);
    co_await timer.async_wait(asio::use_awaitable);
    cancel.emit(asio::cancellation_type::terminal);
    while (!done) {
      timer.expires_after(5ms);
      co_await timer.async_wait(asio::use_awaitable);
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
    EXPECT_EQ(outcome->code(), client_errc::cancelled);
    EXPECT_TRUE(outcome->code() == condition::query_canceled);
    EXPECT_FALSE(conn.is_broken());
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);

    const auto again = std::chrono::steady_clock::now();
    auto timeout = co_await expect_error(with_timeout(conn.query("SELECT pg_sleep(10)"), 100ms));
    EXPECT_EQ(timeout.code(), client_errc::timeout);
    EXPECT_TRUE(timeout.code() == condition::timeout);
    EXPECT_LT(std::chrono::steady_clock::now() - again, 1s);
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
  });
}

TEST_F(ConnectionTest, InterruptFromAnotherThreadEndsARunningStatementAndTheBackend) {
  int pid = run_coroutine([]() -> asio::awaitable<int> {
    auto conn = co_await open();
    const int backend = conn.backend_pid();
    const auto start = std::chrono::steady_clock::now();
    std::thread interrupter([&conn] {
      std::this_thread::sleep_for(100ms);
      conn.interrupt();
    });
    auto cut = co_await expect_error(conn.query("SELECT pg_sleep(10)"));
    interrupter.join();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
    EXPECT_EQ(cut.code(), client_errc::connection_lost);
    EXPECT_THAT(cut.what(), HasSubstr("interrupted"));
    EXPECT_TRUE(conn.is_broken());
    auto later = co_await expect_error(conn.query("SELECT 1"));
    EXPECT_EQ(later.code(), client_errc::not_connected);
    conn.interrupt();  // closed already: a no-op
    co_return backend;
  });
  EXPECT_TRUE(testing::eventually([&] { return !testing::backend_exists(cluster().dsn(), pid); }))
      << "the backend outlived interrupt()";
}

// libpq 15's PQcancel() has no timeout, and each cancel request runs on a thread of its own: behind
// a network that accepts the request's connection and never answers, each would hold its thread
// for good. At most 32 are on their way at once; past that, none is sent.
TEST_F(ConnectionTest, CancelRequestsThatNeverGetAnAnswerHoldAtMost32Threads) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  const auto threads = [] {
    return std::distance(std::filesystem::directory_iterator("/proc/self/task"),
                         std::filesystem::directory_iterator());
  };
  long before = 0;
  long during = 0;
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions options;  // (named: g++ 12 miscompiles a braced temporary in a co_await)
    options.conninfo = proxy.conninfo_prefix() + " user=postgres dbname=postgres";
    auto conn = co_await Connection::connect(options);
    before = threads();
    proxy.pause();  // the requests' connections are accepted, and nothing answers them
    for (int i = 0; i < 100; ++i) conn.interrupt(std::chrono::milliseconds(0));
    during = threads();
    proxy.resume();
  });
  EXPECT_GE(during - before, 30) << "the requests did not block: the test proves nothing";
  EXPECT_LE(during - before, 32) << "a thread per request, without a bound";
  EXPECT_TRUE(testing::eventually([&] { return threads() <= before; }))
      << "the requests' threads did not end once answered";
}

// interrupt() waiting for its cancel request to go out (as an exit handler does): the server's
// 57014 for it is read before the socket is cut, and the statement still reports the interrupt
// (connection_lost), as documented, not a cancellation the owner never asked for.
TEST_F(ConnectionTest, AnInterruptWhoseCancelArrivesFirstStillReportsTheInterrupt) {
  run_coroutine([]() -> awaitable_void {
    for (int round = 0; round < 3; ++round) {
      auto conn = co_await open();
      std::thread interrupter([&conn] {
        std::this_thread::sleep_for(100ms);
        conn.interrupt(2s);
      });
      auto cut = co_await expect_error(conn.query("SELECT pg_sleep(10)"));
      interrupter.join();
      EXPECT_EQ(cut.code(), client_errc::connection_lost) << cut.what();
      EXPECT_THAT(cut.what(), HasSubstr("interrupted"));
      EXPECT_TRUE(conn.is_broken());
    }
  });
}

// The same for a pipeline: the 57014 for interrupt()'s cancel and the aborts of the rest of the
// segment, read before the cut, are the interrupt (connection_lost), not outcomes of the run.
TEST_F(ConnectionTest, APipelineWhoseInterruptCancelArrivesFirstReportsTheInterrupt) {
  run_coroutine([]() -> awaitable_void {
    for (int round = 0; round < 3; ++round) {
      auto conn = co_await open();
      Pipeline pipeline;
      pipeline.add("SELECT 1");
      pipeline.add("SELECT pg_sleep(10)");
      pipeline.add("SELECT 2");
      std::thread interrupter([&conn] {
        std::this_thread::sleep_for(100ms);
        conn.interrupt(2s);
      });
      auto cut = co_await expect_error(conn.run(pipeline));
      interrupter.join();
      EXPECT_EQ(cut.code(), client_errc::connection_lost) << cut.what();
      EXPECT_THAT(cut.what(), HasSubstr("interrupted"));
      EXPECT_TRUE(conn.is_broken());
    }
  });
}

TEST_F(ConnectionTest, WithTimeoutReportsAFastFailureAtOnce) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const auto start = std::chrono::steady_clock::now();
    auto error = co_await expect_error(with_timeout(conn.query("SELECT 1 / 0"), 5s));
    EXPECT_EQ(error.sqlstate(), "22012");
    EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
    EXPECT_EQ((co_await with_timeout(conn.query("SELECT 4"), 5s)).scalar<int>(), 4);
  });
}

TEST_F(ConnectionTest, TextParametersDoNotRunIntoEachOther) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto rows = co_await conn.query("SELECT $1::text, $2::text, $3::int4, $4::text", "first",
                                    std::string("second"), 3, std::string_view("fourth"));
    EXPECT_EQ(rows[0].get<std::string>(0), "first");
    EXPECT_EQ(rows[0].get<std::string>(1), "second");
    EXPECT_EQ(rows[0].get<int>(2), 3);
    EXPECT_EQ(rows[0].get<std::string>(3), "fourth");
  });
}

TEST_F(ConnectionTest, TerminatedBackendIsReportedAsConnectionLost) {
  run_coroutine(
      []() -> awaitable_void {
        auto conn = co_await open();
        auto executor = co_await asio::this_coro::executor;
        const int pid = conn.backend_pid();
        asio::co_spawn(
            executor,
            [pid]() -> awaitable_void {
              auto killer = co_await open();
              asio::steady_timer timer(co_await asio::this_coro::executor, 100ms);
              co_await timer.async_wait(asio::use_awaitable);
              co_await killer.query("SELECT pg_terminate_backend($1)", pid);
            },
            asio::detached);
        auto lost = co_await expect_error(conn.query("SELECT pg_sleep(10)"));
        EXPECT_EQ(lost.code(), client_errc::connection_lost);
        EXPECT_TRUE(lost.code() == condition::connection_error);
        EXPECT_EQ(lost.sqlstate(), "57P01");
        EXPECT_THAT(lost.what(), HasSubstr("terminating connection"));
        EXPECT_TRUE(conn.is_broken());
        EXPECT_EQ((co_await expect_error(conn.query("SELECT 1"))).code(),
                  client_errc::not_connected);
      },
      20s);
}

TEST_F(ConnectionTest, BlackholedQueryHitsTheDeadlineAndTheConnectionIsBroken) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        ConnectOptions options{
            .conninfo = proxy.conninfo_prefix() + " user=postgres dbname=postgres",
            .cancel_timeout = 500ms};
        auto conn = co_await Connection::connect(std::move(options));
        EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
        proxy.pause();
        const auto start = std::chrono::steady_clock::now();
        auto error = co_await expect_error(with_timeout(conn.query("SELECT 2"), 200ms));
        EXPECT_EQ(error.code(), client_errc::timeout);
        EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
        EXPECT_TRUE(conn.is_broken());
        EXPECT_FALSE(conn.is_open());
      },
      20s);
  proxy.resume();
}

TEST_F(ConnectionTest, DroppedConnectionIsReportedAsConnectionLost) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        ConnectOptions options{.conninfo =
                                   proxy.conninfo_prefix() + " user=postgres dbname=postgres"};
        auto conn = co_await Connection::connect(std::move(options));
        EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
        proxy.drop_all();
        auto error = co_await expect_error(conn.query("SELECT 2"));
        EXPECT_EQ(error.code(), client_errc::connection_lost);
        EXPECT_TRUE(conn.is_broken());
      },
      20s);
}

// ---------------------------------------------------------------- prepared statements, pipelines

// Runs `sql` (DEALLOCATE ALL, DISCARD ALL) through libpq itself, out of pgrt's sight: the server
// forgets the statements pgrt has cached, as when a function or a pooler's other session did it.
void behind_pgrts_back(Connection& conn, const char* sql) {
  PGresult* result = PQexec(conn.native_handle(), sql);
  EXPECT_EQ(PQresultStatus(result), PGRES_COMMAND_OK) << PQerrorMessage(conn.native_handle());
  PQclear(result);
}

TEST_F(ConnectionTest, PreparedStatementsAreCachedPerTextAndTypesWithLruEviction) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions options{.conninfo = cluster().dsn(), .statement_cache_size = 2};
    auto conn = co_await Connection::connect(std::move(options));
    auto prepared_count = [&]() -> asio::awaitable<int> {
      co_return (co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>();
    };
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ((co_await conn.query_prepared("SELECT $1::int8 + 1", i)).scalar<int>(), i + 1);
    }
    EXPECT_EQ(co_await prepared_count(), 1);
    EXPECT_EQ((co_await conn.query_prepared("SELECT $1::text", "x")).scalar<std::string>(),
              std::string_view("x"));
    EXPECT_EQ((co_await conn.query_prepared("SELECT 3")).scalar<int>(), 3);
    EXPECT_EQ(co_await prepared_count(), 2) << "the least recently used one is deallocated";
    behind_pgrts_back(conn, "DEALLOCATE ALL");
    EXPECT_EQ((co_await conn.query_prepared("SELECT 3")).scalar<int>(), 3)
        << "a statement deallocated behind pgrt's back is prepared again";
    auto error = co_await expect_error(conn.query_prepared("SELEC 1"));
    EXPECT_EQ(error.sqlstate(), "42601");
  });
}

// One DISCARD ALL (or DEALLOCATE ALL) forgets every cached statement at once: that is one
// forgetting, however many statements then find their name gone. Counted per statement, a second
// one made the connection look like it was behind a transaction pooler, and it went on without
// named statements for good.
TEST_F(ConnectionTest, OneDiscardAllIsOneForgettingAndTheCacheKeepsWorking) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto prepared_count = [&]() -> asio::awaitable<int> {
      co_return (co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>();
    };
    for (const char* sql : {"SELECT 1", "SELECT 2", "SELECT 3"}) {
      EXPECT_EQ((co_await conn.query_prepared(sql)).scalar<int>(), sql[7] - '0');
    }
    EXPECT_EQ(co_await prepared_count(), 3);
    behind_pgrts_back(conn, "DISCARD ALL");
    // Each found its name gone, prepared again (named), and ran.
    for (const char* sql : {"SELECT 1", "SELECT 2", "SELECT 3"}) {
      EXPECT_EQ((co_await conn.query_prepared(sql)).scalar<int>(), sql[7] - '0');
    }
    EXPECT_EQ(co_await prepared_count(), 3) << "the statement cache was turned off";
  });
}

TEST_F(ConnectionTest, PipelineReportsEachStatementWithAFailureInTheMiddle) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE piped (v int)");

    Pipeline one_segment;
    for (int i = 0; i < 100; ++i) {
      if (i == 50) {
        one_segment.add("SELECT 1 / $1", 0);
      } else {
        one_segment.add("INSERT INTO piped VALUES ($1)", i);
      }
    }
    auto outcomes = co_await conn.run(one_segment);
    EXPECT_EQ(outcomes.size(), 100U);
    if (outcomes.size() != 100U) co_return;
    for (int i = 0; i < 50; ++i) EXPECT_TRUE(outcomes[i].ok()) << i;
    EXPECT_EQ(sqlstate_of(outcomes[50].error), "22012");
    EXPECT_EQ(outcomes[50].diagnostics.sqlstate, "22012");
    for (int i = 51; i < 100; ++i) EXPECT_EQ(outcomes[i].error, client_errc::pipeline_aborted) << i;
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM piped")).scalar<int>(), 0)
        << "one sync segment is one implicit transaction";

    Pipeline segments;
    for (int i = 0; i < 100; ++i) {
      if (i == 50) {
        segments.add("SELECT 1 / $1", 0).sync();
      } else {
        segments.add("INSERT INTO piped VALUES ($1) RETURNING v", i).sync();
      }
    }
    outcomes = co_await conn.run(segments);
    for (int i = 0; i < 100; ++i) {
      if (i == 50) {
        EXPECT_EQ(sqlstate_of(outcomes[i].error), "22012");
      } else {
        EXPECT_TRUE(outcomes[i].ok()) << i;
        EXPECT_EQ(outcomes[i].result.scalar<int>(), i);
      }
    }
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM piped")).scalar<int>(), 99);
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
  });
}

// A segment whose statements all ran but whose implicit transaction failed to commit (a deferred
// foreign key checked at the sync) took no effect: each of its statements reports the commit's
// error, and the outcomes of the segments after it stay in their places (the commit's error was
// given to the next segment's first statement, and every later outcome shifted by one).
TEST_F(ConnectionTest, APipelineSegmentThatFailsToCommitFailsItsStatementsAndShiftsNoOther) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE commit_parent (id int PRIMARY KEY)");
    co_await conn.execute(
        "CREATE TEMP TABLE commit_child (parent int REFERENCES commit_parent "
        "DEFERRABLE INITIALLY DEFERRED)");
    for (const bool prepared : {true, false}) {
      Pipeline pipeline;
      pipeline.prepare_statements(prepared);
      pipeline.add("INSERT INTO commit_parent VALUES ($1)", 1)
          .add("INSERT INTO commit_child VALUES ($1)", 99)
          .sync()
          .add("SELECT $1::int", 2)
          .sync()
          .add("INSERT INTO commit_child VALUES ($1)", 98)
          .sync()
          .add("SELECT $1::int", 4);
      for (int run = 0; run < 2; ++run) {
        const auto outcomes = co_await conn.run(pipeline);
        EXPECT_EQ(outcomes.size(), 5U);
        if (outcomes.size() != 5U) co_return;
        for (const std::size_t failed : {0U, 1U, 3U}) {
          EXPECT_EQ(sqlstate_of(outcomes[failed].error), "23503")
              << prepared << run << ": statement " << failed << " "
              << outcomes[failed].error.message();
          EXPECT_THAT(outcomes[failed].diagnostics.hint, HasSubstr("committed"));
          EXPECT_EQ(outcomes[failed].result.native_handle(), nullptr);
        }
        EXPECT_EQ(outcomes[1].diagnostics.statement, "INSERT INTO commit_child VALUES ($1)");
        EXPECT_EQ(outcomes[2].result.scalar<int>(), 2) << prepared << run;
        EXPECT_EQ(outcomes[4].result.scalar<int>(), 4) << prepared << run;
        EXPECT_EQ((co_await conn.query("SELECT count(*) FROM commit_parent")).scalar<int>(), 0)
            << "the failed commit's segment took effect";
      }
    }
  });
}

// libpq 15 leaves single-row mode on after a streamed statement and does not reset it for the
// first statement of a pipeline: that one's rows came back as single-row results, which run()
// reported as a protocol error and which shifted every later outcome.
TEST_F(ConnectionTest, APipelineRightAfterAStreamGetsEveryResultWhole) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const auto streamed = co_await conn.stream("SELECT generate_series(1, 3)", [](const Row&) {});
    EXPECT_EQ(streamed, 3U);
    Pipeline pipeline;
    for (int i = 0; i < 5; ++i) pipeline.add("SELECT generate_series(1, $1::int)", i + 1);
    const auto outcomes = co_await conn.run(pipeline);
    EXPECT_EQ(outcomes.size(), 5U);
    if (outcomes.size() != 5U) co_return;
    for (std::size_t i = 0; i < 5; ++i) {
      EXPECT_TRUE(outcomes[i].ok()) << i << ": " << outcomes[i].error.message();
      EXPECT_EQ(outcomes[i].result.size(), i + 1) << i;
    }
  });
}

// COPY in a pipeline is refused before anything is sent (libpq's copy mode would otherwise hand
// out its result for ever); an empty or comment-only statement in a pipeline runs, as alone.
TEST_F(ConnectionTest, APipelineRefusesCopyAndRunsAnEmptyStatement) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE pipeline_copy (v int)");
    Pipeline with_copy;
    with_copy.add("INSERT INTO pipeline_copy VALUES (1)");
    with_copy.add("/* c */ COPY pipeline_copy FROM STDIN");
    auto error = co_await testing::expect_error(conn.run(with_copy));
    EXPECT_EQ(error.code(), client_errc::protocol_error) << error.what();
    EXPECT_THAT(error.diagnostics().hint, HasSubstr("copy_from"));
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pipeline_copy")).scalar<std::int64_t>(), 0)
        << "part of a refused pipeline ran";
    for (const bool prepared : {true, false}) {
      Pipeline with_empty;
      with_empty.prepare_statements(prepared);
      with_empty.add("INSERT INTO pipeline_copy VALUES (2)");
      with_empty.add("-- a note");
      with_empty.sync();
      with_empty.add("SELECT 3");
      const auto outcomes = co_await conn.run(with_empty);
      EXPECT_EQ(outcomes.size(), 3U);
      for (const auto& outcome : outcomes) {
        EXPECT_TRUE(outcome.ok()) << prepared << ": " << outcome.error.message();
      }
    }
  });
}

// A pipeline's statements run prepared from the connection's cache, the one query_prepared()
// uses: prepared once (in one extra round trip the first time), then run by name.
TEST_F(ConnectionTest, PipelineStatementsArePreparedOnceInTheCacheQueryPreparedUses) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    auto prepared = [&]() -> asio::awaitable<std::vector<std::string>> {
      auto rows =
          co_await conn.query("SELECT statement FROM pg_prepared_statements ORDER BY statement");
      std::vector<std::string> statements;
      for (const Row& row : rows) statements.push_back(row.get<std::string>(0));
      co_return statements;
    };
    Pipeline pipeline;
    for (int i = 0; i < 10; ++i) pipeline.add("SELECT $1::int8 * 2", i);
    pipeline.sync().add("SELECT 'two'");
    std::vector<std::string> expected;
    expected.emplace_back("SELECT $1::int8 * 2");
    expected.emplace_back("SELECT 'two'");
    for (int run = 0; run < 3; ++run) {
      const auto outcomes = co_await conn.run(pipeline);
      EXPECT_EQ(outcomes.size(), 11U);
      if (outcomes.size() != 11U) co_return;
      for (int i = 0; i < 10; ++i) {
        EXPECT_TRUE(outcomes[i].ok()) << i << ": " << outcomes[i].diagnostics.message;
        EXPECT_EQ(outcomes[i].result.scalar<std::int64_t>(), 2 * i) << i;
      }
      EXPECT_EQ(outcomes[10].result.scalar<std::string>(), std::string_view("two"));
      const std::vector<std::string> statements = co_await prepared();
      EXPECT_EQ(statements, expected)
          << "run " << run << ": each text prepared once, on the first run";
    }
    EXPECT_EQ((co_await conn.query_prepared("SELECT $1::int8 * 2", 21)).scalar<std::int64_t>(), 42);
    EXPECT_EQ((co_await prepared()).size(), 2U)
        << "query_prepared() found the pipeline's statement";

    Pipeline unnamed;
    unnamed.prepare_statements(false).add("SELECT $1::int8 + 1", 1).add("SELECT 'unnamed'");
    const auto outcomes = co_await conn.run(unnamed);
    EXPECT_EQ(outcomes.at(0).result.scalar<std::int64_t>(), 2);
    EXPECT_EQ(outcomes.at(1).result.scalar<std::string>(), std::string_view("unnamed"));
    EXPECT_EQ((co_await prepared()).size(), 2U) << "prepare_statements(false) prepared something";
  });
}

// A statement that cannot be prepared (a syntax error, a missing table) runs unnamed and fails in
// its own place, with the same segment semantics as ever: the statements before it in its segment
// ran (and were rolled back with it), the ones after it were skipped, other segments ran.
TEST_F(ConnectionTest, APipelineStatementThatFailsToPrepareFailsInItsOwnPlace) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE prepared_pipe (v int)");
    Pipeline pipeline;
    pipeline.add("INSERT INTO prepared_pipe VALUES ($1)", 1)
        .add("SELEC 2")
        .add("INSERT INTO prepared_pipe VALUES ($1)", 3)
        .sync()
        .add("INSERT INTO prepared_pipe VALUES ($1)", 4)
        .add("SELECT v FROM no_such_table")
        .sync()
        .add("INSERT INTO prepared_pipe VALUES ($1) RETURNING v", 6);
    for (int run = 0; run < 2; ++run) {
      co_await conn.execute("TRUNCATE prepared_pipe");
      const auto outcomes = co_await conn.run(pipeline);
      EXPECT_EQ(outcomes.size(), 6U);
      if (outcomes.size() != 6U) co_return;
      EXPECT_TRUE(outcomes[0].ok()) << run;
      EXPECT_EQ(sqlstate_of(outcomes[1].error), "42601") << run;
      EXPECT_EQ(outcomes[1].diagnostics.statement, "SELEC 2") << run;
      EXPECT_EQ(outcomes[2].error, client_errc::pipeline_aborted) << run;
      EXPECT_TRUE(outcomes[3].ok()) << run;
      EXPECT_EQ(sqlstate_of(outcomes[4].error), "42P01") << run;
      EXPECT_EQ(outcomes[5].result.scalar<int>(), 6) << run;
      EXPECT_EQ((co_await conn.query("SELECT array_agg(v ORDER BY v)::text FROM prepared_pipe"))
                    .scalar<std::string>(),
                std::string_view("{6}"))
          << run << ": each failed segment is rolled back, the last one committed";
    }
  });
}

// The server forgot pgrt's statements (DEALLOCATE ALL by hand): the segments that failed for it
// are prepared and run again, once, and nothing runs twice; inside a transaction block nothing is
// run again (the block has failed), and a later run succeeds (the second time the server forgets
// on one connection, pgrt takes it for a transaction pooler and goes on unnamed, as
// query_prepared() does).
TEST_F(ConnectionTest, APipelineWhoseStatementsTheServerForgotRunsItsFailedSegmentsOnce) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE forgetful (v int)");
    Pipeline pipeline;
    pipeline.add("INSERT INTO forgetful VALUES ($1)", 1)
        .add("INSERT INTO forgetful VALUES ($1)", 2)
        .sync()
        .add("SELECT count(*) FROM forgetful");
    auto outcomes = co_await conn.run(pipeline);
    EXPECT_EQ(outcomes.at(2).result.scalar<std::int64_t>(), 2);
    behind_pgrts_back(conn, "DEALLOCATE ALL");
    outcomes = co_await conn.run(pipeline);
    for (std::size_t i = 0; i < outcomes.size(); ++i) {
      EXPECT_TRUE(outcomes[i].ok()) << i << ": " << outcomes[i].diagnostics.message;
    }
    EXPECT_EQ(outcomes.at(2).result.scalar<std::int64_t>(), 4) << "each insert ran exactly once";

    behind_pgrts_back(conn, "DEALLOCATE ALL");
    co_await conn.begin();
    outcomes = co_await conn.run(pipeline);
    EXPECT_EQ(sqlstate_of(outcomes.at(0).error), "26000") << "inside a transaction block";
    EXPECT_THAT(outcomes.at(0).diagnostics.hint, HasSubstr("PGRT_POOLER"));
    EXPECT_EQ(outcomes.at(1).error, client_errc::pipeline_aborted);
    EXPECT_FALSE(outcomes.at(2).ok()) << "the block has failed (26000 or 25P02)";
    co_await conn.rollback();
    outcomes = co_await conn.run(pipeline);
    EXPECT_TRUE(outcomes.at(0).ok()) << outcomes.at(0).diagnostics.message;
    EXPECT_EQ(outcomes.at(2).result.scalar<std::int64_t>(), 6);
  });
}

// Inside a transaction block a pipeline prepares nothing (a statement that failed to prepare would
// abort the block before the pipeline ran); statements the cache holds run by name there. A
// pipeline of more distinct statements than the cache holds prepares what fits and runs the rest
// unnamed.
// A prepared SELECT * whose table changed columns (the server's 0A000, "cached plan must not
// change result type") did not run: it is prepared again (the old one deallocated) and runs once
// more, through query_prepared() and in a pipeline alike; inside a transaction block the error
// stands (the block is aborted), and the next use outside prepares it again.
TEST_F(ConnectionTest, APreparedStatementWhoseResultChangedShapeIsPreparedAgain) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("DROP TABLE IF EXISTS reshaped");
    co_await conn.execute("CREATE TABLE reshaped (a int)");
    co_await conn.execute("INSERT INTO reshaped VALUES (1)");
    auto statements_of = [&](std::string text) -> asio::awaitable<int> {
      auto rows = co_await conn.query(
          "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1", text);
      co_return rows.scalar<int>();
    };
    const std::string select_all = "SELECT * FROM reshaped";
    EXPECT_EQ((co_await conn.query_prepared(select_all)).columns(), 1U);
    Pipeline pipeline;
    pipeline.add("SELECT 2").sync().add(select_all);  // (the last segment: it may run again)
    auto outcomes = co_await conn.run(pipeline);
    EXPECT_EQ(outcomes.at(1).result.columns(), 1U);

    co_await conn.execute("ALTER TABLE reshaped ADD COLUMN b int DEFAULT 7");
    auto result = co_await conn.query_prepared(select_all);
    EXPECT_EQ(result.columns(), 2U);
    if (result.columns() == 2U) {
      EXPECT_EQ(result[0].get<int>(1), 7);
    }
    EXPECT_EQ(co_await statements_of(select_all), 1) << "the stale statement was not deallocated";

    co_await conn.execute("ALTER TABLE reshaped ADD COLUMN c int DEFAULT 8");
    outcomes = co_await conn.run(pipeline);
    EXPECT_EQ(outcomes.at(0).result.scalar<int>(), 2);
    EXPECT_TRUE(outcomes.at(1).ok()) << outcomes.at(1).diagnostics.message;
    if (outcomes.at(1).ok()) {
      EXPECT_EQ(outcomes.at(1).result.columns(), 3U);
    }
    EXPECT_EQ(co_await statements_of(select_all), 0) << "ran again unnamed; the stale one freed";
    EXPECT_EQ((co_await conn.run(pipeline)).at(1).result.columns(), 3U);
    EXPECT_EQ(co_await statements_of(select_all), 1) << "the next run prepares it again";

    co_await conn.execute("ALTER TABLE reshaped ADD COLUMN d int DEFAULT 9");
    co_await conn.begin();
    auto error = co_await testing::expect_error(conn.query_prepared(select_all));
    EXPECT_EQ(error.sqlstate(), "0A000") << error.what();
    co_await conn.rollback();
    EXPECT_EQ((co_await conn.query_prepared(select_all)).columns(), 4U);
    EXPECT_EQ(co_await statements_of(select_all), 1);
  });
}

// A pipeline that runs an ALTER TABLE and, in the same segment, a SELECT * the cache prepared
// before it: the SELECT went stale and failed the segment; run again, it was prepared again before
// the ALTER ran, went stale again, and the pipeline failed every time. It runs unnamed the second
// time, and succeeds.
TEST_F(ConnectionTest, APipelineThatChangesATableAndSelectsStarFromItInOneSegmentSucceeds) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("DROP TABLE IF EXISTS reshaped_in_pipeline");
    co_await conn.execute("CREATE TABLE reshaped_in_pipeline (a int)");
    co_await conn.execute("INSERT INTO reshaped_in_pipeline VALUES (1)");
    const std::string select_all = "SELECT * FROM reshaped_in_pipeline";
    Pipeline select_only;
    select_only.add(select_all);
    EXPECT_EQ((co_await conn.run(select_only)).at(0).result.columns(), 1U);
    Pipeline change_and_select;
    change_and_select.add("ALTER TABLE reshaped_in_pipeline ADD COLUMN b int DEFAULT 7")
        .add(select_all);
    const auto outcomes = co_await conn.run(change_and_select);
    EXPECT_TRUE(outcomes.at(0).ok()) << outcomes.at(0).diagnostics.message;
    EXPECT_TRUE(outcomes.at(1).ok()) << outcomes.at(1).diagnostics.message;
    if (outcomes.at(1).ok()) {
      EXPECT_EQ(outcomes.at(1).result.columns(), 2U);
    }
    EXPECT_EQ((co_await conn.run(select_only)).at(0).result.columns(), 2U)
        << "prepared again on the next run";
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pg_prepared_statements WHERE statement "
                                   "= 'SELECT * FROM reshaped_in_pipeline'"))
                  .scalar<int>(),
              1);
  });
}

// Statements evicted from the cache inside transaction blocks (where nothing is deallocated) are
// deallocated at the next request outside one: a service that prepares only inside transactions
// used to leave every evicted statement on the server for the connection's life.
TEST_F(ConnectionTest, StatementsEvictedInsideTransactionBlocksAreDeallocatedOutsideThem) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions options{.conninfo = cluster().dsn(), .statement_cache_size = 2};
    auto conn = co_await Connection::connect(std::move(options));
    for (int i = 0; i < 20; ++i) {
      co_await conn.begin();
      const std::string sql = "SELECT " + std::to_string(i) + " + $1::int";
      EXPECT_EQ((co_await conn.query_prepared(sql, 1)).scalar<int>(), i + 1);
      co_await conn.commit();
    }
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>(), 2)
        << "evicted statements stayed on the server";
    Pipeline pipeline;
    pipeline.add("SELECT 100 + $1::int", 1);
    co_await conn.begin();
    EXPECT_EQ((co_await conn.query_prepared("SELECT 101 + $1::int", 1)).scalar<int>(), 102);
    EXPECT_EQ((co_await conn.query_prepared("SELECT 102 + $1::int", 1)).scalar<int>(), 103);
    co_await conn.commit();
    EXPECT_EQ((co_await conn.run(pipeline)).at(0).result.scalar<int>(), 101);
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>(), 2)
        << "a pipeline left evicted statements on the server";
  });
}

TEST_F(ConnectionTest, APipelinePreparesNothingInATransactionAndNoMoreThanTheCacheHolds) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions options{.conninfo = cluster().dsn(), .statement_cache_size = 3};
    auto conn = co_await Connection::connect(std::move(options));
    auto prepared_count = [&]() -> asio::awaitable<int> {
      co_return (co_await conn.query("SELECT count(*) FROM pg_prepared_statements")).scalar<int>();
    };
    Pipeline five;
    for (int i = 0; i < 5; ++i) five.add("SELECT " + std::to_string(i) + " + $1::int", 10);
    co_await conn.begin();
    auto outcomes = co_await conn.run(five);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(outcomes.at(i).result.scalar<int>(), i + 10);
    EXPECT_EQ(co_await prepared_count(), 0);
    co_await conn.commit();
    for (int run = 0; run < 2; ++run) {
      outcomes = co_await conn.run(five);
      for (int i = 0; i < 5; ++i) EXPECT_EQ(outcomes.at(i).result.scalar<int>(), i + 10);
      EXPECT_EQ(co_await prepared_count(), 3) << run;
    }
  });
}

// ---------------------------------------------------------------- transactions

TEST_F(ConnectionTest, TransactionHelperCommitsOrRollsBack) {
  BlockingConnection observer(cluster().dsn());
  observer.query("DROP TABLE IF EXISTS tx_outcome; CREATE TABLE tx_outcome (label text)");
  auto count = [&](const std::string& label) {
    return observer.scalar("SELECT count(*) FROM tx_outcome WHERE label = '" + label + "'");
  };
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const int value = co_await transaction(conn, [](Connection& c) -> asio::awaitable<int> {
      co_await c.execute("INSERT INTO tx_outcome VALUES ($1)", "committed");
      co_return 42;
    });
    EXPECT_EQ(value, 42);
    EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);

    try {
      co_await transaction(conn, [](Connection& c) -> awaitable_void {
        co_await c.execute("INSERT INTO tx_outcome VALUES ($1)", "thrown");
        throw std::runtime_error("body failed");
      });
      ADD_FAILURE() << "the body's exception was swallowed";
    } catch (const std::runtime_error& error) {
      EXPECT_STREQ(error.what(), "body failed");
    }
    EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);

    auto cancelled = co_await expect_error(with_timeout(
        transaction(conn,
                    [](Connection& c) -> awaitable_void {
                      co_await c.execute("INSERT INTO tx_outcome VALUES ($1)", "cancelled");
                      co_await c.query("SELECT pg_sleep(10)");
                    }),
        200ms));
    EXPECT_EQ(cancelled.code(), client_errc::timeout);
    EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);

    co_await transaction(
        conn,
        [](Connection& c) -> awaitable_void {
          EXPECT_EQ((co_await c.query("SHOW transaction_isolation")).scalar<std::string>(),
                    std::string_view("serializable"));
          EXPECT_EQ((co_await c.query("SHOW transaction_read_only")).scalar<std::string>(),
                    std::string_view("on"));
        },
        TransactionOptions{.isolation = IsolationLevel::serializable, .read_only = true});
  });
  EXPECT_EQ(count("committed"), "1");
  EXPECT_EQ(count("thrown"), "0");
  EXPECT_EQ(count("cancelled"), "0");
}

// ---------------------------------------------------------------- COPY

TEST_F(ConnectionTest, CopyFromStdinWritesEveryRowExactly) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute(
        "CREATE TEMP TABLE copied (id int8, name text, score float8, ok bool, data bytea, "
        "at timestamptz)");
    std::string data;
    const auto at = std::chrono::sys_days(std::chrono::year(2023) / 7 / 14) + 1h + 2min + 3s +
                    std::chrono::microseconds(456789);
    const auto at_point = std::chrono::system_clock::time_point(at);
    for (int i = 0; i < 1000; ++i) {
      copy_text_row(data, i, "name\t" + std::to_string(i) + "\\\n", i * 0.5, i % 2 == 0,
                    Bytes{std::byte{0}, std::byte{0xFF}}, at_point);
    }
    copy_text_row(data, 1000, std::optional<std::string>{}, std::optional<double>{},
                  std::optional<bool>{}, std::optional<Bytes>{},
                  std::optional<std::chrono::system_clock::time_point>{});
    EXPECT_EQ(co_await conn.copy_from("COPY copied FROM STDIN", data), 1001U);
    auto seventh = co_await conn.query("SELECT * FROM copied WHERE id = 7");
    const Row row = seventh[0];
    EXPECT_EQ(row.get<std::string>("name"), "name\t7\\\n");
    EXPECT_DOUBLE_EQ(row.get<double>("score"), 3.5);
    EXPECT_FALSE(row.get<bool>("ok"));
    EXPECT_EQ(row.get<Bytes>("data"), (Bytes{std::byte{0}, std::byte{0xFF}}));
    EXPECT_EQ(row.get<std::chrono::system_clock::time_point>("at"), at_point);
    auto last = co_await conn.query("SELECT * FROM copied WHERE id = 1000");
    const Row nulls = last[0];
    EXPECT_TRUE(nulls.is_null(1));
    EXPECT_TRUE(nulls.is_null(5));

    auto bad = co_await expect_error(conn.copy_from("COPY copied FROM STDIN", "not-a-number\n"));
    EXPECT_EQ(bad.sqlstate(), "22P02");
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM copied")).scalar<int>(), 1001);
  });
}

namespace {
// The descriptors of this process that are open on the same socket as `descriptor` (itself
// included), from /proc/self/fd.
int descriptors_on_the_socket_of(int descriptor) {
  char link[256];
  const std::string own = "/proc/self/fd/" + std::to_string(descriptor);
  const auto size = ::readlink(own.c_str(), link, sizeof link - 1);
  if (size <= 0) return 0;
  const std::string socket(link, static_cast<std::size_t>(size));
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code error;
    if (std::filesystem::read_symlink(entry.path(), error).string() == socket) ++count;
  }
  return count;
}
}  // namespace

// libpq closes its descriptor by itself when the server goes away, and the process may give the
// number to its next socket at once (another io thread's connect): pgrt watches the socket through
// a descriptor of its own, which only it closes, so that closing the connection can never take
// another socket out of the reactor.
TEST_F(ConnectionTest, TheSocketIsWatchedThroughADescriptorOfPgrtsOwn) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const int libpq_descriptor = PQsocket(conn.native_handle());
    EXPECT_EQ(descriptors_on_the_socket_of(libpq_descriptor), 2);
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
    conn.close();
    EXPECT_EQ(::fcntl(libpq_descriptor, F_GETFD), -1) << "a descriptor of the socket stayed open";
  });
}

// A backend that dies while its cancelled statement is drained (the cancel request held up: the
// postmaster, stopped here, has not taken it) ends the operation at once, said as a lost
// connection, not after cancel_timeout as a server that did not end the statement.
TEST_F(ConnectionTest, ABackendThatDiesWhileItsCancelledStatementIsDrainedEndsTheWaitAtOnce) {
  const pid_t postmaster = cluster().postmaster_pid();
  ASSERT_GT(postmaster, 0);
  struct Resume {
    pid_t pid;
    ~Resume() { ::kill(pid, SIGCONT); }
  } resume{postmaster};
  run_coroutine(
      [postmaster]() -> awaitable_void {
        const auto executor = co_await asio::this_coro::executor;
        ConnectOptions connect_options = options();
        connect_options.cancel_timeout = 20s;
        Connection connection = co_await Connection::connect(connect_options);
        const pid_t backend = PQbackendPID(connection.native_handle());
        std::optional<Error> cut;
        auto cut_at = std::chrono::steady_clock::time_point::max();
        asio::co_spawn(
            executor,
            [&]() -> awaitable_void {
              cut = co_await expect_error(
                  with_timeout(connection.execute("SELECT pg_sleep(30)"), 300ms));
              cut_at = std::chrono::steady_clock::now();
            },
            asio::detached);
        co_await testing::sleep_for(150ms);
        ::kill(postmaster, SIGSTOP);  // the cancel request sent at 300 ms is held
        co_await testing::sleep_for(300ms);
        const auto terminated = std::chrono::steady_clock::now();
        ::kill(backend, SIGTERM);
        for (int i = 0; i < 1000 && !cut; ++i) co_await testing::sleep_for(10ms);
        ::kill(postmaster, SIGCONT);
        EXPECT_TRUE(cut.has_value());
        if (!cut) co_return;
        EXPECT_LT(cut_at - terminated, 5s) << "the drain waited for the cancel request";
        EXPECT_EQ(cut->code(), client_errc::timeout) << cut->what();
        EXPECT_THAT(cut->what(), HasSubstr("the connection to the server was lost")) << cut->what();
        EXPECT_TRUE(connection.is_broken());
      },
      60s);
}

// --- misuse that must fail cleanly, and leave nothing done -------------------------------------

TEST_F(ConnectionTest, AsyncOperationsOnAnEmptyOrMovedFromConnectionCompleteWithNotConnected) {
  run_coroutine([]() -> awaitable_void {
    Connection empty;
    auto [error, result] =
        co_await empty.async_query("SELECT 1", ParamSink{}, asio::as_tuple(asio::use_awaitable));
    EXPECT_EQ(error, client_errc::not_connected) << error.message();
    auto conn = co_await open();
    Connection taken = std::move(conn);
    auto [moved_error, rows] =
        co_await conn.async_execute("SELECT 1", ParamSink{}, asio::as_tuple(asio::use_awaitable));
    EXPECT_EQ(moved_error, client_errc::not_connected) << moved_error.message();
    EXPECT_EQ(rows, 0U);
    EXPECT_EQ((co_await taken.query("SELECT 1")).scalar<int>(), 1);
  });
}

TEST_F(ConnectionTest, MoreParametersThanTheProtocolCarriesFailTheStatementNotTheConnection) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    ParamSink params;
    for (int i = 0; i < 65536; ++i) params.text("1");
    EXPECT_TRUE(params.failed());
    auto [error, result] = co_await conn.async_query("SELECT $1::int", std::move(params),
                                                     asio::as_tuple(asio::use_awaitable));
    EXPECT_EQ(error, client_errc::conversion) << error.message();
    EXPECT_THAT(conn.last_error().message, HasSubstr("at most 65535 parameters"));
    EXPECT_FALSE(conn.is_broken());
    EXPECT_EQ((co_await conn.query("SELECT 2")).scalar<int>(), 2);
    ParamSink most;
    for (int i = 0; i < 65535; ++i) most.text("1");
    EXPECT_FALSE(most.failed());
  });
}

TEST_F(ConnectionTest, SqlTextHoldingANulIsRefusedAndNothingOfItRuns) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE kept (x int)");
    co_await conn.execute("INSERT INTO kept SELECT generate_series(1, 3)");
    const std::string cut("DELETE FROM kept\0 WHERE x = 1", 29);
    const Error on_execute = co_await expect_error(conn.execute(cut));
    EXPECT_EQ(on_execute.code(), client_errc::conversion);
    EXPECT_THAT(on_execute.what(), HasSubstr("holds a NUL byte at offset 16"));
    const Error on_prepared = co_await expect_error(conn.query_prepared(cut));
    EXPECT_EQ(on_prepared.code(), client_errc::conversion);
    const Error on_copy = co_await expect_error(conn.copy_from(cut, ""));
    EXPECT_EQ(on_copy.code(), client_errc::conversion);
    Pipeline pipeline;
    EXPECT_THROW(pipeline.add(cut), Error);
    EXPECT_EQ(pipeline.size(), 0U);
    EXPECT_EQ((co_await conn.query("SELECT count(*)::int FROM kept")).scalar<int>(), 3);
  });
}

TEST_F(ConnectionTest, CopyFromRefusesAStatementThatIsNotACopyAndRunsOnlyOneStatement) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("CREATE TEMP TABLE kept (x int)");
    co_await conn.execute("INSERT INTO kept VALUES (1), (2)");
    const Error not_copy = co_await expect_error(conn.copy_from("DELETE FROM kept", "3\n"));
    EXPECT_EQ(not_copy.code(), client_errc::protocol_error);
    EXPECT_THAT(not_copy.what(), HasSubstr("nothing was sent"));
    const Error two =
        co_await expect_error(conn.copy_from("COPY kept FROM STDIN; DELETE FROM kept", "3\n"));
    EXPECT_EQ(two.diagnostics().sqlstate, "42601") << two.what();
    EXPECT_FALSE(conn.is_broken());
    EXPECT_EQ((co_await conn.query("SELECT count(*)::int FROM kept")).scalar<int>(), 2);
    // A COPY of another direction is refused once the server has started it.
    const Error other = co_await expect_error(conn.copy_from("COPY kept TO STDOUT", "3\n"));
    EXPECT_EQ(other.code(), client_errc::protocol_error) << other.what();
    EXPECT_FALSE(conn.is_broken());
    EXPECT_EQ(co_await conn.copy_from("/* rows */ COPY kept FROM STDIN", "3\n"), 1U);
    EXPECT_EQ((co_await conn.query("SELECT count(*)::int FROM kept")).scalar<int>(), 3);
  });
}

// A statement given fewer parameters than it uses (a common slip) is refused by the server's
// Bind with SQLSTATE 08P01 (protocol_violation): an ERROR, after which the connection works on.
// It is a mistake to fix, like the start-up setting below, not condition::connection_error
// ("the connection is unusable"), which callers take for a lost connection and retry.
TEST_F(ConnectionTest, AStatementGivenTooFewParametersIsNotAConnectionError) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    const Error missing = co_await expect_error(conn.query("SELECT $1::int + $2::int", 1));
    EXPECT_FALSE(conn.is_broken());
    EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
    EXPECT_FALSE(missing.code() == condition::connection_error) << missing.what();
  });
}

// A setting the server refuses at start-up is a mistake to fix: its SQLSTATE, and no
// condition::connection_error (which callers retry).
TEST_F(ConnectionTest, AStartupSettingTheServerRefusesIsNotAConnectionError) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions bad_value = options();
    bad_value.session_settings = {{"statement_timeout", "soon"}};
    const Error on_value = co_await expect_error(Connection::connect(bad_value));
    EXPECT_EQ(on_value.diagnostics().sqlstate, "22023") << on_value.what();
    EXPECT_NE(on_value.code(), condition::connection_error);
    EXPECT_THAT(on_value.diagnostics().hint, HasSubstr("session_settings"));
    ConnectOptions unknown = options();
    unknown.session_settings = {{"no_such_setting", "1"}};
    const Error on_name = co_await expect_error(Connection::connect(unknown));
    EXPECT_EQ(on_name.diagnostics().sqlstate, "42704") << on_name.what();
    EXPECT_NE(on_name.code(), condition::connection_error);
  });
}

// Notices and warnings go to spdlog's default logger, not to the process's stderr.
TEST_F(ConnectionTest, ServerNoticesGoToTheLogger) {
  std::ostringstream log;
  const auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await open();
    co_await conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$");
    co_await conn.execute("DO $$ BEGIN RAISE WARNING 'careful now'; END $$");
  });
  spdlog::set_default_logger(previous);
  EXPECT_THAT(log.str(), HasSubstr("[info] pgrt: server notice: hello from plpgsql"));
  EXPECT_THAT(log.str(), HasSubstr("[warning] pgrt: the server warns: careful now"));
}

// A deadline that passes while query_prepared() is preparing (the Prepare waits for a lock on the
// table another session holds): the Prepare is cancelled and drained, nothing is cached for it,
// and the same statement prepares and runs afterwards, answering for itself.
TEST_F(ConnectionTest, ACancelThatLandsOnThePrepareLeavesTheStatementCacheSound) {
  BlockingConnection admin(cluster().dsn());
  admin.query("CREATE TABLE IF NOT EXISTS prepare_locked (x int)");
  admin.query("TRUNCATE prepare_locked");
  admin.query("INSERT INTO prepare_locked VALUES (41)");
  run_coroutine([&]() -> awaitable_void {
    auto conn = co_await open();
    admin.query("BEGIN");
    admin.query("LOCK TABLE prepare_locked IN ACCESS EXCLUSIVE MODE");
    const Error cut = co_await expect_error(
        with_timeout(conn.query_prepared("SELECT x + 1 FROM prepare_locked"), 200ms));
    EXPECT_EQ(cut.code(), client_errc::timeout) << cut.what();
    EXPECT_THAT(cut.what(), HasSubstr("cancelled on the server")) << cut.what();
    admin.query("ROLLBACK");
    EXPECT_FALSE(conn.is_broken());
    EXPECT_EQ((co_await conn.query_prepared("SELECT x + 1 FROM prepare_locked")).scalar<int>(), 42);
    EXPECT_EQ((co_await conn.query_prepared("SELECT $1::int * 2", 21)).scalar<int>(), 42);
    EXPECT_EQ((co_await conn.query_prepared("SELECT x + 1 FROM prepare_locked")).scalar<int>(), 42);
  });
  admin.query("DROP TABLE prepare_locked");
}

}  // namespace
}  // namespace pgrt
