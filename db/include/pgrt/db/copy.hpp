#pragma once

/// @file
/// Building COPY FROM STDIN input in PostgreSQL's text format, for Connection::copy_from().

#include <chrono>
#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "pgrt/db/types.hpp"

namespace pgrt {

/// Appends one field of COPY text format to `out` (escaped; NULL as \N). Overloads cover the
/// built-in types of pgrt/db/types.hpp.
void append_copy_field(std::string& out, std::string_view value);
void append_copy_field(std::string& out, bool value);
void append_copy_field(std::string& out, std::int64_t value);
void append_copy_field(std::string& out, std::uint64_t value);
void append_copy_field(std::string& out, double value);
void append_copy_field(std::string& out, std::span<const std::byte> value);
/// A time_point as its UTC timestamptz text ("2024-01-01 12:00:00.000000+00"). In a timestamp
/// (without time zone) column that is its UTC wall time, where a parameter stores the wall time
/// of the session's TimeZone (docs/usage.md, "Types").
void append_copy_field(std::string& out, std::chrono::system_clock::time_point value);
/// A null `const char*` is NULL (\N), as it is as a parameter.
inline void append_copy_field(std::string& out, const char* value) {
  if (value == nullptr) {
    out += "\\N";
  } else {
    append_copy_field(out, std::string_view(value));
  }
}
/// A character is no field: as a number it would store its code ('x' as 120), and it has no
/// Codec either. Pass a string (std::string(1, c)) or an integer.
void append_copy_field(std::string& out, char value) = delete;
void append_copy_field(std::string& out, wchar_t value) = delete;
void append_copy_field(std::string& out, char8_t value) = delete;
void append_copy_field(std::string& out, char16_t value) = delete;
void append_copy_field(std::string& out, char32_t value) = delete;
inline void append_copy_field(std::string& out, const std::string& value) {
  append_copy_field(out, std::string_view(value));
}
inline void append_copy_field(std::string& out, const Bytes& value) {
  append_copy_field(out, std::span<const std::byte>(value));
}
template <std::integral Int>
requires(!std::same_as<Int, bool> &&
         !detail::is_character<Int>) void append_copy_field(std::string& out, Int value) {
  if constexpr (std::is_signed_v<Int>) {
    append_copy_field(out, static_cast<std::int64_t>(value));
  } else {
    append_copy_field(out, static_cast<std::uint64_t>(value));
  }
}
/// A float is written as the shortest text that reads back as the same float, as PostgreSQL's
/// own float4 output writes it (0.1F as 0.1, not as the double it widens to, 0.10000000149011612):
/// in a real, numeric or text column it stores what it stores as a parameter. In a double
/// precision column that text is read as the double nearest it (0.1), while a float parameter is
/// widened by the server (0.10000000149011612): pass static_cast<double>(value) to store that.
void append_copy_field(std::string& out, float value);
template <typename T>
void append_copy_field(std::string& out, const std::optional<T>& value) {
  if (value) {
    append_copy_field(out, *value);
  } else {
    out += "\\N";
  }
}

/// Appends one row (tab-separated fields, newline-terminated) to `out`:
///
///     std::string data;
///     pgrt::copy_text_row(data, 1, "alice", std::optional<double>{});
///     co_await conn.copy_from("COPY users (id, name, score) FROM STDIN", data);
template <typename... Fields>
void copy_text_row(std::string& out, const Fields&... fields) {
  bool first = true;
  ((out += first ? "" : "\t", first = false, append_copy_field(out, fields)), ...);
  out += '\n';
}

}  // namespace pgrt
