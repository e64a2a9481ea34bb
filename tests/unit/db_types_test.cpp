// Conversions, COPY encoding and error categories, without a server.
#include <cmath>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <limits>
#include <span>
#include <sys/mman.h>

#include <pgrt/db/copy.hpp>
#include <pgrt/db/error.hpp>
#include <pgrt/db/pipeline.hpp>
#include <pgrt/db/types.hpp>

namespace pgrt {
namespace {

using std::chrono::system_clock;
using ::testing::HasSubstr;
using ::testing::Not;

Field field(std::string_view text, Oid type) {
  return Field{.text = text, .type = type, .column_name = "col", .column_index = 2};
}

TEST(Codec, IntegersAreSentBigEndianWithTheirExactType) {
  ParamSink sink;
  encode_params(sink, std::int16_t{0x0102}, std::int32_t{-2}, std::int64_t{1}, std::uint32_t{7});
  ASSERT_EQ(sink.size(), 4U);
  EXPECT_EQ(sink.types()[0], oid::int2);
  EXPECT_EQ(sink.types()[1], oid::int4);
  EXPECT_EQ(sink.types()[2], oid::int8);
  EXPECT_EQ(sink.types()[3], oid::int8) << "uint32 needs int8 to keep its range";
  const auto values = sink.values();
  EXPECT_EQ(sink.lengths()[0], 2);
  EXPECT_EQ(values[0][0], 0x01);
  EXPECT_EQ(values[0][1], 0x02);
  EXPECT_EQ(static_cast<unsigned char>(values[1][3]), 0xFE);
  EXPECT_EQ(sink.formats()[0], 1);
}

TEST(Codec, StringsAreTextOfUnspecifiedTypeAndNullIsANullPointer) {
  ParamSink sink;
  encode_params(sink, std::string("a"), "b", std::optional<int>{}, std::optional<int>{5});
  EXPECT_EQ(sink.types()[0], oid::unspecified);
  EXPECT_EQ(sink.formats()[0], 0);
  const auto values = sink.values();
  EXPECT_EQ(std::string_view(values[1], static_cast<std::size_t>(sink.lengths()[1])), "b");
  EXPECT_EQ(values[2], nullptr);
  EXPECT_NE(values[3], nullptr);
  EXPECT_EQ(sink.types()[3], oid::int4);
}

// libpq sends a text-format value up to its first NUL: "nul\0inside" would be stored as "nul",
// reported as written. No text value can hold a NUL, so it is refused before anything is sent.
TEST(Codec, AStringWithANulByteIsRefusedNotCutShort) {
  ParamSink sink;
  encode_params(sink, std::string("first"), std::string("nul\0inside", 10), std::string("x"));
  EXPECT_TRUE(sink.failed());
  EXPECT_EQ(sink.size(), 3U);  // the positions stay
  try {
    sink.check();
    FAIL() << "a NUL byte was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::conversion);
    EXPECT_THAT(error.what(), ::testing::HasSubstr("parameter $2 holds a NUL byte at offset 3"));
  }
  ParamSink clean;
  encode_params(clean, std::string("no nul"));
  EXPECT_FALSE(clean.failed());
  EXPECT_NO_THROW(clean.check());
  // A Pipeline adds nothing for a statement that cannot be encoded.
  Pipeline pipeline;
  pipeline.add("SELECT $1", std::string("a"));
  EXPECT_THROW(pipeline.add("SELECT $1", std::string_view("\0", 1)), Error);
  EXPECT_EQ(pipeline.size(), 1U);
}

// libpq takes a value's length as an int: a value of 2^31 bytes or more would be sent with its
// length cut to 32 bits (negative here; 2^32 + 5 bytes would go out as 5 bytes). It is refused
// before anything is sent, and not copied. (The value is a reserved, untouched mapping: no memory
// is used unless something reads it.)
TEST(Codec, AValueLongerThanLibpqCanSendIsRefusedNotCutShort) {
  const std::size_t too_long = static_cast<std::size_t>(std::numeric_limits<int>::max()) + 1;
  void* mapped =
      ::mmap(nullptr, too_long, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED);
  {
    ParamSink sink;
    sink.text("first");
    sink.binary(std::span(static_cast<const std::byte*>(mapped), too_long), oid::bytea);
    sink.text("third");
    EXPECT_TRUE(sink.failed()) << "sent with length " << sink.lengths()[1];
    EXPECT_EQ(sink.size(), 3U);  // the positions stay
    try {
      sink.check();
      ADD_FAILURE() << "a value of 2^31 bytes was accepted";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::conversion);
      EXPECT_THAT(error.what(), HasSubstr("parameter $2 is 2147483648 bytes, more than libpq "
                                          "can send in one value"));
    }
  }
  ::munmap(mapped, too_long);
}

TEST(Codec, IntegersDecodeWithRangeAndTypeChecks) {
  EXPECT_EQ(Codec<std::int64_t>::decode(field("-9223372036854775808", oid::int8)),
            std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(Codec<std::int16_t>::decode(field("-32768", oid::int4)), -32768);
  EXPECT_THROW(Codec<std::int16_t>::decode(field("40000", oid::int4)), Error);
  EXPECT_THROW(Codec<std::uint32_t>::decode(field("-1", oid::int4)), Error);
  EXPECT_THROW(Codec<int>::decode(field("1.5", oid::numeric)), Error);
  try {
    (void)Codec<int>::decode(field("t", oid::boolean));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::conversion);
    EXPECT_THAT(error.what(), HasSubstr("'col' (index 2)"));
    EXPECT_THAT(error.what(), HasSubstr("bool"));
    EXPECT_THAT(error.what(), HasSubstr("std::int32_t"));
  }
}

TEST(Codec, FloatsBoolsAndBytea) {
  EXPECT_DOUBLE_EQ(Codec<double>::decode(field("1.25", oid::float8)), 1.25);
  EXPECT_TRUE(std::isinf(Codec<double>::decode(field("-Infinity", oid::float8))));
  EXPECT_TRUE(std::isnan(Codec<double>::decode(field("NaN", oid::numeric))));
  // float: a float8 beyond float's range is an error, not a silent infinity; infinities stay.
  EXPECT_FLOAT_EQ(Codec<float>::decode(field("3.0e38", oid::float8)), 3.0e38F);
  EXPECT_THROW(Codec<float>::decode(field("1e300", oid::float8)), Error);
  EXPECT_THROW(Codec<float>::decode(field("-1e39", oid::float8)), Error);
  EXPECT_TRUE(std::isinf(Codec<float>::decode(field("-Infinity", oid::float8))));
  EXPECT_TRUE(Codec<bool>::decode(field("t", oid::boolean)));
  EXPECT_THROW(Codec<bool>::decode(field("yes", oid::boolean)), Error);
  EXPECT_EQ(Codec<Bytes>::decode(field("\\x00ff10", oid::bytea)),
            (Bytes{std::byte{0}, std::byte{0xFF}, std::byte{0x10}}));
  EXPECT_THROW(Codec<Bytes>::decode(field("\\x0g", oid::bytea)), Error);
  EXPECT_THROW(Codec<Bytes>::decode(field("\\000", oid::bytea)), Error);
}

TEST(Codec, TimestamptzParsesIsoWithAnyOffset) {
  using namespace std::chrono;
  const auto expected = system_clock::time_point(sys_days(year(2024) / 1 / 1) + 1us);
  EXPECT_EQ(Codec<system_clock::time_point>::decode(
                field("2024-01-01 00:00:00.000001+00", oid::timestamptz)),
            expected);
  EXPECT_EQ(Codec<system_clock::time_point>::decode(
                field("2024-01-01 05:30:00.000001+05:30", oid::timestamptz)),
            expected);
  EXPECT_EQ(Codec<system_clock::time_point>::decode(
                field("2023-12-31 14:00:00.000001-10", oid::timestamptz)),
            expected);
  EXPECT_EQ(Codec<system_clock::time_point>::decode(
                field("1900-01-01 00:00:00+00:00:00", oid::timestamptz)),
            system_clock::time_point(sys_days(year(1900) / 1 / 1)));
  EXPECT_EQ(Codec<system_clock::time_point>::decode(field("infinity", oid::timestamptz)),
            system_clock::time_point::max());
  EXPECT_THROW(Codec<system_clock::time_point>::decode(field("01/02/2024", oid::timestamptz)),
               Error);
  // Within PostgreSQL's range but beyond what system_clock holds (nanoseconds, about 1677 to
  // 2262 with libstdc++): an error, never a wrapped-around instant.
  for (const char* text : {"9999-12-31 00:00:00+00", "0001-01-01 00:00:00+00",
                           "2262-04-12 00:00:00+00", "1677-09-20 00:00:00+00"}) {
    try {
      (void)Codec<system_clock::time_point>::decode(field(text, oid::timestamptz));
      ADD_FAILURE() << text << " was read";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::conversion);
      EXPECT_THAT(error.what(), HasSubstr("outside the range"));
    }
  }
  EXPECT_EQ(
      Codec<system_clock::time_point>::decode(field("2262-04-11 00:00:00+00", oid::timestamptz)),
      system_clock::time_point(sys_days(year(2262) / 4 / 11)));
  EXPECT_THROW(
      Codec<system_clock::time_point>::decode(field("2024-01-01 00:00:00", oid::timestamp)), Error);
}

// A timestamptz of year 10000 or later, or BC, was refused as "expected ISO format (DateStyle
// ISO)" or "trailing characters", as if the session's DateStyle were wrong: it is a value out of
// the time_point's range, and is said to be.
TEST(Codec, ATimestampOfAFiveDigitYearOrBcIsSaidToBeOutOfRange) {
  for (const char* text : {"10000-01-01 00:00:00+00", "294276-12-31 23:59:59.999999+00",
                           "0044-03-15 11:50:39-00:09:21 BC", "4713-01-01 00:00:00+00 BC"}) {
    try {
      (void)Codec<system_clock::time_point>::decode(field(text, oid::timestamptz));
      ADD_FAILURE() << text << " was read";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::conversion);
      EXPECT_THAT(error.what(), HasSubstr("outside the range")) << text;
      EXPECT_THAT(error.what(), Not(HasSubstr("DateStyle"))) << text;
    }
  }
}

TEST(Copy, TextRowsEscapeSpecialCharactersAndNulls) {
  std::string out;
  copy_text_row(out, 1, "tab\there\\back\nline", std::optional<int>{}, true, 2.5,
                Bytes{std::byte{0xAB}});
  EXPECT_EQ(out, "1\ttab\\there\\\\back\\nline\t\\N\tt\t2.5\t\\\\xab\n");
  std::string instant;
  append_copy_field(
      instant, system_clock::time_point(std::chrono::sys_days(std::chrono::year(1969) / 12 / 31) +
                                        std::chrono::hours(23) + std::chrono::microseconds(5)));
  EXPECT_EQ(instant, "1969-12-31 23:00:00.000005+00");
  // The infinities, as a parameter sends them.
  std::string infinite;
  append_copy_field(infinite, system_clock::time_point::max());
  infinite += ' ';
  append_copy_field(infinite, system_clock::time_point::min());
  EXPECT_EQ(infinite, "infinity -infinity");
  // Beyond 2^53 microseconds from the epoch a double cannot hold the last microsecond: the day
  // is computed in integers, so the last microsecond of a day stays in that day.
  std::string far;
  append_copy_field(
      far, system_clock::time_point(std::chrono::sys_days(std::chrono::year(2262) / 4 / 9) +
                                    std::chrono::hours(24) - std::chrono::microseconds(1)));
  far += ' ';
  append_copy_field(
      far, system_clock::time_point(std::chrono::sys_days(std::chrono::year(1678) / 1 / 1) +
                                    std::chrono::hours(24) - std::chrono::microseconds(1)));
  EXPECT_EQ(far, "2262-04-09 23:59:59.999999+00 1678-01-01 23:59:59.999999+00");
}

template <typename T>
concept CopyField = requires(std::string& out, const T& value) {
  append_copy_field(out, value);
};

// A character given to copy_text_row() was written as its code: 'x' stored as "120" in a text
// column, without a word (char has no Codec, so as a parameter it does not compile). A null
// const char* (NULL as a parameter) was read through as a string: undefined behaviour.
TEST(Copy, ACharacterIsNoFieldAndANullCStringIsNull) {
  static_assert(!CopyField<char>, "'x' would be written as 120");
  static_assert(!CopyField<wchar_t> && !CopyField<char8_t> && !CopyField<char16_t> &&
                !CopyField<char32_t>);
  static_assert(!Encodable<char> && !Encodable<char8_t> && !Encodable<char32_t>);
  static_assert(CopyField<signed char> && CopyField<unsigned char> && CopyField<std::int8_t>);
  static_assert(CopyField<std::optional<int>>);
  std::string out;
  const char* none = nullptr;
  copy_text_row(out, none, "x", std::int8_t{-3});
  EXPECT_EQ(out, "\\N\tx\t-3\n");
}

// The int8 of microseconds since 2000-01-01 that a timestamptz parameter carries.
std::int64_t sent_microseconds(system_clock::time_point at) {
  ParamSink sink;
  encode_params(sink, at);
  std::uint64_t bits = 0;
  for (int i = 0; i < 8; ++i) bits = bits << 8U | static_cast<unsigned char>(sink.values()[0][i]);
  return static_cast<std::int64_t>(bits);
}

// A time_point finer than a microsecond was cut toward the epoch: after 1970 to the microsecond
// before it, but before 1970 to the one after it, so 1969-12-31 23:59:59.9999995 was stored as
// 1970-01-01 00:00:00 (a later second, day and year). Both as a parameter and in COPY it is now
// the microsecond that holds the instant, on either side of 1970.
TEST(Codec, ATimestampFinerThanAMicrosecondKeepsItsMicrosecondBefore1970Too) {
  using std::chrono::nanoseconds;
  constexpr std::int64_t epoch_in_2000 = -946'684'800'000'000;  // 1970-01-01, in PG's count
  const system_clock::time_point just_before(nanoseconds(-500));
  const system_clock::time_point just_after(nanoseconds(1500));
  EXPECT_EQ(sent_microseconds(just_before), epoch_in_2000 - 1);
  EXPECT_EQ(sent_microseconds(just_after), epoch_in_2000 + 1);
  EXPECT_EQ(sent_microseconds(system_clock::time_point(nanoseconds(-1500))), epoch_in_2000 - 2);
  std::string copied;
  copy_text_row(copied, just_before, just_after);
  EXPECT_EQ(copied, "1969-12-31 23:59:59.999999+00\t1970-01-01 00:00:00.000001+00\n");
  // Within a microsecond of time_point::min(), floored would be below what a time_point holds
  // (and could not be read back): the first whole microsecond it holds.
  const system_clock::time_point lowest = system_clock::time_point::min() + nanoseconds(1);
  std::string edge;
  append_copy_field(edge, lowest);
  EXPECT_EQ(edge, "1677-09-21 00:12:43.145225+00");
  EXPECT_EQ(Codec<system_clock::time_point>::decode(field(edge, oid::timestamptz)),
            system_clock::time_point(nanoseconds(-9'223'372'036'854'775'000)));
  EXPECT_EQ(sent_microseconds(lowest), -9'223'372'036'854'775 + epoch_in_2000);
}

TEST(Errors, SqlstatesRoundTripAndMapToConditions) {
  const auto unique = make_sqlstate_error("23505");
  EXPECT_EQ(sqlstate_of(unique), "23505");
  EXPECT_THAT(unique.message(), HasSubstr("unique_violation"));
  EXPECT_TRUE(unique == condition::unique_violation);
  EXPECT_FALSE(unique == condition::deadlock);
  EXPECT_TRUE(make_sqlstate_error("53300") == condition::too_many_connections);
  EXPECT_TRUE(make_sqlstate_error("53200") == condition::too_many_connections) << "class 53";
  EXPECT_TRUE(make_sqlstate_error("57P01") == condition::admin_shutdown);
  EXPECT_TRUE(make_sqlstate_error("57P01") == condition::connection_error);
  EXPECT_TRUE(make_sqlstate_error("08006") == condition::connection_error);
  // (An ERROR that leaves the connection working: a statement given the wrong number of
  // parameters.)
  EXPECT_FALSE(make_sqlstate_error("08P01") == condition::connection_error);
  EXPECT_TRUE(make_sqlstate_error("40001") == condition::serialization_failure);
  EXPECT_TRUE(make_sqlstate_error("40P01") == condition::deadlock);
  EXPECT_TRUE(make_sqlstate_error("57014") == condition::query_canceled);
  EXPECT_EQ(sqlstate_of(make_sqlstate_error("ZZZZZ")), "ZZZZZ");
  EXPECT_EQ(make_sqlstate_error("bad"), client_errc::protocol_error);

  EXPECT_TRUE(make_error_code(client_errc::connection_lost) == condition::connection_error);
  EXPECT_TRUE(make_error_code(client_errc::cancelled) == condition::query_canceled);
  EXPECT_TRUE(make_error_code(client_errc::timeout) == condition::timeout);
  EXPECT_FALSE(make_error_code(client_errc::conversion) == condition::connection_error);
}

TEST(Errors, ErrorMessageCarriesDiagnostics) {
  const Error error(make_sqlstate_error("23505"),
                    Diagnostics{.sqlstate = "23505",
                                .severity = "ERROR",
                                .message = "duplicate key",
                                .detail = "Key (id)=(1) already exists.",
                                .hint = "use ON CONFLICT",
                                .statement = "INSERT"});
  EXPECT_STREQ(error.what(),
               "duplicate key [23505 unique_violation]\nDETAIL: Key (id)=(1) already exists.\n"
               "HINT: use ON CONFLICT\nSTATEMENT: INSERT");
  EXPECT_EQ(error.sqlstate(), "23505");
}

// A statement that carries a password in a string constant (it cannot be a parameter there):
// what() shows '****' in its place; the rest of the text, and diagnostics().statement, as sent.
TEST(Errors, APasswordInTheStatementNeverShowsInWhat) {
  const std::string sql = "ALTER ROLE app WITH ENCRYPTED PASSWORD 'hunter2' VALID UNTIL 'infinity'";
  const Error error(
      make_sqlstate_error("42501"),
      Diagnostics{.sqlstate = "42501", .message = "permission denied", .statement = sql});
  EXPECT_THAT(error.what(), Not(HasSubstr("hunter2")));
  EXPECT_THAT(error.what(),
              HasSubstr("STATEMENT: ALTER ROLE app WITH ENCRYPTED PASSWORD '****' VALID UNTIL "
                        "'infinity'"));
  EXPECT_EQ(error.diagnostics().statement, sql);

  EXPECT_EQ(redact_statement(R"(create user u password E'it\'s' login)"),
            "create user u password '****' login");
  EXPECT_EQ(redact_statement("CREATE ROLE u PASSWORD $$x'y$$; -- password 'kept'"),
            "CREATE ROLE u PASSWORD '****'; -- password 'kept'");
  EXPECT_EQ(redact_statement("CREATE ROLE u PASSWORD $pw$s3cret$pw$"),
            "CREATE ROLE u PASSWORD '****'");
  EXPECT_EQ(redact_statement("CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'u', password 'p')"),
            "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'u', password '****')");
  // The other forms of a constant, a comment before it, a constant continued on the next line.
  EXPECT_EQ(redact_statement("ALTER ROLE u PASSWORD U&'S3cret' LOGIN"),
            "ALTER ROLE u PASSWORD '****' LOGIN");
  EXPECT_EQ(redact_statement("ALTER ROLE u PASSWORD u&'d\\0061t''a'"),
            "ALTER ROLE u PASSWORD '****'");
  EXPECT_EQ(redact_statement("ALTER ROLE u PASSWORD N'S3cret'"), "ALTER ROLE u PASSWORD '****'");
  EXPECT_EQ(redact_statement("ALTER ROLE u PASSWORD /* c */ 'S3cret' LOGIN"),
            "ALTER ROLE u PASSWORD '****' LOGIN");
  EXPECT_EQ(redact_statement("ALTER ROLE u PASSWORD -- c\n 'S3cret'"),
            "ALTER ROLE u PASSWORD '****'");
  EXPECT_EQ(redact_statement("ALTER ROLE u PASSWORD 'S3'\n  'cret' LOGIN"),
            "ALTER ROLE u PASSWORD '****' LOGIN");
  // Not a password: a column of that name, a string that holds the word, a parameter, a quoted
  // identifier.
  for (const char* kept : {"SELECT password FROM users WHERE name = 'x'", "SELECT 'password ''p'''",
                           "UPDATE t SET password = $1", R"(SELECT "password" AS a)", "SELECT 1"}) {
    EXPECT_EQ(redact_statement(kept), kept);
  }
}

// A user mapping's OPTIONS is a form redact_statement() covers (error.hpp), and postgres_fdw takes
// two secrets there: password and sslpassword (the pass phrase of the client key, "specify these in
// a user mapping"). Both constants are masked in what()'s STATEMENT line, as mask_password() masks
// sslpassword in a conninfo, in CREATE and in ALTER USER MAPPING.
TEST(Errors, AnSslpasswordInAUserMappingNeverShowsInWhat) {
  const std::string sql =
      "CREATE USER MAPPING FOR app SERVER remote OPTIONS (user 'app', password 'hunter2', "
      "sslpassword 'keyphrase')";
  const Error error(
      make_sqlstate_error("42704"),
      Diagnostics{
          .sqlstate = "42704", .message = "server \"remote\" does not exist", .statement = sql});
  EXPECT_THAT(error.what(), Not(HasSubstr("hunter2")));
  EXPECT_THAT(error.what(), Not(HasSubstr("keyphrase"))) << error.what();
  EXPECT_THAT(redact_statement("ALTER USER MAPPING FOR app SERVER remote OPTIONS (ADD sslpassword "
                               "'keyphrase')"),
              Not(HasSubstr("keyphrase")));
}

// An option name may be written as a quoted identifier ("password", "sslpassword": the same
// options to postgres_fdw): its constant is masked as after the bare word. A quoted identifier
// that is not followed by a constant (a column named "password") stays as it is.
TEST(Errors, AQuotedPasswordOptionInAUserMappingNeverShowsInWhat) {
  EXPECT_EQ(
      redact_statement(
          R"(CREATE USER MAPPING FOR app SERVER s OPTIONS ("user" 'app', "password" 'hunter2'))"),
      R"(CREATE USER MAPPING FOR app SERVER s OPTIONS ("user" 'app', "password" '****'))");
  EXPECT_THAT(redact_statement(
                  R"(ALTER USER MAPPING FOR app SERVER s OPTIONS (SET "SslPassword" 'keyphrase'))"),
              Not(HasSubstr("keyphrase")));
  for (const char* kept :
       {R"(SELECT "password" FROM users WHERE name = 'x')", R"(UPDATE t SET "password" = $1)"}) {
    EXPECT_EQ(redact_statement(kept), kept);
  }
}

}  // namespace
}  // namespace pgrt
