#include "pgrt/db/types.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>

#include "pgrt/db/error.hpp"

namespace pgrt {

namespace {

constexpr std::array<std::pair<Oid, std::string_view>, 17> type_names{{
    {oid::boolean, "bool"},
    {oid::bytea, "bytea"},
    {oid::int8, "int8"},
    {oid::int2, "int2"},
    {oid::int4, "int4"},
    {oid::text, "text"},
    {oid::json, "json"},
    {oid::float4, "float4"},
    {oid::float8, "float8"},
    {oid::bpchar, "bpchar"},
    {oid::varchar, "varchar"},
    {oid::date, "date"},
    {oid::timestamp, "timestamp"},
    {oid::timestamptz, "timestamptz"},
    {oid::numeric, "numeric"},
    {oid::uuid, "uuid"},
    {oid::jsonb, "jsonb"},
}};

// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 00:00:00 UTC).
constexpr std::int64_t postgres_epoch_offset_us = 946'684'800'000'000;

[[noreturn]] void throw_conversion(std::string message) {
  throw Error(make_error_code(client_errc::conversion), Diagnostics{.message = std::move(message)});
}

// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's days_from_civil).
std::int64_t days_from_civil(std::int64_t year, unsigned month, unsigned day) {
  year -= month <= 2 ? 1 : 0;
  const std::int64_t era = (year >= 0 ? year : year - 399) / 400;
  const auto year_of_era = static_cast<unsigned>(year - era * 400);
  const unsigned day_of_year = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1;
  const unsigned day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
  return era * 146097 + static_cast<std::int64_t>(day_of_era) - 719468;
}

// Parses exactly `digits` decimal digits at `text[position]`, advancing it.
bool read_digits(std::string_view text, std::size_t& position, std::size_t digits, int& out) {
  if (position + digits > text.size()) return false;
  out = 0;
  for (std::size_t i = 0; i < digits; ++i) {
    char c = text[position + i];
    if (c < '0' || c > '9') return false;
    out = out * 10 + (c - '0');
  }
  position += digits;
  return true;
}

// What follows a value's integer digits, `rest`, when it is read as the integer `cpp_type`:
// nothing, or, for a numeric, a fraction of zeros ("5.00" of a numeric(10,2)), which makes it
// exactly that integer. A fraction that is not zero, and anything else, fails.
void check_integer_rest(const Field& field, std::string_view rest, std::string_view cpp_type) {
  if (rest.empty()) return;
  if (field.type == oid::numeric && rest.front() == '.' &&
      rest.find_first_not_of("0123456789", 1) == std::string_view::npos) {
    if (rest.find_first_not_of('0', 1) == std::string_view::npos) return;
    field.fail(cpp_type, "it has a fractional part (" + std::string(rest.substr(0, 32)) +
                             "), which " + std::string(cpp_type) +
                             " cannot hold; read it as double or std::string, or round it in "
                             "SQL (round(x) or trunc(x))");
  }
  field.fail(cpp_type, "not an integer");
}

}  // namespace

std::string type_name(Oid type) {
  for (const auto& [known, name] : type_names) {
    if (known == type) return std::string(name);
  }
  return "oid " + std::to_string(type);
}

void ParamSink::append(std::string_view bytes, Oid type, int format, bool is_null) {
  // The protocol counts a statement's parameters in 16 bits; libpq would refuse the statement
  // only when it is sent, as if the connection had failed.
  constexpr std::size_t most_parameters = 65535;
  if (types_.size() == most_parameters && !failure_) {
    failure_.emplace(make_error_code(client_errc::conversion),
                     Diagnostics{.message = "a statement takes at most 65535 parameters (the "
                                            "protocol's limit); this one was given more, and "
                                            "nothing was sent",
                                 .hint = "send the values as one array parameter ($1::int8[] with "
                                         "unnest()), or in several statements, or by COPY"});
  }
  // libpq takes each value's length as an int: a longer value would go out with a length cut
  // to its low 32 bits (negative, or a few bytes of it, without a word). Refused, and nothing
  // copied; the parameters keep their count and positions.
  if (bytes.size() > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    if (!failure_) {
      failure_.emplace(
          make_error_code(client_errc::conversion),
          Diagnostics{.message = "parameter $" + std::to_string(types_.size() + 1) + " is " +
                                 std::to_string(bytes.size()) +
                                 " bytes, more than libpq can send in one value (2147483647); "
                                 "nothing was sent",
                      .hint = "PostgreSQL keeps at most 1 GB in one field: send the data in "
                              "parts (several rows, COPY, or a large object)"});
    }
    bytes = {};
  }
  offsets_.push_back(storage_.size());
  storage_.append(bytes);
  // libpq reads text-format values up to their NUL and ignores their lengths.
  if (format == 0) storage_.push_back('\0');
  types_.push_back(type);
  lengths_.push_back(static_cast<int>(bytes.size()));
  formats_.push_back(format);
  nulls_.push_back(is_null);
}

void ParamSink::null(Oid type) {
  append({}, type, 0, true);
}

void ParamSink::text(std::string_view value, Oid type) {
  // Sent in text format, a value ends at its first NUL (libpq ignores the length), and no
  // PostgreSQL text type can hold one: refused, rather than stored cut short without a word.
  if (const auto nul = value.find('\0'); nul != std::string_view::npos) {
    if (!failure_) {
      failure_.emplace(make_error_code(client_errc::conversion),
                       Diagnostics{.message = "parameter $" + std::to_string(types_.size() + 1) +
                                              " holds a NUL byte at offset " + std::to_string(nul) +
                                              ", which no PostgreSQL text value can hold; "
                                              "nothing was sent",
                                   .hint = "strip it, or send the value as pgrt::Bytes (bytea)"});
    }
    append({}, type, 0, false);  // the parameters keep their count and positions
    return;
  }
  append(value, type, 0, false);
}

void ParamSink::check() const {
  if (failure_) throw *failure_;
}

void ParamSink::binary(std::span<const std::byte> value, Oid type) {
  append(std::string_view(reinterpret_cast<const char*>(value.data()), value.size()), type, 1,
         false);
}

std::vector<const char*> ParamSink::values() const {
  std::vector<const char*> pointers(types_.size());
  for (std::size_t i = 0; i < pointers.size(); ++i) {
    pointers[i] = nulls_[i] ? nullptr : storage_.data() + offsets_[i];
  }
  return pointers;
}

void Field::require_type(std::initializer_list<Oid> accepted, std::string_view cpp_type) const {
  for (Oid type_ok : accepted) {
    if (type_ok == type) return;
  }
  throw_conversion("column '" + std::string(column_name) + "' (index " +
                   std::to_string(column_index) + ") has PostgreSQL type " + type_name(type) +
                   ", which cannot be read as " + std::string(cpp_type));
}

void Field::fail(std::string_view cpp_type, std::string_view why) const {
  throw_conversion("column '" + std::string(column_name) + "' (index " +
                   std::to_string(column_index) + ", " + type_name(type) + ") value '" +
                   std::string(text.substr(0, 64)) +
                   (text.size() > 64 ? "...' (" + std::to_string(text.size()) + " characters)"
                                     : std::string("'")) +
                   " cannot be read as " + std::string(cpp_type) + ": " + std::string(why));
}

bool Codec<bool>::decode(const Field& field) {
  field.require_type({oid::boolean}, name);
  if (field.text == "t") return true;
  if (field.text == "f") return false;
  field.fail(name, "expected 't' or 'f'");
}

namespace detail {

std::int64_t timestamp_microseconds(std::chrono::system_clock::time_point value) {
  using namespace std::chrono;
  // Floored: the microsecond that holds the instant, before 1970 too (cut toward the epoch,
  // 1969-12-31 23:59:59.9999995 would be stored as 1970-01-01 00:00:00). But never below the
  // first whole microsecond a time_point holds, or the value could not be read back.
  constexpr auto lowest = ceil<microseconds>(system_clock::duration::min());
  return std::max(floor<microseconds>(value.time_since_epoch()), lowest).count();
}

std::int64_t decode_integer(const Field& field, std::int64_t min, std::int64_t max,
                            std::string_view cpp_type) {
  field.require_type({oid::int2, oid::int4, oid::int8, oid::numeric}, cpp_type);
  std::int64_t value = 0;
  auto [end, error] =
      std::from_chars(field.text.data(), field.text.data() + field.text.size(), value);
  if (error == std::errc::result_out_of_range) field.fail(cpp_type, "out of range");
  if (error != std::errc()) field.fail(cpp_type, "not an integer");
  check_integer_rest(field, std::string_view(end, field.text.data() + field.text.size()), cpp_type);
  if (value < min || value > max) field.fail(cpp_type, "out of range");
  return value;
}

std::uint64_t decode_unsigned(const Field& field, std::uint64_t max, std::string_view cpp_type) {
  field.require_type({oid::int2, oid::int4, oid::int8, oid::numeric}, cpp_type);
  std::uint64_t value = 0;
  if (!field.text.empty() && field.text.front() == '-') field.fail(cpp_type, "negative");
  auto [end, error] =
      std::from_chars(field.text.data(), field.text.data() + field.text.size(), value);
  if (error == std::errc::result_out_of_range) field.fail(cpp_type, "out of range");
  if (error != std::errc()) field.fail(cpp_type, "not an integer");
  check_integer_rest(field, std::string_view(end, field.text.data() + field.text.size()), cpp_type);
  if (value > max) field.fail(cpp_type, "out of range");
  return value;
}

double decode_floating(const Field& field, std::string_view cpp_type) {
  field.require_type({oid::float4, oid::float8, oid::numeric, oid::int2, oid::int4, oid::int8},
                     cpp_type);
  if (field.text == "NaN") return std::nan("");
  if (field.text == "Infinity") return HUGE_VAL;
  if (field.text == "-Infinity") return -HUGE_VAL;
  if (field.type == oid::float4) {
    // A real is a float: parsed as one (its text is the float's shortest), then widened exactly,
    // as C++ widens a float and as the server's ::float8 cast does; not the double nearest its
    // text (0.1 and not 0.100000001490116...).
    float narrow = 0;
    auto [end, error] =
        std::from_chars(field.text.data(), field.text.data() + field.text.size(), narrow);
    if (error != std::errc() || end != field.text.data() + field.text.size()) {
      field.fail(cpp_type, "not a number");
    }
    return narrow;
  }
  double value = 0;
  auto [end, error] =
      std::from_chars(field.text.data(), field.text.data() + field.text.size(), value);
  if (error == std::errc::result_out_of_range && end == field.text.data() + field.text.size()) {
    // Only a numeric can be: beyond double's largest finite value, or so close to zero that a
    // double holds only 0 (numeric's text has no exponent: a tiny one starts with 0).
    const std::string_view digits = field.text.starts_with('-') ? field.text.substr(1) : field.text;
    const bool tiny = digits.starts_with('0') || digits.find("e-") != std::string_view::npos ||
                      digits.find("E-") != std::string_view::npos;
    field.fail(cpp_type,
               tiny ? "out of range for double: not zero, but closer to zero than a double can "
                      "hold (its smallest is about 4.9e-324); read it as std::string, or round "
                      "it in SQL (round(x, 300))"
                    : "out of range for double: its magnitude is beyond double's largest finite "
                      "value (about 1.8e308); read it as std::string (or a decimal type of your "
                      "own through pgrt::Codec), or scale it down in SQL");
  }
  if (error != std::errc() || end != field.text.data() + field.text.size()) {
    field.fail(cpp_type, "not a number");
  }
  return value;
}

}  // namespace detail

Bytes Codec<Bytes>::decode(const Field& field) {
  field.require_type({oid::bytea}, name);
  auto text = field.text;
  if (text.size() < 2 || text[0] != '\\' || text[1] != 'x' || text.size() % 2 != 0) {
    field.fail(name, "expected bytea in hex output format (bytea_output = 'hex')");
  }
  auto nibble = [&](char c) -> unsigned {
    if (c >= '0' && c <= '9') return static_cast<unsigned>(c - '0');
    if (c >= 'a' && c <= 'f') return static_cast<unsigned>(c - 'a' + 10);
    if (c >= 'A' && c <= 'F') return static_cast<unsigned>(c - 'A' + 10);
    field.fail(name, "invalid hex digit");
  };
  Bytes bytes((text.size() - 2) / 2);
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<std::byte>(nibble(text[2 + 2 * i]) << 4U | nibble(text[3 + 2 * i]));
  }
  return bytes;
}

void Codec<std::chrono::system_clock::time_point>::encode(
    std::chrono::system_clock::time_point value, ParamSink& sink) {
  using namespace std::chrono;
  if (value == system_clock::time_point::max()) {
    sink.text("infinity", oid::timestamptz);
  } else if (value == system_clock::time_point::min()) {
    sink.text("-infinity", oid::timestamptz);
  } else {
    const auto micros = detail::timestamp_microseconds(value);
    sink.binary_integer(static_cast<std::int64_t>(micros - postgres_epoch_offset_us),
                        oid::timestamptz);
  }
}

// Parses the ISO output of timestamptz: "YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]".
std::chrono::system_clock::time_point Codec<std::chrono::system_clock::time_point>::decode(
    const Field& field) {
  using namespace std::chrono;
  field.require_type({oid::timestamptz}, name);
  if (field.text == "infinity") return system_clock::time_point::max();
  if (field.text == "-infinity") return system_clock::time_point::min();
  const auto text = field.text;
  const auto out_of_range = [&] {
    field.fail(name, "outside the range std::chrono::system_clock::time_point holds (" +
                         std::string(text) +
                         "); read it as std::string, or clamp it in SQL (LEAST/GREATEST)");
  };
  std::size_t at = 0;
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  auto expect = [&](char c) {
    if (at >= text.size() || text[at] != c) {
      field.fail(name, "expected ISO format (DateStyle ISO) with a time zone offset");
    }
    ++at;
  };
  // A year of five digits or more, or one BC, is far outside what a time_point holds: said as
  // such, not as a value in another format.
  const std::size_t year_digits = std::min(text.find_first_not_of("0123456789"), text.size());
  if (year_digits > 4 || (text.size() > 3 && text.substr(text.size() - 3) == " BC")) out_of_range();
  if (!read_digits(text, at, 4, year)) field.fail(name, "bad year");
  expect('-');
  if (!read_digits(text, at, 2, month)) field.fail(name, "bad month");
  expect('-');
  if (!read_digits(text, at, 2, day)) field.fail(name, "bad day");
  expect(' ');
  if (!read_digits(text, at, 2, hour)) field.fail(name, "bad hour");
  expect(':');
  if (!read_digits(text, at, 2, minute)) field.fail(name, "bad minute");
  expect(':');
  if (!read_digits(text, at, 2, second)) field.fail(name, "bad second");
  std::int64_t micros = 0;
  if (at < text.size() && text[at] == '.') {
    ++at;
    int digits = 0;
    while (at < text.size() && text[at] >= '0' && text[at] <= '9') {
      if (digits < 6) {
        micros = micros * 10 + (text[at] - '0');
        ++digits;
      }
      ++at;
    }
    for (; digits < 6; ++digits) micros *= 10;
  }
  if (at >= text.size() || (text[at] != '+' && text[at] != '-')) field.fail(name, "no offset");
  const int sign = text[at] == '-' ? -1 : 1;
  ++at;
  int offset_hours = 0, offset_minutes = 0, offset_seconds = 0;
  if (!read_digits(text, at, 2, offset_hours)) field.fail(name, "bad offset");
  if (at < text.size() && text[at] == ':') {
    ++at;
    if (!read_digits(text, at, 2, offset_minutes)) field.fail(name, "bad offset");
    if (at < text.size() && text[at] == ':') {
      ++at;
      if (!read_digits(text, at, 2, offset_seconds)) field.fail(name, "bad offset");
    }
  }
  if (at != text.size()) field.fail(name, "trailing characters");
  const std::int64_t days =
      days_from_civil(year, static_cast<unsigned>(month), static_cast<unsigned>(day));
  const std::int64_t local_seconds = days * 86400 + hour * 3600 + minute * 60 + second;
  const std::int64_t offset = sign * (offset_hours * 3600 + offset_minutes * 60 + offset_seconds);
  const std::int64_t utc_micros = (local_seconds - offset) * 1'000'000 + micros;
  // system_clock counts in finer units than microseconds (nanoseconds with libstdc++: about
  // 1677-09-21 to 2262-04-11), so a PostgreSQL timestamptz can lie outside what it holds.
  constexpr auto per_micro = duration_cast<system_clock::duration>(microseconds(1)).count();
  constexpr std::int64_t largest = system_clock::duration::max().count() / per_micro;
  constexpr std::int64_t smallest = system_clock::duration::min().count() / per_micro;
  if (utc_micros > largest || utc_micros < smallest) out_of_range();
  return system_clock::time_point(duration_cast<system_clock::duration>(microseconds(utc_micros)));
}

}  // namespace pgrt
