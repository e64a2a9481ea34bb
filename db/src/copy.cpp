#include "pgrt/db/copy.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "connection/impl.hpp"

namespace pgrt {

namespace {

constexpr std::size_t copy_chunk_size = 64 * 1024;

// COPY's binary format starts with this signature; its data holds NUL bytes of its own.
constexpr std::string_view binary_copy_signature("PGCOPY\n\377\r\n\0", 11);

// Text and CSV input cannot hold a NUL byte: the server refuses it (22021) and fails the whole
// COPY. Refused before anything is sent, saying where it is.
void refuse_nul_in_text(std::string_view data, std::string_view statement) {
  if (data.starts_with(binary_copy_signature)) return;
  const std::size_t nul = data.find('\0');
  if (nul == std::string_view::npos) return;
  const std::string_view before = data.substr(0, nul);
  const std::size_t line_start =
      before.rfind('\n') == std::string_view::npos ? 0 : before.rfind('\n') + 1;
  const auto row = std::count(before.begin(), before.end(), '\n') + 1;
  const auto column =
      std::count(before.begin() + static_cast<std::ptrdiff_t>(line_start), before.end(), '\t') + 1;
  throw Error(make_error_code(client_errc::conversion),
              Diagnostics{.message = "COPY data holds a NUL byte at row " + std::to_string(row) +
                                     ", column " + std::to_string(column) + " (line " +
                                     std::to_string(row) + ", tab-separated field " +
                                     std::to_string(column) + "; byte " + std::to_string(nul) +
                                     " of the data), which no PostgreSQL text value can hold "
                                     "(the server would refuse the whole COPY); nothing was sent",
                          .hint = "strip it, or copy the value as pgrt::Bytes into a bytea column",
                          .statement = std::string(statement)});
}

// NaN and the infinities as PostgreSQL spells them; any other value as its type's own shortest
// text that reads back as the same value (a float's, not the double's it widens to: a parameter's
// float4 is cast by the server from this text, to text, and to numeric as far as its 6 digits go).
template <typename Floating>
void append_floating(std::string& out, Floating value) {
  if (std::isnan(value)) {
    out += "NaN";
  } else if (std::isinf(value)) {
    out += value > 0 ? "Infinity" : "-Infinity";
  } else {
    char buffer[32];
    auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, value);
    out.append(buffer, end);
  }
}

}  // namespace

void append_copy_field(std::string& out, std::string_view value) {
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        out += c;
    }
  }
}

void append_copy_field(std::string& out, bool value) {
  out += value ? 't' : 'f';
}

void append_copy_field(std::string& out, std::int64_t value) {
  out += std::to_string(value);
}

void append_copy_field(std::string& out, std::uint64_t value) {
  out += std::to_string(value);
}

void append_copy_field(std::string& out, double value) {
  append_floating(out, value);
}

void append_copy_field(std::string& out, float value) {
  append_floating(out, value);
}

void append_copy_field(std::string& out, std::span<const std::byte> value) {
  constexpr std::string_view digits = "0123456789abcdef";
  out += "\\\\x";  // the bytea hex prefix \x, with its backslash escaped for COPY
  for (std::byte b : value) {
    const auto v = static_cast<unsigned>(b);
    out += digits[v >> 4U];
    out += digits[v & 0xFU];
  }
}

void append_copy_field(std::string& out, std::chrono::system_clock::time_point value) {
  using namespace std::chrono;
  // As a parameter is sent (Codec<system_clock::time_point>::encode).
  if (value == system_clock::time_point::max()) {
    out += "infinity";
    return;
  }
  if (value == system_clock::time_point::min()) {
    out += "-infinity";
    return;
  }
  // As a parameter is sent: the microsecond that holds the instant.
  const auto micros = detail::timestamp_microseconds(value);
  // Epoch seconds with fraction, read by PostgreSQL as a timestamptz via to_timestamp-free
  // ISO text: format as UTC "YYYY-MM-DD HH:MM:SS.ffffff+00".
  // Floor division in integers: a double loses the last microseconds beyond 2^53 us (after
  // 2255, before 1684), and 23:59:59.999999 would come out as the next day's "-00001".
  constexpr std::int64_t micros_per_day = 86'400'000'000;
  std::int64_t rest = micros % micros_per_day;  // no multiplication: no overflow near the ends
  const std::int64_t days = micros / micros_per_day - (rest < 0 ? 1 : 0);
  if (rest < 0) rest += micros_per_day;
  // civil_from_days (Howard Hinnant)
  std::int64_t z = days + 719468;
  const std::int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const auto day_of_era = static_cast<unsigned>(z - era * 146097);
  const unsigned year_of_era =
      (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146096) / 365;
  std::int64_t year = static_cast<std::int64_t>(year_of_era) + era * 400;
  const unsigned day_of_year =
      day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
  const unsigned mp = (5 * day_of_year + 2) / 153;
  const unsigned day = day_of_year - (153 * mp + 2) / 5 + 1;
  const unsigned month = mp < 10 ? mp + 3 : mp - 9;
  year += month <= 2 ? 1 : 0;
  char buffer[64];
  const auto hours = rest / 3'600'000'000;
  rest %= 3'600'000'000;
  const auto minutes = rest / 60'000'000;
  rest %= 60'000'000;
  const auto seconds = rest / 1'000'000;
  const auto fraction = rest % 1'000'000;
  std::snprintf(buffer, sizeof buffer, "%04lld-%02u-%02u %02lld:%02lld:%02lld.%06lld+00",
                static_cast<long long>(year), month, day, static_cast<long long>(hours),
                static_cast<long long>(minutes), static_cast<long long>(seconds),
                static_cast<long long>(fraction));
  out += buffer;
}

asio::awaitable<std::uint64_t> Connection::copy_from(std::string_view copy_statement,
                                                     std::string_view data) {
  check_statement_text(copy_statement);
  if (first_keyword(copy_statement) != "copy") {
    // Refused before it is sent: the server would run any other statement before pgrt saw that
    // it starts no COPY.
    throw Error(make_error_code(client_errc::protocol_error),
                Diagnostics{.message = "copy_from() needs a COPY ... FROM STDIN statement; this "
                                       "one is not a COPY, and nothing was sent",
                            .hint = "run other statements with query() or execute()",
                            .statement = std::string(copy_statement)});
  }
  refuse_nul_in_text(data, copy_statement);
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  Result result;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    PGconn* conn = impl.conn;
    const std::string statement(copy_statement);
    // The extended protocol: one statement only (a second one after a `;` is refused by the
    // server, and nothing runs).
    if (PQsendQueryParams(conn, statement.c_str(), 0, nullptr, nullptr, nullptr, nullptr, 0) == 0) {
      co_return impl.lost(statement);
    }
    if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
    PGresult* raw = nullptr;
    if (auto read_error = co_await impl.next_result(raw, statement)) co_return read_error;
    Result first(raw);
    if (raw == nullptr || PQresultStatus(raw) != PGRES_COPY_IN) {
      error_code failure =
          raw != nullptr && PQresultStatus(raw) == PGRES_FATAL_ERROR
              ? impl.server_error(raw, statement)
              : impl.fail(client_errc::protocol_error,
                          "copy_from() needs a COPY ... FROM STDIN statement; this COPY reads "
                          "or writes elsewhere, and the server has run it (none of the data "
                          "given was sent)",
                          statement);
      Result rest;
      if (auto collect_error = co_await impl.collect(statement, rest)) {
        co_return collect_error;
      }
      co_return failure;
    }
    for (std::size_t offset = 0; offset < data.size();) {
      const std::size_t size = std::min(copy_chunk_size, data.size() - offset);
      const int put = PQputCopyData(conn, data.data() + offset, static_cast<int>(size));
      if (put < 0) co_return impl.lost(statement);
      if (put == 0) {  // libpq's buffer is full
        if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
        continue;
      }
      offset += size;
    }
    for (;;) {
      const int ended = PQputCopyEnd(conn, nullptr);
      if (ended < 0) co_return impl.lost(statement);
      if (ended == 1) break;
      if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
    }
    if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
    co_return co_await impl.collect(statement, result);
  });
  if (error) throw Error(error, impl.last_error);
  co_return result.affected_rows();
}

}  // namespace pgrt
