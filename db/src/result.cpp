#include "pgrt/db/result.hpp"

#include <charconv>
#include <libpq-fe.h>
#include <string>
#include <utility>

namespace pgrt {

namespace detail {

void throw_unexpected_null(const Column& column, std::string_view cpp_type) {
  throw Error(make_error_code(client_errc::unexpected_null),
              Diagnostics{.message = "column '" + std::string(column.name) + "' (index " +
                                     std::to_string(column.index) + ", " + type_name(column.type) +
                                     ") is NULL, which " + std::string(cpp_type) +
                                     " cannot hold; read it as std::optional<" +
                                     std::string(cpp_type) + ">"});
}

void throw_no_such_column(std::string_view name) {
  throw Error(make_error_code(client_errc::conversion),
              Diagnostics{.message = "the result has no column named '" + std::string(name) + "'"});
}

void throw_column_out_of_range(std::size_t index, std::size_t columns) {
  throw Error(make_error_code(client_errc::conversion),
              Diagnostics{.message = "column index " + std::to_string(index) +
                                     " is out of range: the result has " + std::to_string(columns) +
                                     " columns"});
}

}  // namespace detail

Result::Result() noexcept = default;

Result::Result(pg_result* result) noexcept : result_(result) {}

Result::~Result() {
  PQclear(result_);
}

Result::Result(Result&& other) noexcept : result_(std::exchange(other.result_, nullptr)) {}

Result& Result::operator=(Result&& other) noexcept {
  if (this != &other) {
    PQclear(result_);
    result_ = std::exchange(other.result_, nullptr);
  }
  return *this;
}

std::size_t Result::size() const noexcept {
  return result_ == nullptr ? 0 : static_cast<std::size_t>(PQntuples(result_));
}

Row Result::operator[](std::size_t index) const& {
  if (index >= size()) {
    throw Error(make_error_code(client_errc::conversion),
                Diagnostics{.message = "row " + std::to_string(index) +
                                       " is out of range: the result has " +
                                       std::to_string(size()) + " rows"});
  }
  return Row(this, static_cast<int>(index));
}

std::size_t Result::columns() const noexcept {
  return result_ == nullptr ? 0 : static_cast<std::size_t>(PQnfields(result_));
}

Column Result::column(std::size_t index) const {
  if (index >= columns()) detail::throw_column_out_of_range(index, columns());
  const int i = static_cast<int>(index);
  return Column{.name = PQfname(result_, i), .type = PQftype(result_, i), .index = index};
}

std::size_t Result::column_index(std::string_view name) const {
  for (std::size_t i = 0; i < columns(); ++i) {
    if (name == PQfname(result_, static_cast<int>(i))) return i;
  }
  detail::throw_no_such_column(name);
}

std::uint64_t Result::affected_rows() const noexcept {
  if (result_ == nullptr) return 0;
  std::string_view tuples = PQcmdTuples(result_);
  std::uint64_t count = 0;
  std::from_chars(tuples.data(), tuples.data() + tuples.size(), count);
  return count;
}

std::string_view Result::command_tag() const noexcept {
  return result_ == nullptr ? std::string_view() : PQcmdStatus(result_);
}

bool Row::is_null(std::size_t index) const {
  const Column meta = column(index);
  return PQgetisnull(result_->native_handle(), row_, static_cast<int>(meta.index)) != 0;
}

std::string_view Row::text(std::size_t index) const {
  const Column meta = column(index);
  const int i = static_cast<int>(meta.index);
  auto* native = result_->native_handle();
  return {PQgetvalue(native, row_, i), static_cast<std::size_t>(PQgetlength(native, row_, i))};
}

std::size_t Row::size() const noexcept {
  return result_->columns();
}

Column Row::column(std::size_t index) const {
  return result_->column(index);
}

std::size_t Row::column_index(std::string_view name) const {
  return result_->column_index(name);
}

Field Row::field(const Column& column) const {
  const int i = static_cast<int>(column.index);
  auto* native = result_->native_handle();
  return Field{
      .text = {PQgetvalue(native, row_, i), static_cast<std::size_t>(PQgetlength(native, row_, i))},
      .type = column.type,
      .column_name = column.name,
      .column_index = column.index};
}

}  // namespace pgrt
