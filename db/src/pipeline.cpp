// Connection::run(): a Pipeline's statements in libpq's pipeline mode, prepared from the
// connection's statement cache (connection/statement_cache.cpp) unless the pipeline says not to.
#include "pgrt/db/pipeline.hpp"

#include <algorithm>
#include <numeric>
#include <optional>
#include <tuple>
#include <unordered_set>

#include "connection/commit_rolled_back.hpp"
#include "connection/impl.hpp"
#include "connection/stale_plan.hpp"
#include "timing_clock.hpp"

namespace pgrt {

Pipeline& Pipeline::add_encoded(std::string_view sql, ParamSink params) {
  params.check();
  check_statement_text(sql);
  statements_.push_back(Statement{std::string(sql), std::move(params), false});
  // (Found here once, not at each run: a pipeline is often run many times.)
  holds_copy_ = holds_copy_ || first_keyword(sql) == "copy";
  return *this;
}

namespace {

using Impl = Connection::Impl;

bool ends_segment(const Pipeline& pipeline, std::size_t index) {
  return pipeline.statements()[index].sync_after || index + 1 == pipeline.size();
}

// Transaction control (and procedures and DO blocks, which may commit): a segment that holds it
// may have committed part of its work before a later statement failed, so a pipeline with it is
// never run again in part.
bool controls_transactions(std::string_view sql) {
  const std::string keyword = first_keyword(sql);
  for (const char* control : {"begin", "start", "commit", "end", "rollback", "abort", "savepoint",
                              "release", "prepare", "call", "do"}) {
    if (keyword == control) return true;
  }
  return false;
}

// The next result of a pipeline in `raw` (libpq's null between two statements' results is
// skipped). A result libpq holds already (most of a pipeline's come several to a read) is taken at
// once, and the wait for the socket is awaited in place (`asio::deferred`, as exchange() does):
// no coroutine frame of its own, so this is a macro-like loop in each caller's frame.
// `cancellation` is the caller's asio::this_coro::cancellation_state.
#define PGRT_NEXT_PIPELINE_RESULT(impl, raw, current, cancellation)                               \
  for (;;) {                                                                                      \
    (raw) = nullptr;                                                                              \
    if (PQisBusy((impl).conn) != 0) {                                                             \
      if (!(impl).tls_holds_bytes()) {                                                            \
        error_code wait_error = asio::error::operation_aborted;                                   \
        if (!cancellation_requested(cancellation)) {                                              \
          std::tie(wait_error) =                                                                  \
              co_await (impl).socket.async_wait(asio::socket_base::wait_read, no_throw_in_frame); \
        }                                                                                         \
        if (wait_error) co_return co_await (impl).interrupted(wait_error, (current), false);      \
      }                                                                                           \
      if (PQconsumeInput((impl).conn) == 0) co_return (impl).lost(current);                       \
      continue;                                                                                   \
    }                                                                                             \
    (raw) = PQgetResult((impl).conn);                                                             \
    if ((raw) != nullptr) break;                                                                  \
    if (PQstatus((impl).conn) != CONNECTION_OK) co_return (impl).lost(current);                   \
  }

// Statements (indices in the pipeline) that run unnamed this time whatever the cache holds.
using RunUnnamed = std::unordered_set<std::size_t>;

// Looks up each statement of `order` in the connection's statement cache (a hit becomes the most
// recently used): names[k] is order[k]'s name, or null. True when one was missing (those in
// `unnamed` are not looked up).
bool look_up_names(Impl& impl, const Pipeline& pipeline, const std::vector<std::size_t>& order,
                   const RunUnnamed& unnamed, std::vector<const std::string*>& names) {
  names.assign(order.size(), nullptr);
  bool missing = false;
  for (std::size_t k = 0; k < order.size(); ++k) {
    if (unnamed.count(order[k]) != 0) continue;
    const Pipeline::Statement& statement = pipeline.statements()[order[k]];
    names[k] = impl.cached_statement(statement.sql, statement.params);
    missing = missing || names[k] == nullptr;
  }
  return missing;
}

// Prepares the statements of `order` that the connection's statement cache lacks, in one round
// trip, each in a sync segment of its own (one that fails to prepare stops no other), as many as
// the cache has room for beside this pipeline's statements it holds already. A statement that
// fails to prepare stays uncached: run_statements() sends it unnamed, and its error comes in its
// own place. Those in `unnamed` are not prepared. Outside a transaction block only.
asio::awaitable<error_code> prepare_missing(Impl& impl, const Pipeline& pipeline,
                                            const std::vector<std::size_t>& order,
                                            const RunUnnamed& unnamed) {
  const auto& statements = pipeline.statements();
  std::unordered_set<std::string> held;
  std::unordered_set<std::string> seen;
  struct ToPrepare {
    std::string key;
    std::size_t statement;
    std::string name;
  };
  std::vector<ToPrepare> to_prepare;
  for (const std::size_t i : order) {
    if (unnamed.count(i) != 0) continue;
    if (impl.cached_statement(statements[i].sql, statements[i].params) != nullptr) {
      held.insert(impl.statement_key);
    } else if (seen.insert(impl.statement_key).second) {
      to_prepare.push_back(ToPrepare{impl.statement_key, i, {}});
    }
  }
  const std::size_t capacity = std::max<std::size_t>(impl.options.statement_cache_size, 1);
  to_prepare.resize(std::min(to_prepare.size(), capacity - std::min(held.size(), capacity)));
  if (to_prepare.empty()) co_return error_code{};

  PGconn* conn = impl.conn;
  if (PQenterPipelineMode(conn) == 0) {
    co_return impl.fail(client_errc::protocol_error,
                        "cannot enter pipeline mode: " + trimmed(PQerrorMessage(conn)));
  }
  for (ToPrepare& statement : to_prepare) {
    const Pipeline::Statement& source = statements[statement.statement];
    statement.name = impl.new_statement_name();
    if (PQsendPrepare(conn, statement.name.c_str(), source.sql.c_str(),
                      static_cast<int>(source.params.size()), source.params.types()) == 0 ||
        PQpipelineSync(conn) == 0) {
      co_return impl.lost(source.sql);
    }
  }
  if (auto flush_error = co_await impl.flush("pipeline", /*can_drain=*/false)) {
    co_return flush_error;
  }
  const asio::cancellation_state cancellation = co_await asio::this_coro::cancellation_state;
  for (std::size_t syncs_seen = 0; syncs_seen < to_prepare.size();) {
    const std::string_view current = statements[to_prepare[syncs_seen].statement].sql;
    PGresult* raw = nullptr;
    PGRT_NEXT_PIPELINE_RESULT(impl, raw, current, cancellation)
    const Result result(raw);
    const auto status = PQresultStatus(raw);
    if (status == PGRES_PIPELINE_SYNC) {
      ++syncs_seen;
    } else if (status == PGRES_COMMAND_OK) {
      ToPrepare& prepared = to_prepare[syncs_seen];
      impl.remember_statement(std::move(prepared.key), std::move(prepared.name));
    }  // a failure: the statement stays uncached, and runs unnamed
  }
  if (PQexitPipelineMode(conn) == 0) co_return impl.lost("pipeline");
  co_return co_await impl.deallocate_evicted();
}

// The statements of a run that did not run because of the statement cache: named statements the
// server did not know (SQLSTATE 26000 naming them), and those whose plan went stale
// (is_stale_plan()). Prepared again, they can run.
struct NotRunByTheCache {
  std::vector<std::string> forgotten;          // names
  std::vector<std::string> stale;              // names
  std::unordered_set<std::size_t> statements;  // their indices in the pipeline
  RunUnnamed stale_statements;                 // those whose plan went stale

  [[nodiscard]] bool empty() const { return statements.empty(); }
};

// The segment order[begin, end) ran, but its implicit transaction failed to commit with `raw`'s
// error: each of its statements gets that error.
void fail_at_commit(Impl& impl, const PGresult* raw, const Pipeline& pipeline,
                    const std::vector<std::size_t>& order, std::size_t begin, std::size_t end,
                    std::vector<PipelineOutcome>& outcomes) {
  const auto& statements = pipeline.statements();
  const error_code error = impl.server_error(raw, statements[order[end - 1]].sql);
  for (std::size_t k = begin; k < end; ++k) {
    PipelineOutcome& outcome = outcomes[order[k]];
    outcome.result = Result{};
    outcome.error = error;
    outcome.diagnostics = impl.last_error;
    outcome.diagnostics.statement = statements[order[k]].sql;
    // (The server's own hint, such as 40001's "might succeed if retried", comes first.)
    std::string& hint = outcome.diagnostics.hint;
    hint += std::string(hint.empty() ? "" : " ") +
            "(raised when the statement's sync segment committed: a deferred constraint, a "
            "serialization failure; none of the segment's statements took effect)";
  }
}

// Runs the statements of `order` (whole segments, in the pipeline's order) in one round trip,
// order[k] by the cached statement names[k] (null: unnamed), and fills their outcomes. The cache
// does not change until the results are in, so the names stay valid. `not_run` gets the
// statements that failed only because of the cache.
asio::awaitable<error_code> run_statements(Impl& impl, const Pipeline& pipeline,
                                           const std::vector<std::size_t>& order,
                                           const std::vector<const std::string*>& names,
                                           std::vector<PipelineOutcome>& outcomes,
                                           NotRunByTheCache& not_run) {
  PGconn* conn = impl.conn;
  if (PQenterPipelineMode(conn) == 0) {
    co_return impl.fail(client_errc::protocol_error,
                        "cannot enter pipeline mode: " + trimmed(PQerrorMessage(conn)));
  }
  const auto& statements = pipeline.statements();
  std::vector<std::size_t> segment_ends;  // per sync sent: where its segment ends in `order`
  // Sends the statements from order[sent], through the end of the next segment when one segment
  // is in flight at a time (behind a transaction pooler), else through the end.
  std::size_t sent = 0;
  const auto send_more = [&]() -> error_code {
    while (sent < order.size()) {
      const std::size_t k = sent++;
      const auto& statement = statements[order[k]];
      const auto values = statement.params.values();
      const int count = static_cast<int>(statement.params.size());
      const std::string* name = names[k];
      const int queued =
          name != nullptr
              ? PQsendQueryPrepared(conn, name->c_str(), count, values.data(),
                                    statement.params.lengths(), statement.params.formats(), 0)
              : PQsendQueryParams(conn, statement.sql.c_str(), count, statement.params.types(),
                                  values.data(), statement.params.lengths(),
                                  statement.params.formats(), 0);
      if (queued == 0) return impl.lost(statement.sql);
      if (ends_segment(pipeline, order[k]) || k + 1 == order.size()) {
        if (PQpipelineSync(conn) == 0) return impl.lost(statement.sql);
        segment_ends.push_back(k + 1);
        if (impl.one_segment_in_flight()) break;
      }
    }
    return error_code{};
  };
  if (auto send_error = send_more()) co_return send_error;
  // Each statement is timed (when the connection's are) from its segment's send to its result.
  auto sent_at =
      impl.statement_times ? detail::timing_now() : std::chrono::steady_clock::time_point{};
  error_code flush_error;
  if (!impl.flushed_at_once("pipeline", flush_error)) {
    flush_error = co_await impl.flush("pipeline", /*can_drain=*/false);
  }
  if (flush_error) co_return flush_error;
  const asio::cancellation_state cancellation = co_await asio::this_coro::cancellation_state;
  std::size_t k = 0;
  std::size_t segment_begin = 0;
  for (std::size_t syncs_seen = 0; syncs_seen < segment_ends.size();) {
    const std::size_t segment_end = segment_ends[syncs_seen];
    const std::string_view current = k < segment_end
                                         ? std::string_view(statements[order[k]].sql)
                                         : std::string_view(statements[order[segment_end - 1]].sql);
    PGresult* raw = nullptr;
    PGRT_NEXT_PIPELINE_RESULT(impl, raw, current, cancellation)
    Result result(raw);
    const auto status = PQresultStatus(raw);
    if (status == PGRES_PIPELINE_SYNC) {
      if (k < segment_end)
        co_return impl.answers_out_of_step(current);  // statements without a result
      segment_begin = segment_end;
      ++syncs_seen;
      if (syncs_seen == segment_ends.size() && sent < order.size()) {
        if (auto send_error = send_more()) co_return send_error;
        if (impl.statement_times) sent_at = detail::timing_now();
        if (!impl.flushed_at_once("pipeline", flush_error)) {
          flush_error = co_await impl.flush("pipeline", /*can_drain=*/false);
        }
        if (flush_error) co_return flush_error;
      }
      continue;
    }
    if (k == segment_end) {
      // A result after the segment's last statement's, before its sync: the segment's implicit
      // transaction failed to commit (a deferred constraint, a serialization failure). None of
      // its statements took effect, so none of them succeeded. Any other result here belongs to
      // no statement of ours.
      if (status != PGRES_FATAL_ERROR) co_return impl.answers_out_of_step(current);
      fail_at_commit(impl, raw, pipeline, order, segment_begin, segment_end, outcomes);
      continue;
    }
    if (impl.statement_times) {
      impl.statement_times->record(detail::timing_now() - sent_at);
    }
    PipelineOutcome& outcome = outcomes[order[k]];  // empty: run() empties those run again
    if (status == PGRES_PIPELINE_ABORTED) {
      outcome.error = make_error_code(client_errc::pipeline_aborted);
      outcome.diagnostics.message =
          "not run: an earlier statement of the same pipeline segment failed";
      outcome.diagnostics.statement = std::string(current);
    } else if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK ||
               status == PGRES_EMPTY_QUERY) {  // (an empty or comment-only statement ran)
      impl.note_statements_dropped(result.native_handle());
      // (A COMMIT of a failed transaction block "succeeds" with the tag ROLLBACK: 25P02.)
      if (const error_code rolled_back =
              detail::commit_rolled_back(raw, current, impl.last_error)) {
        outcome.error = rolled_back;
        outcome.diagnostics = impl.last_error;
      }
      outcome.result = std::move(result);
    } else if (status == PGRES_COPY_IN || status == PGRES_COPY_OUT || status == PGRES_COPY_BOTH) {
      // A COPY hidden from the check in run(): libpq is in copy mode and would hand out this
      // result for ever. The connection cannot go on: it is closed.
      auto error = impl.fail(client_errc::protocol_error,
                             "COPY cannot run in a pipeline: the connection was closed", current,
                             "run it alone on the lease: copy_from()");
      impl.broken = true;
      impl.close(CloseMode::immediate);
      co_return error;
    } else {
      outcome.error = impl.server_error(raw, current);
      outcome.diagnostics = impl.last_error;
      // The server no longer has our prepared statement (its message names it: a 26000 from
      // inside the statement, e.g. a function's EXECUTE, is the statement's own).
      const bool forgotten =
          names[k] != nullptr && forgot_statement(outcome.error, outcome.diagnostics, *names[k]);
      if (names[k] != nullptr && (forgotten || is_stale_plan(raw))) {
        (forgotten ? not_run.forgotten : not_run.stale).push_back(*names[k]);
        not_run.statements.insert(order[k]);
        if (!forgotten) not_run.stale_statements.insert(order[k]);
        // (Cleared when the statement runs again; the hint is for a failure that stands.)
        // (Pending writes tell a stale plan from a genuine 0A000 by this hint:
        // not_run_for_a_stale_plan().)
        outcome.diagnostics.hint =
            (forgotten ? std::string("the server no longer had pgrt's prepared statement, so it "
                                     "did not run (a DEALLOCATE or DISCARD ALL, or a "
                                     "transaction-mode pooler: then set PGRT_POOLER=transaction)")
                       : std::string(detail::stale_plan_hint) +
                             "; it is prepared again on its next run") +
            ". It was not run again: only the statements of a pipeline outside a transaction "
            "block, without transaction control, whose later segments did not commit, run again";
      }
    }
    ++k;
  }
  // Interrupted by its owner (interrupt() cancels, then cuts): the server's 57014 for that cancel,
  // and the aborts after it, may all be read before the cut shows; the run was interrupted, as
  // exchange() reports it for one statement.
  if (impl.cut_by_owner &&
      std::any_of(order.begin(), order.end(), [&](std::size_t i) { return !outcomes[i].ok(); })) {
    co_return impl.lost("pipeline");
  }
  if (PQexitPipelineMode(conn) == 0) {
    co_return impl.lost("pipeline");  // never hand back a connection still in pipeline mode
  }
  co_return error_code{};
}

#undef PGRT_NEXT_PIPELINE_RESULT

// What runs again after statements did not run because of the cache: everything from the first
// segment that failed for it to the end, in order (running it alone would put it after later
// segments, whose work may depend on it), and only if none of those later segments committed (each
// is an implicit transaction that failed): otherwise nothing (empty), and the failures stand.
std::vector<std::size_t> segments_to_run_again(const Pipeline& pipeline,
                                               const std::vector<std::size_t>& order,
                                               const std::vector<PipelineOutcome>& outcomes,
                                               const NotRunByTheCache& not_run) {
  std::optional<std::size_t> from;  // where the first segment that forgot starts, in `order`
  std::size_t segment_start = 0;
  bool segment_forgot = false;
  bool segment_failed = false;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const PipelineOutcome& outcome = outcomes[order[k]];
    segment_failed = segment_failed || !outcome.ok();
    segment_forgot = segment_forgot || not_run.statements.count(order[k]) != 0;
    if (ends_segment(pipeline, order[k]) || k + 1 == order.size()) {
      if (segment_forgot && !from) from = segment_start;
      if (from && !segment_failed) return {};  // a segment after it committed
      segment_start = k + 1;
      segment_forgot = false;
      segment_failed = false;
    }
  }
  if (!from) return {};
  return std::vector<std::size_t>(order.begin() + static_cast<std::ptrdiff_t>(*from), order.end());
}

}  // namespace

asio::awaitable<std::vector<PipelineOutcome>> Connection::run(const Pipeline& pipeline) {
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  std::vector<PipelineOutcome> outcomes(pipeline.size());
  if (pipeline.size() == 0) co_return outcomes;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    for (const auto& statement : pipeline.statements()) {
      if (auto refusal = impl.refuse_without_session(statement.sql)) co_return refusal;
      if (pipeline.holds_copy_ && first_keyword(statement.sql) == "copy") {
        co_return impl.fail(client_errc::protocol_error,
                            "COPY cannot run in a pipeline: it takes the connection over until "
                            "its data is sent or read; nothing of the pipeline was sent",
                            statement.sql, "run it alone on the lease: copy_from()");
      }
    }
    if (impl.single_row_mode_left_on) {
      const ParamSink no_params;
      Result ignored;
      const Connection::Impl::Request empty{.kind = Connection::Impl::Request::Kind::text,
                                            .sql = "",
                                            .params = &no_params,
                                            .timed = false};
      if (auto reset_error = co_await impl.exchange(empty, ignored)) co_return reset_error;
    }
    if (!impl.evicted_statements.empty() && PQtransactionStatus(impl.conn) == PQTRANS_IDLE) {
      if (auto deallocate_error = co_await impl.deallocate_evicted()) co_return deallocate_error;
    }
    std::vector<std::size_t> order(pipeline.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    // Statements whose plan went stale run again unnamed: prepared again before the run, they
    // would be planned before the pipeline's own statements ran (an ALTER TABLE in the same
    // segment as the SELECT * it changed), and go stale again.
    RunUnnamed run_unnamed;
    for (int attempt = 0;; ++attempt) {
      std::vector<const std::string*> names(order.size(), nullptr);
      if (pipeline.prepares_statements() && !impl.unnamed_statements &&
          look_up_names(impl, pipeline, order, run_unnamed, names) &&
          PQtransactionStatus(impl.conn) == PQTRANS_IDLE) {
        if (auto prepare_error = co_await prepare_missing(impl, pipeline, order, run_unnamed)) {
          co_return prepare_error;
        }
        look_up_names(impl, pipeline, order, run_unnamed, names);
      }
      NotRunByTheCache not_run;
      if (auto run_error =
              co_await run_statements(impl, pipeline, order, names, outcomes, not_run)) {
        co_return run_error;
      }
      if (not_run.empty()) break;
      // As exchange() does for one statement: prepared again once (a DEALLOCATE or DISCARD ALL
      // behind pgrt's back), or, the second time on this connection, unnamed from now on (a
      // transaction pooler). Only the segments that failed run again, and only when they cannot
      // have committed anything: outside a transaction block, without transaction control.
      // A statement whose plan went stale (an ALTER TABLE under a SELECT *) runs again unnamed
      // (the old one is deallocated; the next run prepares it again); it is no sign of a pooler.
      for (const std::string& name : not_run.stale) impl.retire_stale_statement(name);
      run_unnamed.insert(not_run.stale_statements.begin(), not_run.stale_statements.end());
      bool forgetting = false;  // one forgetting, however many of its statements show it
      for (const std::string& name : not_run.forgotten) {
        forgetting = impl.server_forgot_statement(name) || forgetting;
      }
      bool pooler_noticed = false;
      if (forgetting) {
        pooler_noticed = ++impl.forgotten_statements >= 2;
        if (pooler_noticed) impl.use_unnamed_statements("forgot its prepared statements");
      }
      const bool safe = PQtransactionStatus(impl.conn) == PQTRANS_IDLE &&
                        std::none_of(pipeline.statements().begin(), pipeline.statements().end(),
                                     [](const Pipeline::Statement& statement) {
                                       return controls_transactions(statement.sql);
                                     });
      if (!safe || !(attempt == 0 || pooler_noticed)) break;
      order = segments_to_run_again(pipeline, order, outcomes, not_run);
      if (order.empty()) break;
      for (const std::size_t i : order) outcomes[i] = PipelineOutcome{};
    }
    impl.last_error = {};
    co_return error_code{};
  });
  if (error) throw Error(error, impl.last_error);
  co_return outcomes;
}

}  // namespace pgrt
