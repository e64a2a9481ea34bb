#include "pgrt/db/pipeline.hpp"

#include "connection/impl.hpp"

namespace pgrt {

asio::awaitable<std::vector<PipelineOutcome>> Connection::run(const Pipeline& pipeline) {
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  std::vector<PipelineOutcome> outcomes(pipeline.size());
  if (pipeline.size() == 0) co_return outcomes;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    for (const auto& statement : pipeline.statements()) {
      if (auto refusal = impl.refuse_without_session(statement.sql)) co_return refusal;
    }
    PGconn* conn = impl.conn;
    if (impl.single_row_mode_left_on) {
      const ParamSink no_params;
      Result ignored;
      const Connection::Impl::Request empty{
          .kind = Connection::Impl::Request::Kind::text, .sql = "", .params = &no_params};
      if (auto reset_error = co_await impl.exchange(empty, ignored)) co_return reset_error;
    }
    if (PQenterPipelineMode(conn) == 0) {
      co_return impl.fail(client_errc::protocol_error,
                          "cannot enter pipeline mode: " + trimmed(PQerrorMessage(conn)));
    }
    std::size_t syncs = 0;
    const auto& statements = pipeline.statements();
    for (std::size_t i = 0; i < statements.size(); ++i) {
      const auto& statement = statements[i];
      const auto values = statement.params.values();
      if (PQsendQueryParams(conn, statement.sql.c_str(), static_cast<int>(statement.params.size()),
                            statement.params.types(), values.data(), statement.params.lengths(),
                            statement.params.formats(), 0) == 0) {
        co_return impl.lost(statement.sql);
      }
      if (statement.sync_after || i + 1 == statements.size()) {
        if (PQpipelineSync(conn) == 0) co_return impl.lost(statement.sql);
        ++syncs;
      }
    }
    if (auto flush_error = co_await impl.flush("pipeline", /*can_drain=*/false)) {
      co_return flush_error;
    }
    std::size_t index = 0;
    for (std::size_t syncs_seen = 0; syncs_seen < syncs;) {
      PGresult* raw = nullptr;
      const std::string_view current =
          index < statements.size() ? std::string_view(statements[index].sql) : "pipeline";
      // A result libpq holds already (most of a pipeline's come several to a read) is taken
      // without next_result()'s coroutine frame.
      if (PQisBusy(conn) == 0) {
        raw = PQgetResult(conn);
      } else if (auto read_error = co_await impl.next_result(raw, current, /*can_drain=*/false)) {
        co_return read_error;
      }
      if (raw == nullptr) {
        if (PQstatus(conn) != CONNECTION_OK) co_return impl.lost(current);
        continue;  // the end of one statement's results
      }
      Result result(raw);
      const auto status = PQresultStatus(raw);
      if (status == PGRES_PIPELINE_SYNC) {
        ++syncs_seen;
        continue;
      }
      if (index >= outcomes.size()) continue;
      PipelineOutcome& outcome = outcomes[index++];
      if (status == PGRES_PIPELINE_ABORTED) {
        outcome.error = make_error_code(client_errc::pipeline_aborted);
        outcome.diagnostics.message =
            "not run: an earlier statement of the same pipeline segment failed";
        outcome.diagnostics.statement = std::string(current);
      } else if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK) {
        outcome.result = std::move(result);
      } else {
        outcome.error = impl.server_error(raw, current);
        outcome.diagnostics = impl.last_error;
      }
    }
    if (PQexitPipelineMode(conn) == 0) {
      co_return impl.lost("pipeline");  // never hand back a connection still in pipeline mode
    }
    impl.last_error = {};
    co_return error_code{};
  });
  if (error) throw Error(error, impl.last_error);
  co_return outcomes;
}

}  // namespace pgrt
