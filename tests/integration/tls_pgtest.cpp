// TLS against a real server with ssl=on and a CA made at test time: sslmode require and
// verify-full, certificate problems with clear errors, replies whose last TLS record OpenSSL
// holds half-read, pipelines and large rows.
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <optional>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <pgrt/db.hpp>

#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/expect_error.hpp"
#include "pgrt/testing/run_coroutine.hpp"
#include "pgrt/testing/tls_record_proxy.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::expect_error;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::run_coroutine;
using awaitable_void = asio::awaitable<void>;

class TlsTest : public testing::DbTest {
 protected:
  // One TLS cluster for the whole binary (the shared cluster() is a plain one).
  static testing::TempCluster& tls_cluster() {
    static auto cluster = start_own_cluster({.tls = true});
    return *cluster;
  }
  static asio::awaitable<Connection> open(std::string conninfo) {
    ConnectOptions options{.conninfo = std::move(conninfo), .connect_timeout = 10s};
    return Connection::connect(std::move(options));
  }
  static Error connect_error(const std::string& conninfo) {
    return run_coroutine([conninfo]() -> asio::awaitable<Error> {
      co_return co_await expect_error(open(conninfo));
    });
  }
};

TEST_F(TlsTest, RequireAndVerifyFullConnectEncrypted) {
  for (const char* sslmode : {"require", "verify-ca", "verify-full"}) {
    run_coroutine([&]() -> awaitable_void {
      auto conn = co_await open(tls_cluster().tls_dsn(sslmode));
      EXPECT_EQ(PQsslInUse(conn.native_handle()), 1) << sslmode;
      auto row =
          co_await conn.query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
      EXPECT_TRUE(row[0].get<bool>(0)) << sslmode;
      EXPECT_THAT(row[0].get<std::string>(1), HasSubstr("TLS")) << sslmode;
    });
  }
}

// Each problem fails at once with client_errc::tls_failed (or the server's 28000 for a plain
// connection it refuses), says what is wrong and what to do, and is not a connection_error: a
// start that waits for the database does not wait for a certificate to change.
TEST_F(TlsTest, CertificateProblemsFailAtOnceWithAClearError) {
  const std::string port = std::to_string(tls_cluster().port());
  const std::string ca = tls_cluster().certificates()->ca_certificate.string();
  const auto stranger = testing::make_test_certificates(tls_cluster().directory() / "stranger");
  const std::string base = " port=" + port + " user=postgres dbname=postgres";

  auto expect_tls_failure = [](const Error& error, const char* says, const char* hint) {
    EXPECT_EQ(error.code(), client_errc::tls_failed) << error.what();
    EXPECT_FALSE(error.code() == condition::connection_error);
    EXPECT_THAT(error.what(), HasSubstr(says));
    EXPECT_THAT(error.diagnostics().hint, HasSubstr(hint));
  };

  expect_tls_failure(connect_error("host=wrong.example hostaddr=127.0.0.1" + base +
                                   " sslmode=verify-full sslrootcert=" + ca),
                     "does not match host name \"wrong.example\"", "does not name the host");
  expect_tls_failure(
      connect_error("host=localhost hostaddr=127.0.0.1" + base +
                    " sslmode=verify-full sslrootcert=" + stranger.ca_certificate.string()),
      "certificate verify failed", "not signed by a CA in sslrootcert");
  expect_tls_failure(
      connect_error("host=localhost hostaddr=127.0.0.1" + base +
                    " sslmode=verify-ca sslrootcert=" + stranger.ca_certificate.string()),
      "certificate verify failed", "sslrootcert");
  expect_tls_failure(connect_error("host=localhost hostaddr=127.0.0.1" + base +
                                   " sslmode=verify-full sslrootcert=/nonexistent/root.crt"),
                     "/nonexistent/root.crt", "set sslrootcert");
  // A server without TLS (the shared cluster), when TLS is required.
  expect_tls_failure(connect_error(cluster().tcp_dsn() + " sslmode=require"),
                     "does not support SSL", "ssl=off");

  // A plain connection to a server that takes only TLS on TCP: the server's refusal, with advice.
  auto plain = connect_error("host=127.0.0.1" + base + " sslmode=disable");
  EXPECT_EQ(plain.sqlstate(), "28000") << plain.what();
  EXPECT_FALSE(plain.code() == condition::connection_error);
  EXPECT_THAT(plain.what(), HasSubstr("no encryption"));
  EXPECT_THAT(plain.diagnostics().hint, HasSubstr("sslmode=require"));
}

// A client certificate the server does not trust (not signed by a CA in its ssl_ca_file): the
// server ends the handshake with the TLS alert "unknown ca", which libpq reports as "SSL error:
// tlsv1 alert unknown ca". A certificate problem like the others, which no wait cures: it fails
// as tls_failed with a hint about the client certificate, not as a connection_error that a start
// waiting for the database and the pool's backoff would retry as a server outage.
TEST_F(TlsTest, AClientCertificateTheServerDoesNotTrustIsATlsFailureNotAnOutage) {
  auto own = start_own_cluster({.tls = true});
  const std::string ca = own->certificates()->ca_certificate.string();
  // The server asks for a client certificate, and checks one given, once it has a CA for them.
  run_coroutine([&]() -> awaitable_void {
    auto admin = co_await open(own->dsn());
    co_await admin.query("ALTER SYSTEM SET ssl_ca_file = '" + ca + "'");
    co_await admin.query("SELECT pg_reload_conf()");
  });
  const auto stranger = testing::make_test_certificates(own->directory() / "client-stranger");
  const std::string conninfo =
      "host=localhost hostaddr=127.0.0.1 port=" + std::to_string(own->port()) +
      " user=postgres dbname=postgres sslmode=verify-full sslrootcert=" + ca +
      " sslcert=" + stranger.certificate.string() + " sslkey=" + stranger.key.string();
  // Until the reload has taken effect the certificate is not asked for, and the connect works.
  std::optional<Error> refused;
  for (int attempt = 0; attempt < 100 && !refused; ++attempt) {
    refused = run_coroutine([conninfo]() -> asio::awaitable<std::optional<Error>> {
      std::optional<Error> failure;
      try {
        auto conn = co_await open(conninfo);
      } catch (const Error& error) {
        failure = error;
      }
      co_return failure;
    });
    if (!refused) std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(refused.has_value()) << "the server never refused the untrusted client certificate";
  EXPECT_THAT(refused->what(), HasSubstr("unknown ca"));
  EXPECT_EQ(refused->code(), client_errc::tls_failed) << refused->what();
  EXPECT_FALSE(refused->code() == condition::connection_error)
      << "retried as a server outage: " << refused->what();
  EXPECT_THAT(refused->diagnostics().hint, HasSubstr("ssl_ca_file"));
}

// An encrypted client key (sslkey) without sslpassword: left to OpenSSL, the pass phrase would be
// asked for ("Enter PEM pass phrase:") on the controlling terminal, or without one read from
// standard input, inside PQconnectPoll() on the io_context's thread, blocking it past
// connect_timeout. pgrt's key pass phrase hook never prompts: with standard input a pipe left open
// (docker run -i, a supervisor's pipe) and no terminal, the connect fails as tls_failed within
// connect_timeout, with a hint to give sslpassword; given, the key loads. Run in a child process,
// so that a hang is bounded.
TEST_F(TlsTest, AnEncryptedClientKeyWithoutSslpasswordFailsWithinTheConnectTimeout) {
  const std::string port = std::to_string(tls_cluster().port());
  const auto& certificates = *tls_cluster().certificates();
  const std::filesystem::path encrypted = tls_cluster().directory() / "client-encrypted.key";
  const std::string make_key = "openssl pkey -in '" + certificates.key.string() +
                               "' -aes256 -passout pass:secret -out '" + encrypted.string() +
                               "' 2>/dev/null";
  ASSERT_EQ(std::system(make_key.c_str()), 0) << make_key;
  ASSERT_EQ(::chmod(encrypted.c_str(), 0600), 0);
  const std::string conninfo = "host=localhost hostaddr=127.0.0.1 port=" + port +
                               " user=postgres dbname=postgres sslmode=verify-full sslrootcert=" +
                               certificates.ca_certificate.string() +
                               " sslcert=" + certificates.certificate.string() +
                               " sslkey=" + encrypted.string();
  int input[2];
  ASSERT_EQ(::pipe(input), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // No controlling terminal; standard input a pipe whose writer (the parent) stays open.
    (void)::setsid();
    (void)::dup2(input[0], 0);
    ::close(input[1]);
    int code = 3;
    try {
      code = run_coroutine([conninfo]() -> asio::awaitable<int> {
        int outcome = 0;
        try {
          ConnectOptions options{.conninfo = conninfo, .connect_timeout = 2s};
          auto conn = co_await Connection::connect(std::move(options));
        } catch (const Error& error) {
          if (error.code() != client_errc::tls_failed) {
            outcome = 2;
          } else {
            outcome = error.diagnostics().hint.find("sslpassword") != std::string::npos ? 1 : 5;
          }
        }
        co_return outcome;
      });
    } catch (...) {
      code = 4;
    }
    ::_exit(code);
  }
  ::close(input[0]);
  int status = 0;
  bool ended = false;
  for (int waited = 0; waited < 150 && !ended; ++waited) {  // 15 s: connect_timeout is 2 s
    ended = ::waitpid(child, &status, WNOHANG) == child;
    if (!ended) std::this_thread::sleep_for(100ms);
  }
  if (!ended) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  ::close(input[1]);
  EXPECT_TRUE(ended) << "the connect still ran 15 s after it began (connect_timeout 2 s): "
                        "blocked on OpenSSL's pass phrase prompt";
  if (ended) {
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1)
        << "exit status " << status
        << " (1: tls_failed, 0: connected, 2: another error, 5: no hint to give sslpassword)";
  }
  // With its pass phrase the key loads, through the same hook.
  run_coroutine([&]() -> awaitable_void {
    auto conn = co_await open(conninfo + " sslpassword=secret");
    EXPECT_EQ(PQsslInUse(conn.native_handle()), 1);
  });
}

// OpenSSL reads a whole record but gives libpq only what its buffer has room for; the rest stays
// decrypted inside OpenSSL and the socket shows nothing. TlsRecordProxy ends every reply with a
// full 16 KiB record after a shorter one that cuts a message, so a reply of small rows leaves the
// end of the reply (CommandComplete, ReadyForQuery) there: a read that only waited on the socket
// would stall on it. Row counts vary so the cut falls in many places.
TEST_F(TlsTest, AReplyWhoseLastRecordOpenSslHoldsHalfReadNeverStalls) {
  const auto& certificates = *tls_cluster().certificates();
  testing::TlsRecordProxy proxy(
      tls_cluster().directory() / (".s.PGSQL." + std::to_string(tls_cluster().port())),
      certificates.certificate, certificates.key);
  const std::string conninfo =
      "host=localhost hostaddr=127.0.0.1 port=" + std::to_string(proxy.port()) +
      " user=postgres dbname=postgres sslmode=verify-full "
      "gssencmode=disable sslrootcert=" +
      certificates.ca_certificate.string();
  run_coroutine(
      [&]() -> awaitable_void {
        for (int rows = 150; rows <= 290; rows += 7) {
          // A fresh connection each time: libpq's input buffer starts at 16 KiB.
          auto conn = co_await open(conninfo);
          auto result = co_await with_timeout(
              conn.query("SELECT repeat('x', 100) FROM generate_series(1, $1::int)", rows), 5s);
          EXPECT_EQ(result.size(), static_cast<std::size_t>(rows));
          // Prepared, streamed and pipelined replies go the same way.
          std::size_t streamed =
              co_await with_timeout(conn.stream(
                                        "SELECT repeat('y', 90) FROM generate_series(1, $1::int)",
                                        [](const Row&) {}, rows),
                                    5s);
          EXPECT_EQ(streamed, static_cast<std::size_t>(rows));
          Pipeline pipeline;
          for (int i = 0; i < rows; ++i) pipeline.add("SELECT $1::int, repeat('z', 60)", i);
          auto outcomes = co_await with_timeout(conn.run(pipeline), 5s);
          EXPECT_EQ(outcomes.size(), static_cast<std::size_t>(rows));
          if (!outcomes.empty()) {
            EXPECT_EQ(outcomes.back().result.scalar<int>(), rows - 1);
          }
        }
      },
      120s);
}

// Rows from 1 byte to 1 MiB, many small results in one pipeline, over a real TLS connection.
TEST_F(TlsTest, LargeRowsAndLongPipelinesComeBackWhole) {
  run_coroutine(
      [&]() -> awaitable_void {
        auto conn = co_await open(tls_cluster().tls_dsn("verify-full"));
        for (int length : {1, 8000, 8191, 8192, 16000, 16384, 16385, 40000, 1 << 20}) {
          auto row = co_await with_timeout(
              conn.query("SELECT repeat('r', $1::int), $1::int", length), 10s);
          EXPECT_EQ(row[0].get<std::string>(0).size(), static_cast<std::size_t>(length));
        }
        Pipeline pipeline;
        for (int i = 0; i < 5000; ++i) pipeline.add("SELECT $1::int", i);
        auto outcomes = co_await with_timeout(conn.run(pipeline), 30s);
        EXPECT_EQ(outcomes.size(), 5000U);
        if (outcomes.size() != 5000U) co_return;
        for (int i = 0; i < 5000; i += 499) EXPECT_EQ(outcomes[i].result.scalar<int>(), i);
      },
      120s);
}

// query() over TLS: bursts of statements from many callers share one encrypted connection, their
// batches large enough to make libpq's output buffer grow while it is being filled, and every
// caller gets its own answer, a failing statement failing alone.
TEST_F(TlsTest, QueryBurstsOverTlsAnswerEveryCallerRight) {
  run_coroutine(
      [&]() -> awaitable_void {
        const auto executor = co_await asio::this_coro::executor;
        PoolConfig pool_config;
        pool_config.conninfo = tls_cluster().tls_dsn("verify-full");
        pool_config.max_size = 1;
        pool_config.application = "pgrt-test";
        pool_config.instance = "tls-query";
        Pool pool(executor, pool_config);
        {
          auto lease = co_await pool.acquire();
          EXPECT_EQ(PQsslInUse(lease->native_handle()), 1);
        }
        constexpr int callers = 200;
        const std::string padding(400, 'p');
        std::vector<int> answers(callers, -1);
        int failed = 0;
        int finished = 0;
        for (int round = 0; round < 3; ++round) {
          for (int caller = 0; caller < callers; ++caller) {
            asio::co_spawn(
                executor,
                [&, caller]() -> awaitable_void {
                  try {
                    // (caller 7 divides by zero: its error is its own)
                    const int divisor = caller == 7 ? 0 : 1;
                    // (a batch of these outgrows libpq's first 16 KiB output buffer)
                    const Result result = co_await pool.query(
                        "SELECT $1::int / $2::int, length($3)", caller, divisor, padding);
                    EXPECT_EQ(result[0].get<int>(1), static_cast<int>(padding.size()));
                    answers[caller] = result[0].get<int>(0);
                  } catch (const Error& error) {
                    EXPECT_EQ(error.diagnostics().sqlstate, "22012") << error.what();
                    ++failed;
                  }
                  ++finished;
                },
                asio::detached);
          }
          asio::steady_timer pause(executor);
          for (int waited = 0; finished < callers * (round + 1) && waited < 3000; ++waited) {
            pause.expires_after(10ms);
            co_await pause.async_wait(asio::use_awaitable);
          }
          EXPECT_EQ(finished, callers * (round + 1)) << "round " << round;
          EXPECT_EQ(failed, round + 1);
          for (int caller = 0; caller < callers; ++caller) {
            if (caller != 7) {
              EXPECT_EQ(answers[caller], caller) << "round " << round;
            }
            answers[caller] = -1;
          }
        }
        (void)co_await pool.close(5s);
      },
      120s);
}

}  // namespace
}  // namespace pgrt
