// The connection layer at its edges: failover past a host that answers only the start-up, how
// each refusal at connect is classified, session settings that hold white space, the bound of a
// closed connection's backend, transactions that would nest, and credentials where a host belongs.
#include <arpa/inet.h>
#include <atomic>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <optional>
#include <poll.h>
#include <stdexcept>
#include <string>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <pgrt/db.hpp>
#include <pgrt/db/session_guards.hpp>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/expect_error.hpp"
#include "pgrt/testing/fault_proxy.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::expect_error;
using testing::run_coroutine;
using awaitable_void = asio::awaitable<void>;

// A server that completes the start-up of every connection (AuthenticationOk, the parameters,
// BackendKeyData, ReadyForQuery) and then never answers a statement: a pooler such as PgBouncer
// in front of a server that is down or hung (it answers the start-up itself, and queues the
// client's statements until a server connection comes, which it never does).
class AnswersOnlyTheStartup {
 public:
  enum class OnStatement {
    silent,  // never answers
    // gives up on the first statement and closes the connection (PgBouncer's "no more connections
    // allowed" or "server login failed" when its server is down)
    close,
    // answers the first statement (up to its Sync) with an ERROR and stays open (pgcat's and
    // Supavisor's "could not get connection from the pool")
    refuse,
  };
  explicit AnswersOnlyTheStartup(OnStatement on_statement = OnStatement::silent)
      : on_statement_(on_statement) {
    listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listener_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
        ::listen(listener_, 16) != 0) {
      throw std::runtime_error("cannot listen");
    }
    socklen_t length = sizeof address;
    ::getsockname(listener_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~AnswersOnlyTheStartup() {
    stop_ = true;
    thread_.join();
    for (const int fd : clients_) ::close(fd);
    ::close(listener_);
  }
  AnswersOnlyTheStartup(const AnswersOnlyTheStartup&) = delete;
  AnswersOnlyTheStartup& operator=(const AnswersOnlyTheStartup&) = delete;
  [[nodiscard]] int port() const { return port_; }
  [[nodiscard]] int started_up() const { return started_up_.load(); }

 private:
  static bool read_exactly(int fd, char* out, std::size_t size) {
    while (size > 0) {
      const ssize_t got = ::recv(fd, out, size, 0);
      if (got <= 0) return false;
      out += got;
      size -= static_cast<std::size_t>(got);
    }
    return true;
  }
  static void put_int32(std::string& out, std::uint32_t value) {
    const std::uint32_t net = htonl(value);
    out.append(reinterpret_cast<const char*>(&net), 4);
  }
  static void message(std::string& out, char type, const std::string& body) {
    out += type;
    put_int32(out, static_cast<std::uint32_t>(body.size() + 4));
    out += body;
  }
  void start_up(int fd) {
    for (;;) {
      char header[4];
      if (!read_exactly(fd, header, 4)) return;
      std::uint32_t length = 0;
      std::memcpy(&length, header, 4);
      length = ntohl(length);
      if (length < 8 || length > 10000) return;
      std::string body(length - 4, '\0');
      if (!read_exactly(fd, body.data(), body.size())) return;
      std::uint32_t code = 0;
      std::memcpy(&code, body.data(), 4);
      code = ntohl(code);
      if (code == 80877103 || code == 80877104) {  // SSLRequest, GSSENCRequest: no
        (void)::send(fd, "N", 1, MSG_NOSIGNAL);
        continue;
      }
      break;
    }
    std::string reply;
    std::string ok;
    put_int32(ok, 0);
    message(reply, 'R', ok);
    for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
             {"server_version", "15.0"},
             {"server_encoding", "UTF8"},
             {"client_encoding", "UTF8"},
             {"DateStyle", "ISO, MDY"},
             {"integer_datetimes", "on"},
             {"standard_conforming_strings", "on"},
             {"TimeZone", "UTC"},
             {"in_hot_standby", "off"},
             {"default_transaction_read_only", "off"}}) {
      message(reply, 'S', name + '\0' + value + '\0');
    }
    std::string key;
    put_int32(key, 4242);
    put_int32(key, 1234);
    message(reply, 'K', key);
    message(reply, 'Z', "I");
    (void)::send(fd, reply.data(), reply.size(), MSG_NOSIGNAL);
    ++started_up_;
  }
  void serve() {
    while (!stop_) {
      pollfd waiting{.fd = listener_, .events = POLLIN, .revents = 0};
      if (::poll(&waiting, 1, 50) <= 0) continue;
      const int fd = ::accept(listener_, nullptr, nullptr);
      if (fd < 0) continue;
      clients_.push_back(fd);  // kept open, never answered after the start-up
      start_up(fd);
      if (on_statement_ == OnStatement::refuse) refuse_first_statement(fd);
      if (on_statement_ == OnStatement::close) {
        char first[5];
        (void)read_exactly(fd, first, 5);  // the first statement's message comes: give up
        std::string error;
        for (const char* field : {"SFATAL", "VFATAL", "C08P01", "Mno more connections allowed"}) {
          error += field;
          error += '\0';
        }
        error += '\0';
        std::string reply;
        message(reply, 'E', error);
        (void)::send(fd, reply.data(), reply.size(), MSG_NOSIGNAL);
        ::shutdown(fd, SHUT_RDWR);
      }
    }
  }
  void refuse_first_statement(int fd) {
    for (;;) {
      char header[5];
      if (!read_exactly(fd, header, 5)) return;
      std::uint32_t size = 0;
      std::memcpy(&size, header + 1, 4);
      size = ntohl(size);
      if (size < 4 || size > 100000) return;
      std::string body(size - 4, '\0');
      if (!read_exactly(fd, body.data(), body.size())) return;
      if (header[0] != 'S' && header[0] != 'Q') continue;  // up to the Sync (or a simple query)
      std::string error;
      for (const char* field :
           {"SERROR", "VERROR", "C08006", "Mcould not get connection from the pool"}) {
        error += field;
        error += '\0';
      }
      error += '\0';
      std::string answer;
      message(answer, 'E', error);
      message(answer, 'Z', "I");
      (void)::send(fd, answer.data(), answer.size(), MSG_NOSIGNAL);
      return;  // then nothing more: the connection stays open
    }
  }
  OnStatement on_statement_ = OnStatement::silent;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> started_up_{0};
  std::vector<int> clients_;
  std::thread thread_;
};

class ConnectionEdgesTest : public testing::DbTest {
 protected:
  // Two hosts: a fake server on 127.0.0.1:`first_port`, then the cluster.
  static std::string two_hosts_conninfo(int first_port) {
    return "host=127.0.0.1,127.0.0.1 port=" + std::to_string(first_port) + "," +
           std::to_string(cluster().port()) +
           " user=postgres dbname=postgres sslmode=disable gssencmode=disable";
  }

  // Connects past a fake first host that treats the first statement `on_statement`'s way: the
  // connection reaches the cluster, and nothing of the host passed over stays on it.
  static void expect_a_healthy_connection_past(AnswersOnlyTheStartup::OnStatement on_statement) {
    AnswersOnlyTheStartup pooler_of_a_dead_server(on_statement);
    const std::string conninfo = two_hosts_conninfo(pooler_of_a_dead_server.port());
    run_coroutine([&]() -> awaitable_void {
      ConnectOptions two_hosts{.conninfo = conninfo, .connect_timeout = 4s};
      try {
        auto conn = co_await Connection::connect(two_hosts);
        EXPECT_EQ((co_await conn.query("SELECT inet_server_port()")).scalar<int>(),
                  cluster().port());
        EXPECT_FALSE(conn.is_broken()) << "a fresh, healthy connection reports itself broken";
      } catch (const Error& error) {
        ADD_FAILURE() << "the second host was not reached: " << error.what();
      }
    });
  }
  static ConnectOptions options() { return ConnectOptions{.conninfo = cluster().dsn()}; }

  // A pool of one connection, whose cuts come at connect_timeout (1 s), the hard step of a cut
  // cancel_timeout (5 s) later.
  static PoolConfig one_connection_cut_at_a_second(std::string instance) {
    PoolConfig pool_config;
    pool_config.conninfo = cluster().dsn();
    pool_config.max_size = 1;
    pool_config.application = "pgrt-edges";
    pool_config.instance = std::move(instance);
    pool_config.connect.connect_timeout = 1s;
    pool_config.connect.cancel_timeout = 5s;
    pool_config.acquire_timeout = 10s;
    return pool_config;
  }

  // The next lease works: it is never a connection the pool cut.
  static awaitable_void expect_a_working_lease(Pool& pool) {
    try {
      auto lease = co_await pool.acquire();
      EXPECT_FALSE(lease->is_broken()) << "the pool handed out a connection it had cut";
      try {
        EXPECT_EQ((co_await lease->query("SELECT 1")).scalar<int>(), 1);
      } catch (const Error& error) {
        ADD_FAILURE() << "the handed-out connection's first statement failed: " << error.what();
      }
    } catch (const Error& error) {
      ADD_FAILURE() << "acquire failed: " << error.what();
    }
  }
};

// A backend stopped (SIGSTOP) now, and resumed `after` from now on a thread of its own (and at
// the latest when this goes): a server that answers late.
class StoppedBackend {
 public:
  StoppedBackend(int pid, std::chrono::milliseconds after) : pid_(pid) {
    ::kill(pid_, SIGSTOP);
    resumer_ = std::thread([pid, after] {
      std::this_thread::sleep_for(after);
      ::kill(pid, SIGCONT);
    });
  }
  StoppedBackend(const StoppedBackend&) = delete;
  StoppedBackend& operator=(const StoppedBackend&) = delete;
  StoppedBackend(StoppedBackend&&) = delete;
  StoppedBackend& operator=(StoppedBackend&&) = delete;
  ~StoppedBackend() {
    resumer_.join();
    ::kill(pid_, SIGCONT);
  }

 private:
  int pid_;
  std::thread resumer_;
};

// A session setting whose value holds a tab or a line break: PostgreSQL splits the `options`
// startup parameter at any white space (pg_split_opts() uses isspace()), so escape_option_value()
// escapes every white space byte. Unescaped, the value would be cut in two and its rest read as
// further command-line arguments: a FATAL the user cannot explain, or another setting slipped in.
TEST_F(ConnectionEdgesTest, ASessionSettingValueWithATabReachesTheServerWhole) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions with_tab = options();
    with_tab.session_settings = {{"pgrt_test.note", "first\tsecond"}};
    try {
      auto conn = co_await Connection::connect(with_tab);
      auto shown = co_await conn.query("SELECT current_setting('pgrt_test.note')");
      EXPECT_EQ(shown.scalar<std::string>(), "first\tsecond");
    } catch (const Error& error) {
      ADD_FAILURE() << "connect failed: " << error.what();
    }
  });
}

TEST_F(ConnectionEdgesTest, ASessionSettingValueCannotSlipInAnotherSetting) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions sneaky = options();
    // One setting, whose value happens to hold line breaks (as text from a config file may).
    sneaky.session_settings = {{"pgrt_test.note", "x\n-c\ndefault_transaction_read_only=on"}};
    try {
      auto conn = co_await Connection::connect(sneaky);
      auto read_only = co_await conn.query("SHOW default_transaction_read_only");
      EXPECT_EQ(read_only.scalar<std::string>(), "off")
          << "a value's line breaks let it set another server setting";
      auto note = co_await conn.query("SELECT current_setting('pgrt_test.note')");
      EXPECT_EQ(note.scalar<std::string>(), "x\n-c\ndefault_transaction_read_only=on");
    } catch (const Error& error) {
      ADD_FAILURE() << "connect failed: " << error.what();
    }
  });
}

// backend_end_bound() reads the caller's own client_connection_check_interval as the server
// does, units included ("1min", "10s"): with_session_guards() keeps the caller's value (it wins),
// and a bound that counted 1 ms for a minute would give a closed connection's capacity back
// before its backend can be gone.
TEST(BackendEndBound, TheBoundReadsACheckIntervalGivenWithUnits) {
  ConnectOptions own;
  own.session_settings = {{"client_connection_check_interval", "1min"}};
  const ConnectOptions guarded = with_session_guards(own, SessionGuards{});
  // keepalives 30 s + 3 x 10 s, then one check interval (a minute) more.
  EXPECT_EQ(backend_end_bound(guarded), 120s);
}

// ... and a value that is not a number at all (PostgreSQL's "default" resets a setting) does not
// throw (it would throw out of the pool's construction).
TEST(BackendEndBound, TheBoundDoesNotThrowOnAValueThatIsNotANumber) {
  ConnectOptions own;
  own.session_settings = {{"client_connection_check_interval", "default"}};
  const ConnectOptions guarded = with_session_guards(own, SessionGuards{});
  EXPECT_NO_THROW((void)backend_end_bound(guarded));
}

// The server-side keepalives the caller set (they win over the guards' in session_settings) are
// what the bound counts: a backend whose client is unreachable lives 600 s + 3 x 10 s, not the
// guards' 70 s.
TEST(BackendEndBound, TheBoundCountsTheServerKeepalivesTheCallerSet) {
  ConnectOptions own;
  own.session_settings = {{"tcp_keepalives_idle", "600"}};
  const ConnectOptions guarded = with_session_guards(own, SessionGuards{});
  EXPECT_GE(backend_end_bound(guarded), 630s);
}

// A role's or a database's connection limit (ALTER ROLE ... CONNECTION LIMIT n) refuses a connect
// with SQLSTATE 53300, "too many connections for role ...": condition::too_many_connections, the
// pool's backpressure, as for max_connections ("too many clients"), not connect_failed (an
// outage: "check that the server is running").
TEST_F(ConnectionEdgesTest, ARolesConnectionLimitIsTooManyConnections) {
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("DROP ROLE IF EXISTS edge_capped");
  admin.query("CREATE ROLE edge_capped LOGIN CONNECTION LIMIT 0");
  run_coroutine([]() -> awaitable_void {
    ConnectOptions capped{.conninfo = cluster().dsn() + " user=edge_capped"};
    const Error error = co_await testing::expect_error(Connection::connect(capped));
    EXPECT_EQ(error.code(), condition::too_many_connections) << error.what();
    EXPECT_EQ(error.sqlstate(), "53300") << error.what();
  });
  admin.query("DROP ROLE edge_capped");
}

TEST_F(ConnectionEdgesTest, ADatabasesConnectionLimitIsTooManyConnections) {
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("DROP DATABASE IF EXISTS edge_capped_db");
  admin.query("CREATE DATABASE edge_capped_db CONNECTION LIMIT 0");
  admin.query("DROP ROLE IF EXISTS edge_plain");
  admin.query("CREATE ROLE edge_plain LOGIN");  // (a superuser is not held to the limit)
  run_coroutine([]() -> awaitable_void {
    ConnectOptions capped{.conninfo = cluster().dsn() + " user=edge_plain dbname=edge_capped_db"};
    const Error error = co_await testing::expect_error(Connection::connect(capped));
    EXPECT_EQ(error.code(), condition::too_many_connections) << error.what();
    EXPECT_EQ(error.sqlstate(), "53300") << error.what();
  });
  admin.query("DROP DATABASE edge_capped_db");
  admin.query("DROP ROLE edge_plain");
}

// A role that may not log in (NOLOGIN, SQLSTATE 28000) and a database the user may not connect
// to (42501): mistakes every host answers alike, which end a multi-host connect as an unknown
// role does, not outages (condition::connection_error, retried, each host tried in turn).
TEST_F(ConnectionEdgesTest, ARoleThatMayNotLogInIsAnAuthorizationErrorNotAnOutage) {
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("DROP ROLE IF EXISTS edge_nologin");
  admin.query("CREATE ROLE edge_nologin NOLOGIN");
  run_coroutine([]() -> awaitable_void {
    ConnectOptions nologin{.conninfo = cluster().dsn() + " user=edge_nologin"};
    const Error error = co_await testing::expect_error(Connection::connect(nologin));
    EXPECT_EQ(error.sqlstate(), "28000") << error.what();
    EXPECT_NE(error.code(), condition::connection_error) << error.what();
  });
  admin.query("DROP ROLE edge_nologin");
}

TEST_F(ConnectionEdgesTest, AConnectionRefusedItsDatabaseIsAnAuthorizationErrorNotAnOutage) {
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("DROP DATABASE IF EXISTS edge_closed_db");
  admin.query("CREATE DATABASE edge_closed_db");
  admin.query("REVOKE CONNECT ON DATABASE edge_closed_db FROM PUBLIC");
  admin.query("DROP ROLE IF EXISTS edge_outsider");
  admin.query("CREATE ROLE edge_outsider LOGIN");
  run_coroutine([]() -> awaitable_void {
    ConnectOptions refused{.conninfo =
                               cluster().dsn() + " user=edge_outsider dbname=edge_closed_db"};
    const Error error = co_await testing::expect_error(Connection::connect(refused));
    EXPECT_EQ(error.sqlstate(), "42501") << error.what();
    EXPECT_NE(error.code(), condition::connection_error) << error.what();
  });
  admin.query("DROP DATABASE edge_closed_db");
  admin.query("DROP ROLE edge_outsider");
}

// pgrt::transaction() inside a transaction block that is open already (a helper that uses
// transaction() called from another transaction()): the server would only warn about its BEGIN,
// and its ROLLBACK would roll back the *outer* transaction's work, whose later statements would
// then autocommit and whose COMMIT would "succeed". It is refused (25001) before anything is
// sent, and the outer transaction goes on whole.
TEST_F(ConnectionEdgesTest, ANestedTransactionThatFailsDoesNotSilentlyUndoTheOuterOne) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await Connection::connect(options());
    co_await conn.execute("DROP TABLE IF EXISTS edge_nested");
    co_await conn.execute("CREATE TABLE edge_nested (step text)");
    auto inner = [](Connection& tx) -> awaitable_void {
      co_await tx.execute("INSERT INTO edge_nested VALUES ('inner')");
      throw std::runtime_error("the inner step fails");
    };
    auto outer = [&inner](Connection& tx) -> awaitable_void {
      co_await tx.execute("INSERT INTO edge_nested VALUES ('outer-first')");
      try {
        co_await transaction(tx, inner);
      } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): the outer goes on
      }
      co_await tx.execute("INSERT INTO edge_nested VALUES ('outer-last')");
    };
    bool outer_committed = false;
    try {
      co_await transaction(conn, outer);
      outer_committed = true;
    } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): a refusal is fine
    }
    auto rows = co_await conn.query("SELECT string_agg(step, ',' ORDER BY step) FROM edge_nested");
    const auto stored = rows.scalar<std::optional<std::string>>().value_or("");
    if (outer_committed) {
      // The outer transaction said it committed: its own work must be there, whole.
      EXPECT_EQ(stored, "outer-first,outer-last");
    } else {
      // Refused or failed: none of it may be there.
      EXPECT_EQ(stored, "");
    }
  });
}

// A body that ends the transaction block itself (ROLLBACK, COMMIT or END): what it runs after
// that runs outside the transaction, each statement committed on its own. transaction() used to
// send its COMMIT anyway (the server only warns that no transaction is in progress) and return as
// if the whole body had been one transaction; it throws 25P01 now, and sends no COMMIT.
TEST_F(ConnectionEdgesTest, ABodyThatEndsItsTransactionItselfMakesTransactionThrow) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await Connection::connect(options());
    co_await conn.execute("DROP TABLE IF EXISTS edge_body_ends");
    co_await conn.execute("CREATE TABLE edge_body_ends (step text)");
    for (const char* ending : {"ROLLBACK", "COMMIT", "END"}) {
      auto body = [ending](Connection& tx) -> asio::awaitable<int> {
        co_await tx.execute("INSERT INTO edge_body_ends VALUES ('before')");
        co_await tx.execute(ending);
        co_await tx.execute("INSERT INTO edge_body_ends VALUES ('after')");
        co_return 1;
      };
      auto error = co_await expect_error(transaction(conn, body));
      EXPECT_EQ(error.code(), make_sqlstate_error("25P01")) << ending;
      EXPECT_NE(error.diagnostics().message.find("ended the transaction block itself"),
                std::string::npos)
          << ending << ": " << error.diagnostics().message;
      EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle) << ending;
    }
    // A body that leaves its block open commits as before.
    co_await transaction(conn, [](Connection& tx) -> awaitable_void {
      co_await tx.execute("INSERT INTO edge_body_ends VALUES ('whole')");
    });
    auto rows = co_await conn.query(
        "SELECT step, count(*)::int FROM edge_body_ends GROUP BY step ORDER BY step");
    std::vector<std::pair<std::string, int>> counts;
    for (const Row row : rows) counts.emplace_back(row.get<std::string>(0), row.get<int>(1));
    // ROLLBACK undid its 'before'; COMMIT and END committed theirs; every 'after' ran on its own.
    const std::vector<std::pair<std::string, int>> expected{
        {"after", 3}, {"before", 2}, {"whole", 1}};
    EXPECT_EQ(counts, expected);
  });
}

// Failover past a host that completes the start-up and then answers nothing (a pooler in front of
// a dead server): docs/operations.md, "Failover": such a host "is passed over once its time is
// up", each host but the last getting an equal share of connect_timeout. pgrt's own check for a
// pooler (notice_pooler(): SELECT pg_backend_pid(), with Pooler::none, the default) runs within
// the host's share, so the second host, which is up, is reached in time.
TEST_F(ConnectionEdgesTest, AHostThatAnswersTheStartupAndThenNothingIsPassedOverInItsShare) {
  AnswersOnlyTheStartup pooler_of_a_dead_server;
  const std::string conninfo = two_hosts_conninfo(pooler_of_a_dead_server.port());
  const auto started = std::chrono::steady_clock::now();
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions two_hosts{.conninfo = conninfo, .connect_timeout = 4s};
    try {
      auto conn = co_await Connection::connect(two_hosts);
      EXPECT_EQ((co_await conn.query("SELECT inet_server_port()")).scalar<int>(), cluster().port());
    } catch (const Error& error) {
      ADD_FAILURE() << "the second host was not reached: " << error.what();
    }
  });
  EXPECT_EQ(pooler_of_a_dead_server.started_up(), 1);
  // The first host's share is half of the 4 s.
  EXPECT_LT(std::chrono::steady_clock::now() - started, 3500ms);
}

// The same pooler in front of a dead server, giving up on the first statement with an error and
// closing the connection: the host is passed over, and the second host, which is up, is tried.
TEST_F(ConnectionEdgesTest, AHostThatClosesOnTheFirstStatementIsPassedOver) {
  AnswersOnlyTheStartup pooler_of_a_dead_server(AnswersOnlyTheStartup::OnStatement::close);
  const std::string conninfo = two_hosts_conninfo(pooler_of_a_dead_server.port());
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions two_hosts{.conninfo = conninfo, .connect_timeout = 4s};
    try {
      auto conn = co_await Connection::connect(two_hosts);
      EXPECT_EQ((co_await conn.query("SELECT inet_server_port()")).scalar<int>(), cluster().port());
    } catch (const Error& error) {
      ADD_FAILURE() << "the second host was not reached: " << error.what();
    }
  });
  EXPECT_EQ(pooler_of_a_dead_server.started_up(), 1);
}

// An Error whose code is a SQLSTATE but whose Diagnostics do not repeat it (the pool's
// fail-fast error for a full server builds one so): sqlstate() and what() still say the SQLSTATE
// (error.hpp: sqlstate() is "the SQLSTATE, e.g. "23505"; empty for client-side errors").
TEST(ErrorText, AnErrorWithASqlstateCodeSaysItsSqlstate) {
  const Error full(make_sqlstate_error("53300"),
                   Diagnostics{.message = "the server refuses new connections (it is full)"});
  EXPECT_EQ(full.sqlstate(), "53300");
  EXPECT_THAT(full.what(), ::testing::Not(::testing::HasSubstr("[]"))) << full.what();
  EXPECT_THAT(full.what(), ::testing::HasSubstr("53300")) << full.what();
}

// A connection URL given where a host name belongs (host=..., or PGHOST set to the DATABASE_URL:
// a common slip) is refused without being looked up or quoted, and mask_password() masks it
// (usage.md: "The error messages of connect() never contain the password").
TEST_F(ConnectionEdgesTest, AUrlGivenAsTheHostDoesNotPutItsPasswordInTheError) {
  run_coroutine([]() -> awaitable_void {
    const std::string conninfo =
        "host=postgresql://app:S3cretPw@db.invalid/app user=postgres dbname=postgres";
    ConnectOptions slipped{.conninfo = conninfo, .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(slipped));
    EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
    EXPECT_THAT(mask_password(conninfo), ::testing::Not(::testing::HasSubstr("S3cretPw")))
        << mask_password(conninfo);
  });
}

// AUrlGivenAsTheDatabaseNameDoesNotPutItsPasswordInTheError's checks for one URL.
void expect_a_url_as_a_name_refused(const std::string& without_dbname, const std::string& url) {
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions slipped{.conninfo = without_dbname + " dbname=" + url, .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(slipped));
    EXPECT_EQ(error.code(), client_errc::invalid_config) << error.what();
    EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
    EXPECT_THAT(mask_password(slipped.conninfo), ::testing::Not(::testing::HasSubstr("S3cretPw")))
        << mask_password(slipped.conninfo);
    ConnectOptions as_user{.conninfo = without_dbname + " dbname=postgres user=" + url,
                           .connect_timeout = 5s};
    const Error user_error = co_await testing::expect_error(Connection::connect(as_user));
    EXPECT_THAT(user_error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw")))
        << user_error.what();
    EXPECT_THAT(mask_password(as_user.conninfo), ::testing::Not(::testing::HasSubstr("S3cretPw")))
        << mask_password(as_user.conninfo);
  });
  ::setenv("PGDATABASE", url.c_str(), 1);
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions from_env{.conninfo = without_dbname, .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(from_env));
    EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
  });
  ::unsetenv("PGDATABASE");
}

// The same slip as a URL given as the host, with the database name: the DATABASE_URL given as
// dbname= (a template's "host=... dbname=$DATABASE_URL"), or PGDATABASE set to it. libpq expands
// only the conninfo itself, so the URL is sent to the server as the database's name, and the
// server's "database ... does not exist" and pgrt's own "(database ..., user ...)" quote it, with
// its password (usage.md: "The error messages of connect() never contain the password"). The user
// name the same. Both are refused (invalid_config) before anything is sent, and mask_password()
// masks them. The same for a URL of another scheme or case (a JDBC URL, POSTGRESQL://).
TEST_F(ConnectionEdgesTest, AUrlGivenAsTheDatabaseNameDoesNotPutItsPasswordInTheError) {
  const std::string without_dbname =
      "host=" + cluster().dsn().substr(5, cluster().dsn().find(' ') - 5) +
      " port=" + std::to_string(cluster().port()) + " user=postgres";
  for (const std::string url :
       {"postgresql://app:S3cretPw@db.invalid/app", "POSTGRESQL://app:S3cretPw@db.invalid/app",
        "jdbc:postgresql://db.invalid/app?user=app&password=S3cretPw"}) {
    SCOPED_TRACE(url);
    expect_a_url_as_a_name_refused(without_dbname, url);
  }
  // The same slip into the host address or the service name (libpq's own errors quote them), and
  // credentials without a scheme given as the user name.
  run_coroutine([&]() -> awaitable_void {
    for (const std::string slip :
         {" dbname=postgres hostaddr=postgresql://app:S3cretPw@db.invalid",
          " dbname=postgres service=postgresql://app:S3cretPw@db.invalid/x",
          " dbname=postgres user=app:S3cretPw@db.invalid"}) {
      ConnectOptions slipped{.conninfo = without_dbname + slip, .connect_timeout = 5s};
      const Error error = co_await testing::expect_error(Connection::connect(slipped));
      EXPECT_EQ(error.code(), client_errc::invalid_config) << error.what();
      EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
    }
  });
  ::setenv("PGSERVICE", "postgresql://app:S3cretPw@db.invalid/x", 1);
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions from_env{.conninfo = without_dbname + " dbname=postgres", .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(from_env));
    EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
  });
  ::unsetenv("PGSERVICE");
}

// The same slip with libpq's other conninfo form: a key=value string given as the database name
// ("dbname='host=db password=...'", or PGDATABASE set to one, as `psql -d` and `pg_dump -d` take
// it). libpq expands neither here (only the conninfo itself), so it reaches the server as the
// database's name, and the server's "database ... does not exist" and pgrt's own "(database ...)"
// quote it, password included (usage.md: "The error messages of connect() never contain the
// password"). connect() refuses it and mask_password() masks it, as a URL there.
TEST_F(ConnectionEdgesTest, AKeyValueConninfoAsTheDatabaseNameKeepsItsPasswordOutOfTheError) {
  const std::string pasted = "host=db.invalid user=app password=S3cretPw dbname=app";
  const std::string dsn = cluster().dsn();
  const std::string without_dbname = dsn.substr(0, dsn.find(" dbname="));
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions slipped{.conninfo = without_dbname + " dbname='" + pasted + "'",
                           .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(slipped));
    EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
    EXPECT_THAT(mask_password(slipped.conninfo), ::testing::Not(::testing::HasSubstr("S3cretPw")))
        << mask_password(slipped.conninfo);
  });
  ::setenv("PGDATABASE", pasted.c_str(), 1);
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions from_env{.conninfo = without_dbname, .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(from_env));
    EXPECT_THAT(error.what(), ::testing::Not(::testing::HasSubstr("S3cretPw"))) << error.what();
  });
  ::unsetenv("PGDATABASE");
}

// A database or role name may hold "://": any text is a valid quoted identifier, and some
// deployments name tenants or services so ("tenant://eu-1"). libpq connects to them given as
// dbname= and user=: it expands only the conninfo itself, and only a value that starts with
// "postgresql://" or "postgres://" (or holds '=') would be read as a conninfo, so such a name
// reaches the server as the name it is. connect() connects as libpq does: only a name that starts
// with a URL's scheme, or parses as a key=value conninfo, is refused as a slip.
TEST_F(ConnectionEdgesTest, ADatabaseAndARoleWhoseNamesHoldASchemeSeparatorCanBeConnectedTo) {
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("DROP DATABASE IF EXISTS \"tenant://eu-1\" WITH (FORCE)");
  admin.query("CREATE DATABASE \"tenant://eu-1\"");
  admin.query("DROP ROLE IF EXISTS \"svc://billing\"");
  admin.query("CREATE ROLE \"svc://billing\" LOGIN");
  const std::string conninfo = cluster().dsn() + " dbname='tenant://eu-1' user='svc://billing'";
  {
    // libpq itself connects to them.
    PGconn* plain = PQconnectdb(conninfo.c_str());
    EXPECT_EQ(PQstatus(plain), CONNECTION_OK) << PQerrorMessage(plain);
    PQfinish(plain);
  }
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions named{.conninfo = conninfo, .connect_timeout = 5s};
    std::string failure;
    std::string where;
    try {
      auto conn = co_await Connection::connect(named);
      where = (co_await conn.query("SELECT current_database() || ' as ' || current_user"))
                  .scalar<std::string>();
    } catch (const Error& error) {
      failure = error.what();
    }
    EXPECT_EQ(failure, "") << "pgrt refused a database and role libpq connects to";
    EXPECT_EQ(where, "tenant://eu-1 as svc://billing");
  });
  admin.query("DROP DATABASE IF EXISTS \"tenant://eu-1\" WITH (FORCE)");
  admin.query("DROP ROLE IF EXISTS \"svc://billing\"");
}

// The conninfo's connect_timeout with no host at all (libpq's default socket directory) bounds
// that one host as it bounds a host given (operations.md, "Failover"): a server on the default
// socket that takes the connection and never answers holds the connect for the conninfo's 2 s,
// not the whole ConnectOptions::connect_timeout.
TEST_F(ConnectionEdgesTest, TheConninfosConnectTimeoutBoundsTheDefaultSocketToo) {
  const int port = 61000 + static_cast<int>(::getpid() % 3000);
  // (libpq's default socket directory on Debian; the postgresql-common package makes it.)
  std::error_code ignored;
  std::filesystem::create_directories("/var/run/postgresql", ignored);
  const std::string path = "/var/run/postgresql/.s.PGSQL." + std::to_string(port);
  ::unlink(path.c_str());
  const int listener = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof address.sun_path - 1);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address), 0)
      << std::strerror(errno);
  ASSERT_EQ(::listen(listener, 16), 0);  // never accepted, never answered
  ::unsetenv("PGHOST");
  ::unsetenv("PGHOSTADDR");
  const auto started = std::chrono::steady_clock::now();
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions hung{.conninfo = "port=" + std::to_string(port) +
                                    " user=postgres dbname=postgres connect_timeout=2",
                        .connect_timeout = 8s};
    const Error error = co_await testing::expect_error(Connection::connect(hung));
    EXPECT_EQ(error.code(), client_errc::timeout) << error.what();
  });
  EXPECT_LT(std::chrono::steady_clock::now() - started, 5s) << "the conninfo's 2 s were not kept";
  ::close(listener);
  ::unlink(path.c_str());
}

// --- cut connections, passed-over hosts and the bound, at their edges ---

// (Control: passing over a host that answers the start-up and then nothing leaves a healthy
// connection; this one passes.)
TEST_F(ConnectionEdgesTest, AConnectionMadeAfterPassingOverASilentPoolerIsNotBroken) {
  expect_a_healthy_connection_past(AnswersOnlyTheStartup::OnStatement::silent);
}

// Passing over a pooler that closes the connection on its first statement (notice_pooler() ->
// Impl::lost(), which sets Impl::broken) leaves nothing of that on the next host's connection:
// the one connect() returns, on the healthy second host, is not is_broken().
TEST_F(ConnectionEdgesTest, AConnectionMadeAfterPassingOverAClosingPoolerIsNotBroken) {
  expect_a_healthy_connection_past(AnswersOnlyTheStartup::OnStatement::close);
}

// The pool's view of it: with an on_connect hook (after which the pool checks is_broken()), a
// connect that passed over the closing host serves from the healthy second host.
TEST_F(ConnectionEdgesTest, APoolWithOnConnectServesFromTheSecondHost) {
  AnswersOnlyTheStartup pooler_of_a_dead_server(AnswersOnlyTheStartup::OnStatement::close);
  PoolConfig pool_config;
  pool_config.conninfo = two_hosts_conninfo(pooler_of_a_dead_server.port());
  pool_config.max_size = 1;
  pool_config.application = "pgrt-edges";
  pool_config.instance = "silent-first-host";
  pool_config.connect.connect_timeout = 2s;
  pool_config.acquire_timeout = 6s;
  pool_config.on_connect = [](Connection& connection) -> asio::awaitable<void> {
    co_await connection.execute("SET search_path TO pg_catalog, public");
  };
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    Pool pool(executor, pool_config);
    try {
      auto lease = co_await pool.acquire();
      EXPECT_EQ((co_await lease->query("SELECT inet_server_port()")).scalar<int>(),
                cluster().port());
    } catch (const Error& error) {
      ADD_FAILURE() << "no connection from the healthy second host: " << error.what();
    }
    (void)co_await pool.close(2s);
  });
}

// backend_end_bound(): interval x count must not overflow for server keepalive settings
// PostgreSQL accepts (both are int GUCs, 0..INT_MAX; interval in seconds): a bound wrapped
// negative would give a closed connection's capacity back long before the server's keepalives
// end its backend (strict max). It saturates instead.
TEST(BackendEndBound, TheBoundDoesNotOverflowForSettingsTheServerAccepts) {
  ConnectOptions own;
  own.session_settings = {{"tcp_keepalives_interval", "2000000000"},
                          {"tcp_keepalives_count", "2000000000"}};
  const ConnectOptions guarded = with_session_guards(own, SessionGuards{});
  const auto bound = backend_end_bound(guarded);
  EXPECT_GE(bound, std::chrono::milliseconds(std::chrono::hours(24)))
      << "bound " << bound.count() << " ms";
}

// The pool's gentle cut (driver.cpp cut_at()/cut_step(): cancel request and SHUT_WR at the
// deadline, the socket left readable) lets an operation that the server answers late complete
// successfully: cut_at() then fails it all the same, so that the cut connection, whose write side
// is shut down, never goes back into service (pool.md: a keepalive ping cut at
// connect.connect_timeout has its connection discarded).
// Here: the backend is stopped (SIGSTOP) while idle, the keepalive ping is cut at
// connect_timeout (1 s), the backend resumes before cancel_timeout and answers the ping; the
// waiter that queued meanwhile gets the cut connection and its first statement fails.
TEST_F(ConnectionEdgesTest, AKeepalivePingCutAtItsDeadlineNeverHandsOutItsConnection) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs to signal the server's backend";
  PoolConfig pool_config = one_connection_cut_at_a_second("cut-ping");
  pool_config.keepalive_interval = 200ms;
  std::optional<StoppedBackend> stopped;
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    Pool pool(executor, pool_config);
    int pid = 0;
    {
      auto lease = co_await pool.acquire();
      (void)co_await lease->query("SELECT 1");
      pid = lease->backend_pid();
    }
    // Idle: the next keepalive ping gets no answer. Resumed after the ping's deadline (the ping
    // starts within ~200 ms, cut 1 s later), well before cancel_timeout's hard cut.
    stopped.emplace(pid, 1700ms);
    asio::steady_timer pause(executor, 600ms);  // the ping is in flight now
    co_await pause.async_wait(asio::use_awaitable);
    co_await expect_a_working_lease(pool);
    (void)co_await pool.close(2s);
  });
}

// The same through reset(): a lease returned inside a transaction gets a background ROLLBACK,
// cut_at(connect_timeout). The backend is stopped when the lease returns, the ROLLBACK is cut
// gently at its deadline, the backend resumes and answers it: the cut connection is discarded,
// not handed to the waiter (pool.md: "The ROLLBACK/DISCARD ALL of a reset ... are cut at
// connect.connect_timeout, and the connection discarded").
TEST_F(ConnectionEdgesTest, AResetRollbackCutAtItsDeadlineNeverHandsOutItsConnection) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs to signal the server's backend";
  const PoolConfig pool_config = one_connection_cut_at_a_second("cut-rollback");
  std::optional<StoppedBackend> stopped;
  run_coroutine([&]() -> awaitable_void {
    Pool pool(co_await asio::this_coro::executor, pool_config);
    {
      auto lease = co_await pool.acquire();
      co_await lease->begin();
      (void)co_await lease->query("SELECT 1");
      stopped.emplace(lease->backend_pid(), 1500ms);  // the ROLLBACK of the return: no answer
    }
    co_await expect_a_working_lease(pool);  // (waits for the reset)
    (void)co_await pool.close(2s);
  });
}

// A pooler in front of a dead server that gives up on the first statement with an ERROR and keeps
// the client's connection (pgcat's and Supavisor's way: "could not get connection from the
// pool") is passed over while another host is left to try (the last one is taken as it is, as a
// pooler noticed): the healthy second host is reached.
TEST_F(ConnectionEdgesTest, AHostThatRefusesTheFirstStatementIsPassedOver) {
  AnswersOnlyTheStartup refusing_pooler(AnswersOnlyTheStartup::OnStatement::refuse);
  const int fake_port = refusing_pooler.port();
  const std::string conninfo = two_hosts_conninfo(fake_port);
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions two_hosts{.conninfo = conninfo, .connect_timeout = 4s};
    try {
      auto conn = co_await Connection::connect(two_hosts);
      const char* port = PQport(conn.native_handle());
      EXPECT_EQ(std::string(port != nullptr ? port : ""), std::to_string(cluster().port()))
          << "connected to the pooler whose server is down; the healthy second host was not "
             "tried";
    } catch (const Error& error) {
      ADD_FAILURE() << "the second host was not reached: " << error.what();
    }
  });
  EXPECT_EQ(refusing_pooler.started_up(), 1);
}

// ConnectOptions' durations and numbers out of range are refused before anything is sent, with
// the field named, as PoolConfig::validate() refuses them in a pool's config: a "forever" such as
// milliseconds::max() would overflow the steady_clock deadlines it is added to (turning into a
// deadline in the past), and a negative one means nothing.
TEST_F(ConnectionEdgesTest, ConnectOptionsOutOfRangeAreRefusedBeforeConnecting) {
  struct Case {
    const char* field;
    ConnectOptions options;
  };
  const auto with = [](auto change) {
    ConnectOptions options{.conninfo = cluster().dsn()};
    change(options);
    return options;
  };
  const std::vector<Case> cases = {
      {"connect_timeout", with([](ConnectOptions& o) { o.connect_timeout = 0ms; })},
      {"connect_timeout", with([](ConnectOptions& o) { o.connect_timeout = -5ms; })},
      {"connect_timeout",
       with([](ConnectOptions& o) { o.connect_timeout = std::chrono::milliseconds::max(); })},
      {"cancel_timeout", with([](ConnectOptions& o) { o.cancel_timeout = -1ms; })},
      {"cancel_timeout",
       with([](ConnectOptions& o) { o.cancel_timeout = std::chrono::milliseconds::max(); })},
      {"tcp_user_timeout", with([](ConnectOptions& o) { o.tcp_user_timeout = -1ms; })},
      {"keepalives.idle", with([](ConnectOptions& o) { o.keepalives->idle = -1s; })},
      {"keepalives.count", with([](ConnectOptions& o) { o.keepalives->count = -1; })},
  };
  for (const Case& refused : cases) {
    SCOPED_TRACE(refused.field);
    run_coroutine([&]() -> awaitable_void {
      const auto started = std::chrono::steady_clock::now();
      const Error error = co_await testing::expect_error(Connection::connect(refused.options));
      EXPECT_EQ(error.code(), client_errc::invalid_config) << error.what();
      EXPECT_THAT(error.what(),
                  ::testing::HasSubstr(std::string("ConnectOptions::") + refused.field))
          << error.what();
      EXPECT_LT(std::chrono::steady_clock::now() - started, 1s);
    });
  }
}

// libpq reads tcp_user_timeout as an int of milliseconds: a value above INT_MAX ms (24.8 days),
// though within the year the other durations may take, would fail every TCP connect ("invalid
// integer value") after the socket is made, as if the server were down. Such a value either works
// or is refused before anything is sent, naming the member, as the rest are (a pool's
// guards.tcp_user_timeout is refused by validate() the same way).
TEST_F(ConnectionEdgesTest, ATcpUserTimeoutWithinTheYearEitherWorksOrIsRefusedByName) {
  run_coroutine([]() -> awaitable_void {
    ConnectOptions thirty_days{.conninfo = cluster().tcp_dsn(),
                               .tcp_user_timeout = std::chrono::hours(24 * 30)};
    std::string failure;
    bool invalid_config = false;
    try {
      auto conn = co_await Connection::connect(thirty_days);
      (void)co_await conn.query("SELECT 1");
    } catch (const Error& error) {
      failure = error.what();
      invalid_config = error.code() == client_errc::invalid_config;
    }
    if (!failure.empty()) {
      EXPECT_TRUE(invalid_config) << failure;
      EXPECT_THAT(failure, ::testing::HasSubstr("ConnectOptions::tcp_user_timeout")) << failure;
    }
  });
}

// A conninfo value libpq refuses before it connects (a port out of range, a hostaddr that is no
// address, a keepalives that is no number, a service no service file defines) was taken for a
// server that is down (connect_failed, "check that the server is running"): a pool waited for it
// as for an outage, and pgrt-diag exited 3 (unreachable) instead of 78 (config). Each is refused
// as invalid_config, naming the setting, with a hint to fix the conninfo. A server that is really
// unreachable (a closed port) stays connect_failed.
TEST_F(ConnectionEdgesTest, ASettingLibpqRefusesIsAConfigurationErrorNamingIt) {
  const std::filesystem::path services = std::filesystem::temp_directory_path() /
                                         ("pgrt_edges_services_" + std::to_string(::getpid()));
  {
    std::ofstream file(services);
    file << "[other]\nhost=127.0.0.1\n";
  }
  ::setenv("PGSERVICEFILE", services.c_str(), 1);
  const std::string tcp = cluster().tcp_dsn();
  struct Case {
    std::string conninfo;
    std::string named;  // what the message must name
  };
  const std::vector<Case> cases = {
      {"postgresql://app@127.0.0.1:99999/db", "port"},
      {"host=127.0.0.1 port=-1 user=app dbname=db", "port"},
      {"hostaddr=abc user=app dbname=db", "hostaddr"},
      {tcp + " keepalives=abc", "keepalives"},
      {tcp + " keepalives_idle=x", "keepalives_idle"},
      {"service=nosuch", "service"},
  };
  for (const Case& refused : cases) {
    SCOPED_TRACE(refused.conninfo);
    run_coroutine([&]() -> awaitable_void {
      const auto started = std::chrono::steady_clock::now();
      ConnectOptions options{.conninfo = refused.conninfo, .connect_timeout = 5s};
      const Error error = co_await testing::expect_error(Connection::connect(options));
      EXPECT_EQ(error.code(), client_errc::invalid_config) << error.what();
      EXPECT_THAT(error.diagnostics().message,
                  ::testing::HasSubstr("the setting " + refused.named + " is not valid"))
          << error.what();
      EXPECT_THAT(error.diagnostics().hint, ::testing::HasSubstr("conninfo")) << error.what();
      EXPECT_LT(std::chrono::steady_clock::now() - started, 2s);
    });
  }
  ::unsetenv("PGSERVICEFILE");
  std::filesystem::remove(services);
  // A server that does not answer is not a configuration error.
  run_coroutine([&]() -> awaitable_void {
    ConnectOptions closed{.conninfo = "host=127.0.0.1 port=1 user=app dbname=db keepalives=1",
                          .connect_timeout = 5s};
    const Error error = co_await testing::expect_error(Connection::connect(closed));
    EXPECT_EQ(error.code(), client_errc::connect_failed) << error.what();
  });
}

// A keepalives_* value in the conninfo that libpq takes as a number but the kernel refuses
// (keepalives_idle=-5: "setsockopt(TCP_KEEPIDLE) failed: Invalid argument") failed every TCP
// connect as if the server were down (connect_failed). It is a configuration error naming the
// setting, as the other settings libpq refuses are.
TEST_F(ConnectionEdgesTest, AKeepaliveValueTheKernelRefusesIsAConfigurationErrorNamingIt) {
  const std::string tcp = cluster().tcp_dsn();
  for (const char* setting : {"keepalives_idle", "keepalives_interval", "keepalives_count"}) {
    SCOPED_TRACE(setting);
    run_coroutine([&]() -> awaitable_void {
      ConnectOptions options{.conninfo = tcp + " " + setting + "=-5", .connect_timeout = 5s};
      const Error error = co_await testing::expect_error(Connection::connect(options));
      EXPECT_EQ(error.code(), client_errc::invalid_config) << error.what();
      EXPECT_THAT(error.diagnostics().message,
                  ::testing::HasSubstr(std::string("the setting ") + setting + " is not valid"))
          << error.what();
      EXPECT_THAT(error.diagnostics().hint, ::testing::HasSubstr("conninfo")) << error.what();
    });
  }
}

// A COMMIT sent as a statement (execute(), query()) in a failed transaction block was answered
// with the tag ROLLBACK and no error, and returned as a success: the block's work was gone. It
// fails with 25P02 now, as Connection::commit() does.
TEST_F(ConnectionEdgesTest, ACommitStatementOfAFailedTransactionIsNotASuccess) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await Connection::connect(options());
    co_await conn.execute("DROP TABLE IF EXISTS edge_commit_statement");
    co_await conn.execute("CREATE TABLE edge_commit_statement (v int)");
    for (const char* commit : {"COMMIT", "end work"}) {
      co_await conn.execute("BEGIN");
      co_await conn.execute("INSERT INTO edge_commit_statement VALUES (1)");
      auto failed = co_await expect_error(conn.execute("SELECT 1 / 0"));
      EXPECT_EQ(failed.sqlstate(), "22012");
      auto rolled_back = co_await expect_error(conn.execute(commit));
      EXPECT_EQ(rolled_back.sqlstate(), "25P02") << commit << ": " << rolled_back.what();
      EXPECT_EQ(rolled_back.diagnostics().statement, commit);
      EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);
    }
    // Through commit() as before; and a COMMIT that commits, or a ROLLBACK, is no failure.
    co_await conn.begin();
    (void)co_await expect_error(conn.execute("SELECT 1 / 0"));
    auto by_commit = co_await expect_error(conn.commit());
    EXPECT_EQ(by_commit.sqlstate(), "25P02");
    co_await conn.execute("BEGIN");
    co_await conn.execute("INSERT INTO edge_commit_statement VALUES (2)");
    EXPECT_EQ((co_await conn.query("COMMIT")).command_tag(), "COMMIT");
    co_await conn.execute("BEGIN");
    (void)co_await expect_error(conn.execute("SELECT 1 / 0"));
    co_await conn.execute("ROLLBACK");
    EXPECT_EQ((co_await conn.query("SELECT sum(v) FROM edge_commit_statement")).scalar<int>(), 2);
  });
}

// In a pipeline inside a transaction block, a COMMIT after a failed statement was answered by the
// server with the tag ROLLBACK and no error, and its outcome was ok(): the block's work was gone,
// yet the COMMIT said it succeeded. It fails now with 25P02, as Connection::commit() does.
TEST_F(ConnectionEdgesTest, APipelinedCommitOfAFailedTransactionIsNotReportedAsASuccess) {
  run_coroutine([]() -> awaitable_void {
    auto conn = co_await Connection::connect(options());
    co_await conn.execute("DROP TABLE IF EXISTS edge_pipelined_commit");
    co_await conn.execute("CREATE TABLE edge_pipelined_commit (v int)");
    Pipeline batch;
    batch.add("BEGIN")
        .add("INSERT INTO edge_pipelined_commit VALUES (1)")
        .sync()
        .add("SELECT 1 / 0")
        .sync()
        .add("COMMIT")
        .sync()
        .add("SELECT count(*) FROM edge_pipelined_commit");
    const std::vector<PipelineOutcome> outcomes = co_await conn.run(batch);
    EXPECT_EQ(outcomes.size(), 5U);
    if (outcomes.size() != 5U) co_return;
    EXPECT_TRUE(outcomes[1].ok());
    EXPECT_EQ(outcomes[2].diagnostics.sqlstate, "22012");
    const PipelineOutcome& commit = outcomes[3];
    EXPECT_FALSE(commit.ok()) << "COMMIT rolled back (" << commit.result.command_tag()
                              << "), and said it succeeded";
    EXPECT_EQ(commit.error, make_sqlstate_error("25P02"));
    EXPECT_EQ(commit.diagnostics.sqlstate, "25P02");
    EXPECT_EQ(commit.diagnostics.statement, "COMMIT");
    EXPECT_TRUE(outcomes[4].ok()) << "the block ended: the next segment runs";
    EXPECT_EQ(conn.transaction_status(), TransactionStatus::idle);
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM edge_pipelined_commit")).scalar<int>(), 0);

    // A COMMIT that commits, and a ROLLBACK asked for, are no failures.
    Pipeline fine;
    fine.add("BEGIN")
        .add("INSERT INTO edge_pipelined_commit VALUES (2)")
        .add("END")
        .sync()
        .add("BEGIN")
        .add("ROLLBACK")
        .sync();
    const std::vector<PipelineOutcome> good = co_await conn.run(fine);
    for (const PipelineOutcome& outcome : good) {
      EXPECT_TRUE(outcome.ok()) << outcome.diagnostics.statement << ": "
                                << outcome.diagnostics.message;
    }
    EXPECT_EQ((co_await conn.query("SELECT count(*) FROM edge_pipelined_commit")).scalar<int>(), 1);
  });
}

}  // namespace
}  // namespace pgrt
