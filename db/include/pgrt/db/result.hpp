#pragma once

/// @file
/// Query results: rows, typed field access, column metadata, affected row counts.
///
/// Memory: a Result owns libpq's PGresult, which holds the whole result as received, once; rows and
/// string_view fields point into it (nothing is copied until get<T>() converts a value). A result
/// of R rows and C columns costs about R * (8 + 16 * C) bytes plus the text of the values: a
/// 1,000,000-row single int8 column result takes about 24 MB of heap (measured by the tests). For
/// results that must not be held in memory at once, use Connection::stream(), which holds one row
/// at a time.

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>

#include "pgrt/db/error.hpp"
#include "pgrt/db/types.hpp"

struct pg_result;

namespace pgrt {

class Result;

/// Describes one result column.
struct Column {
  std::string_view name;
  Oid type = oid::unspecified;
  std::size_t index = 0;
};

namespace detail {
template <typename T>
struct is_optional : std::false_type {};
template <typename T>
struct is_optional<std::optional<T>> : std::true_type {};
[[noreturn]] void throw_unexpected_null(const Column& column, std::string_view cpp_type);
[[noreturn]] void throw_no_such_column(std::string_view name);
[[noreturn]] void throw_column_out_of_range(std::size_t index, std::size_t columns);
}  // namespace detail

/// One row of a Result. A cheap view: valid while its Result lives.
class Row {
 public:
  /// The value of column `index` as T. T may be std::optional<U> for a nullable column.
  /// Throws pgrt::Error: client_errc::unexpected_null when the value is NULL and T is not an
  /// optional; client_errc::conversion when the column's type cannot be read as T (the message
  /// names the column, its PostgreSQL type and T); client_errc::conversion for a bad index.
  template <typename T>
  [[nodiscard]] T get(std::size_t index) const {
    const Column meta = column(index);
    if constexpr (detail::is_optional<T>::value) {
      using Inner = typename T::value_type;
      if (is_null(index)) return std::nullopt;
      return Codec<Inner>::decode(field(meta));
    } else {
      static_assert(Decodable<T>, "pgrt::Codec<T> has no decode(); specialize it to read T");
      if (is_null(index)) detail::throw_unexpected_null(meta, Codec<T>::name);
      return Codec<T>::decode(field(meta));
    }
  }
  /// The value of the column named exactly `name` (case-sensitive; the first if several).
  template <typename T>
  [[nodiscard]] T get(std::string_view name) const {
    return get<T>(column_index(name));
  }

  [[nodiscard]] bool is_null(std::size_t index) const;
  /// The value as the server sent it (text format); empty for NULL.
  [[nodiscard]] std::string_view text(std::size_t index) const;
  [[nodiscard]] std::size_t size() const noexcept;
  [[nodiscard]] Column column(std::size_t index) const;
  [[nodiscard]] std::size_t column_index(std::string_view name) const;

 private:
  friend class Result;
  Row(const Result* result, int row) noexcept : result_(result), row_(row) {}
  [[nodiscard]] Field field(const Column& column) const;

  const Result* result_;
  int row_;
};

/// The rows a statement returned, or the outcome of one that returns none. Move-only.
///
/// Thread safety: a Result may be read from any thread, by several threads at once; it is not tied
/// to its connection.
class Result {
 public:
  Result() noexcept;
  ~Result();
  Result(Result&& other) noexcept;
  Result& operator=(Result&& other) noexcept;
  Result(const Result&) = delete;
  Result& operator=(const Result&) = delete;

  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;  // rows are made on the fly
    using value_type = Row;
    using difference_type = std::ptrdiff_t;
    using pointer = void;
    using reference = Row;

    iterator() = default;
    Row operator*() const noexcept { return Row(result_, row_); }
    iterator& operator++() noexcept {
      ++row_;
      return *this;
    }
    iterator operator++(int) noexcept {
      auto copy = *this;
      ++row_;
      return copy;
    }
    bool operator==(const iterator&) const noexcept = default;

   private:
    friend class Result;
    iterator(const Result* result, int row) noexcept : result_(result), row_(row) {}
    const Result* result_ = nullptr;
    int row_ = 0;
  };

  [[nodiscard]] iterator begin() const noexcept { return {this, 0}; }
  [[nodiscard]] iterator end() const noexcept { return {this, static_cast<int>(size())}; }
  [[nodiscard]] std::size_t size() const noexcept;
  [[nodiscard]] bool empty() const noexcept { return size() == 0; }
  /// Row `index`; throws pgrt::Error(client_errc::conversion) when out of range.
  [[nodiscard]] Row operator[](std::size_t index) const&;
  /// A Row of a temporary Result would dangle: name the Result first
  /// (`auto rows = co_await conn.query(...); rows[0]...`).
  Row operator[](std::size_t index) const&& = delete;

  [[nodiscard]] std::size_t columns() const noexcept;
  [[nodiscard]] Column column(std::size_t index) const;
  /// The index of the column named exactly `name`; throws pgrt::Error if there is none.
  [[nodiscard]] std::size_t column_index(std::string_view name) const;

  /// Rows inserted, updated, deleted, copied, fetched... as the command tag says; 0 when none.
  [[nodiscard]] std::uint64_t affected_rows() const noexcept;
  /// The command tag, e.g. "INSERT 0 3", "SELECT 10".
  [[nodiscard]] std::string_view command_tag() const noexcept;

  /// The single value of a one-row result: (*this)[0].get<T>(0).
  template <typename T>
  [[nodiscard]] T scalar() const& {
    return (*this)[0].template get<T>(0);
  }
  /// scalar() of a temporary Result: fine for values that own their data, not for views.
  template <typename T>
  [[nodiscard]] T scalar() const&& {
    static_assert(
        !std::is_same_v<T, std::string_view> && !std::is_same_v<T, std::optional<std::string_view>>,
        "a string_view into a temporary Result would dangle; name the Result first");
    const Result& self = *this;
    return self[0].template get<T>(0);
  }

  /// Takes ownership of a PGresult (for the connection).
  explicit Result(pg_result* result) noexcept;
  [[nodiscard]] pg_result* native_handle() const noexcept { return result_; }

 private:
  pg_result* result_ = nullptr;
};

}  // namespace pgrt
