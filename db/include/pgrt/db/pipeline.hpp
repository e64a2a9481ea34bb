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
/// transaction, each segment is committed on its own (an implicit transaction); a segment that
/// fails as it commits (a deferred constraint, a serialization failure) took no effect, and each
/// of its statements' outcomes has the commit's error.
///
/// Prepared statements: by default each statement runs as a named prepared statement from the
/// connection's statement cache (the one Connection::query_prepared() uses, per SQL text and
/// parameter types, ConnectOptions::statement_cache_size), so the server parses and plans it once
/// per connection. Statements the cache lacks are prepared first, in one extra round trip, only
/// outside a transaction block (inside one they run unnamed this time, so that a statement that
/// fails to prepare cannot abort your transaction early). A statement whose preparation fails runs
/// unnamed and reports its own error in its place. Behind a transaction pooler
/// (ConnectOptions::pooler), or a pooler noticed at connect (Pooler::none), every statement runs
/// unnamed, and the segments are sent one at a time (PgBouncer before 1.21 can mix up server
/// sessions under pipelined segments). Answers that do not match the statements sent (a pooler's
/// mix-up) fail the run with connection_lost and close the connection. prepare_statements(false)
/// runs this pipeline's statements unnamed (parsed by the server every time): for one-off SQL
/// that would only churn the cache.
///
/// Not thread-safe; a Pipeline may be run many times, on any connection.
class Pipeline {
 public:
  struct Statement {
    std::string sql;
    ParamSink params;
    bool sync_after = false;
  };

  /// Appends a statement with its parameters. Throws Error(client_errc::conversion), adding
  /// nothing, if a parameter cannot be encoded (ParamSink::text()) or the SQL text holds a NUL
  /// byte (the server would run only the text before it).
  template <Encodable... Args>
  Pipeline& add(std::string_view sql, const Args&... args) {
    ParamSink params;
    encode_params(params, args...);
    return add_encoded(sql, std::move(params));
  }
  /// Ends the current segment after the last added statement.
  Pipeline& sync() {
    if (!statements_.empty()) statements_.back().sync_after = true;
    return *this;
  }

  /// Whether run() uses the connection's prepared statements (default true; see the class).
  Pipeline& prepare_statements(bool prepared) noexcept {
    prepared_ = prepared;
    return *this;
  }
  [[nodiscard]] bool prepares_statements() const noexcept { return prepared_; }

  [[nodiscard]] std::size_t size() const noexcept { return statements_.size(); }
  [[nodiscard]] const std::vector<Statement>& statements() const noexcept { return statements_; }

 private:
  friend class Connection;  // (reads holds_copy_)

  Pipeline& add_encoded(std::string_view sql, ParamSink params);

  std::vector<Statement> statements_;
  bool prepared_ = true;
  bool holds_copy_ = false;  // a statement is a COPY, which run() refuses
};

}  // namespace pgrt
