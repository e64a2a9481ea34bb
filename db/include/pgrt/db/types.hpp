#pragma once

/// @file
/// Conversions between C++ values and PostgreSQL parameters and result fields, and the one
/// customization point for user types: specialize pgrt::Codec<T>.
///
/// Built in: bool, the integer types, float, double, std::string, std::string_view, const char*,
/// pgrt::Bytes and std::span<const std::byte> (bytea), std::optional<T> (NULL), and
/// std::chrono::system_clock::time_point (timestamptz).
///
/// Wire formats: numbers, bool, bytea and timestamptz parameters travel in binary (no text
/// formatting, no escaping, bytea not hex-doubled); strings travel as text with an unspecified
/// type, so the server types them from context (a string can fill a date, numeric or json
/// parameter). Results arrive as text and are parsed on get<T>().

#include <bit>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "pgrt/db/error.hpp"

namespace pgrt {

/// A PostgreSQL type OID.
using Oid = unsigned int;

/// The OIDs of the built-in types pgrt converts.
namespace oid {
inline constexpr Oid unspecified = 0;  ///< Let the server infer the type from context.
inline constexpr Oid boolean = 16;
inline constexpr Oid bytea = 17;
inline constexpr Oid int8 = 20;
inline constexpr Oid int2 = 21;
inline constexpr Oid int4 = 23;
inline constexpr Oid text = 25;
inline constexpr Oid json = 114;
inline constexpr Oid float4 = 700;
inline constexpr Oid float8 = 701;
inline constexpr Oid bpchar = 1042;
inline constexpr Oid varchar = 1043;
inline constexpr Oid date = 1082;
inline constexpr Oid timestamp = 1114;
inline constexpr Oid timestamptz = 1184;
inline constexpr Oid numeric = 1700;
inline constexpr Oid uuid = 2950;
inline constexpr Oid jsonb = 3802;
}  // namespace oid

/// The name of a built-in type ("int4", "timestamptz"), or "oid <n>" for others.
[[nodiscard]] std::string type_name(Oid type);

/// Bytes for bytea parameters and results.
using Bytes = std::vector<std::byte>;

/// Collects the encoded parameters of one statement. Codec<T>::encode() appends exactly one
/// parameter through one of its functions.
class ParamSink {
 public:
  /// A NULL parameter.
  void null(Oid type = oid::unspecified);
  /// A parameter in text format; `type` unspecified lets the server infer it. A `value` holding a
  /// NUL byte is refused (libpq would send it cut short at the NUL, and no PostgreSQL text value
  /// can hold one; send binary data as Bytes): the sink is then failed() and check() throws
  /// Error(client_errc::conversion), which the statement's co_await does, sending nothing.
  void text(std::string_view value, Oid type = oid::unspecified);
  /// Whether a value could not be encoded (see text()), one was longer than the 2147483647 bytes
  /// libpq can send (its lengths are ints), or more than 65535 parameters (the protocol's limit)
  /// were appended.
  [[nodiscard]] bool failed() const noexcept { return failure_.has_value(); }
  /// Throws the first encoding failure, if any: client_errc::conversion, saying which parameter.
  void check() const;
  /// A parameter in PostgreSQL's binary format for `type`.
  void binary(std::span<const std::byte> value, Oid type);
  /// A big-endian integer in binary format, as int2, int4 and int8 are sent.
  template <std::integral Int>
  void binary_integer(Int value, Oid type) {
    std::byte bytes[sizeof(Int)];
    auto bits = static_cast<std::make_unsigned_t<Int>>(value);
    for (std::size_t i = 0; i < sizeof(Int); ++i) {
      bytes[sizeof(Int) - 1 - i] = static_cast<std::byte>(bits & 0xFFU);
      bits = static_cast<std::make_unsigned_t<Int>>(bits >> 8U);
    }
    binary(bytes, type);
  }

  [[nodiscard]] std::size_t size() const noexcept { return types_.size(); }
  // For the connection: parallel arrays as libpq's PQsendQueryParams takes them. Valid until the
  // next append.
  [[nodiscard]] const Oid* types() const noexcept { return types_.data(); }
  [[nodiscard]] std::vector<const char*> values() const;
  [[nodiscard]] const int* lengths() const noexcept { return lengths_.data(); }
  [[nodiscard]] const int* formats() const noexcept { return formats_.data(); }

 private:
  void append(std::string_view bytes, Oid type, int format, bool is_null);

  std::optional<Error> failure_;  // the first value that could not be encoded
  std::string storage_;
  std::vector<Oid> types_;
  std::vector<std::size_t> offsets_;
  std::vector<int> lengths_;
  std::vector<int> formats_;
  std::vector<bool> nulls_;
};

/// One non-NULL field of a result row, as handed to Codec<T>::decode(): the text the server sent,
/// its type, and where it came from (for error messages).
struct Field {
  std::string_view text;
  Oid type = oid::unspecified;
  std::string_view column_name;
  std::size_t column_index = 0;

  /// Throws pgrt::Error(client_errc::conversion) naming the column, its PostgreSQL type and
  /// `cpp_type` unless the column's type is one of `accepted`.
  void require_type(std::initializer_list<Oid> accepted, std::string_view cpp_type) const;
  /// Throws pgrt::Error(client_errc::conversion) for a value that does not parse as `cpp_type`.
  [[noreturn]] void fail(std::string_view cpp_type, std::string_view why) const;
};

/// The customization point. Specialize it for a user type T with
///
///     static void encode(const T& value, pgrt::ParamSink& sink);  // append exactly one parameter
///     static T decode(const pgrt::Field& field);                  // a non-NULL field
///     static constexpr std::string_view name = "T";               // for error messages
///
/// Either half may be left out for types only written or only read. NULL handling is pgrt's:
/// std::optional<T> works for every T with a Codec.
template <typename T>
struct Codec;

/// A type that can be bound as a query parameter.
template <typename T>
concept Encodable = requires(const T& value, ParamSink& sink) {
  Codec<std::remove_cvref_t<T>>::encode(value, sink);
};

/// A type that a result field can be read as.
template <typename T>
concept Decodable = requires(const Field& field) {
  { Codec<T>::decode(field) } -> std::convertible_to<T>;
  { Codec<T>::name } -> std::convertible_to<std::string_view>;
};

// Built-in codecs. The definitions of decode() are in the library.

template <>
struct Codec<bool> {
  static constexpr std::string_view name = "bool";
  static void encode(bool value, ParamSink& sink) {
    const std::byte byte{static_cast<unsigned char>(value ? 1 : 0)};
    sink.binary(std::span(&byte, 1), oid::boolean);
  }
  static bool decode(const Field& field);
};

namespace detail {
// The character types: none is a number to PostgreSQL ('x' sent as int4 would be 120).
template <typename T>
inline constexpr bool is_character =
    std::same_as<T, char> || std::same_as<T, wchar_t> || std::same_as<T, char8_t> ||
    std::same_as<T, char16_t> || std::same_as<T, char32_t>;
// An integer column, or a numeric with no fraction or a fraction of zeros ("5.00"), in range.
std::int64_t decode_integer(const Field& field, std::int64_t min, std::int64_t max,
                            std::string_view cpp_type);
// A timestamptz's microseconds since 1970, as parameters and COPY send them.
std::int64_t timestamp_microseconds(std::chrono::system_clock::time_point value);
std::uint64_t decode_unsigned(const Field& field, std::uint64_t max, std::string_view cpp_type);
double decode_floating(const Field& field, std::string_view cpp_type);
constexpr std::string_view integer_name(std::size_t size, bool is_signed) {
  switch (size) {
    case 1:
      return is_signed ? "std::int8_t" : "std::uint8_t";
    case 2:
      return is_signed ? "std::int16_t" : "std::uint16_t";
    case 4:
      return is_signed ? "std::int32_t" : "std::uint32_t";
    default:
      return is_signed ? "std::int64_t" : "std::uint64_t";
  }
}
}  // namespace detail

template <std::integral Int>
requires(!std::same_as<Int, bool> && !detail::is_character<Int>) struct Codec<Int> {
  static constexpr std::string_view name = detail::integer_name(sizeof(Int), std::is_signed_v<Int>);
  static void encode(Int value, ParamSink& sink) {
    if constexpr (std::is_signed_v<Int> && sizeof(Int) <= 2) {
      sink.binary_integer(static_cast<std::int16_t>(value), oid::int2);
    } else if constexpr (std::is_signed_v<Int> && sizeof(Int) == 4) {
      sink.binary_integer(static_cast<std::int32_t>(value), oid::int4);
    } else if constexpr (std::is_signed_v<Int>) {
      sink.binary_integer(static_cast<std::int64_t>(value), oid::int8);
    } else if constexpr (sizeof(Int) <= 2) {
      sink.binary_integer(static_cast<std::int32_t>(value), oid::int4);
    } else if constexpr (sizeof(Int) == 4) {
      sink.binary_integer(static_cast<std::int64_t>(value), oid::int8);
    } else {
      sink.text(std::to_string(value), oid::numeric);  // beyond int8's range
    }
  }
  static Int decode(const Field& field) {
    if constexpr (std::is_signed_v<Int>) {
      return static_cast<Int>(detail::decode_integer(field, std::numeric_limits<Int>::min(),
                                                     std::numeric_limits<Int>::max(), name));
    } else {
      return static_cast<Int>(
          detail::decode_unsigned(field, std::numeric_limits<Int>::max(), name));
    }
  }
};

template <std::floating_point Float>
requires(sizeof(Float) <= 8) struct Codec<Float> {
  static constexpr std::string_view name = sizeof(Float) == 4 ? "float" : "double";
  static void encode(Float value, ParamSink& sink) {
    if constexpr (sizeof(Float) == 4) {
      sink.binary_integer(std::bit_cast<std::uint32_t>(value), oid::float4);
    } else {
      sink.binary_integer(std::bit_cast<std::uint64_t>(value), oid::float8);
    }
  }
  /// A float8 value beyond float's largest finite value (about 3.4e38) is an error, not a
  /// silent infinity: read it as double. A float4 (real) read as double is its float widened
  /// exactly, as C++ widens a float and as the server's ::float8 cast does (0.1::real reads as
  /// 0.100000001490116..., the double of 0.1F), not the double nearest its text.
  static Float decode(const Field& field) {
    const double value = detail::decode_floating(field, name);
    if constexpr (sizeof(Float) == 4) {
      constexpr double largest = std::numeric_limits<float>::max();
      constexpr double infinity = std::numeric_limits<double>::infinity();
      if ((value > largest && value != infinity) || (value < -largest && value != -infinity)) {
        field.fail(name, "out of range for float");
      }
    }
    return static_cast<Float>(value);
  }
};

template <>
struct Codec<std::string> {
  static constexpr std::string_view name = "std::string";
  static void encode(const std::string& value, ParamSink& sink) { sink.text(value); }
  /// Any column reads as its text representation.
  static std::string decode(const Field& field) { return std::string(field.text); }
};

template <>
struct Codec<std::string_view> {
  static constexpr std::string_view name = "std::string_view";
  static void encode(std::string_view value, ParamSink& sink) { sink.text(value); }
  /// A view into the Result: valid while the Result lives.
  static std::string_view decode(const Field& field) { return field.text; }
};

template <>
struct Codec<const char*> {
  static constexpr std::string_view name = "const char*";
  static void encode(const char* value, ParamSink& sink) {
    if (value == nullptr) {
      sink.null();
    } else {
      sink.text(value);
    }
  }
};

template <std::size_t N>
struct Codec<char[N]> {
  static void encode(const char (&value)[N], ParamSink& sink) { sink.text(value); }
};

template <>
struct Codec<Bytes> {
  static constexpr std::string_view name = "pgrt::Bytes";
  static void encode(const Bytes& value, ParamSink& sink) { sink.binary(value, oid::bytea); }
  static Bytes decode(const Field& field);
};

template <>
struct Codec<std::span<const std::byte>> {
  static void encode(std::span<const std::byte> value, ParamSink& sink) {
    sink.binary(value, oid::bytea);
  }
};

/// timestamptz, with microsecond precision (a finer time_point is sent as the microsecond that
/// holds it, before 1970 too, as in COPY). A value outside what system_clock::time_point holds
/// (libstdc++: nanoseconds, about 1677-09-21 to 2262-04-11) is an error (client_errc::conversion);
/// 'infinity' and '-infinity' read as time_point::max() and time_point::min(). In a timestamp
/// (without time zone) column, the server stores a parameter's wall time in the session's
/// TimeZone, while COPY (append_copy_field()) stores its UTC wall time: they agree when TimeZone
/// is UTC, or with `$1 AT TIME ZONE 'UTC'` (docs/usage.md, "Types").
template <>
struct Codec<std::chrono::system_clock::time_point> {
  static constexpr std::string_view name = "std::chrono::system_clock::time_point";
  static void encode(std::chrono::system_clock::time_point value, ParamSink& sink);
  static std::chrono::system_clock::time_point decode(const Field& field);
};

template <typename T>
struct Codec<std::optional<T>> {
  static void encode(const std::optional<T>& value, ParamSink& sink) {
    if (value) {
      Codec<std::remove_cvref_t<T>>::encode(*value, sink);
    } else {
      sink.null();
    }
  }
};

/// Encodes each argument as one parameter, $1 first.
template <Encodable... Args>
void encode_params(ParamSink& sink, const Args&... args) {
  (Codec<std::remove_cvref_t<Args>>::encode(args, sink), ...);
}

}  // namespace pgrt
