#pragma once

/// @file
/// A batch of statements sent in one round trip (libpq pipeline mode, libpq 14+).

#include <boost/system/error_code.hpp>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "pgrt/db/error.hpp"
#include "pgrt/db/result.hpp"
#include "pgrt/db/types.hpp"

namespace pgrt {

/// The outcome of one pipelined statement.
struct PipelineOutcome {
  /// Empty on success; a SQLSTATE code when the statement failed; client_errc::pipeline_aborted
  /// when an earlier statement of the same sync segment failed and the server skipped this one.
  boost::system::error_code error;
  Diagnostics diagnostics;
  Result result;

  [[nodiscard]] bool ok() const noexcept { return !error; }
};

/// Statements to run together. Segments: the server runs each sync segment as a unit; when a
/// statement fails, the rest of its segment is skipped (reported as pipeline_aborted) and the next
/// segment runs. Without sync() calls the whole pipeline is one segment. Outside an explicit
/// transaction, each segment is committed on its own (an implicit transaction).
class Pipeline {
 public:
  struct Statement {
    std::string sql;
    ParamSink params;
    bool sync_after = false;
  };

  /// Appends a statement with its parameters.
  template <Encodable... Args>
  Pipeline& add(std::string_view sql, const Args&... args) {
    Statement& statement = statements_.emplace_back(Statement{std::string(sql), {}, false});
    encode_params(statement.params, args...);
    return *this;
  }
  /// Ends the current segment after the last added statement.
  Pipeline& sync() {
    if (!statements_.empty()) statements_.back().sync_after = true;
    return *this;
  }

  [[nodiscard]] std::size_t size() const noexcept { return statements_.size(); }
  [[nodiscard]] const std::vector<Statement>& statements() const noexcept { return statements_; }

 private:
  std::vector<Statement> statements_;
};

}  // namespace pgrt
