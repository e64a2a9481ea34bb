#include <algorithm>

#include "impl.hpp"

namespace pgrt {

// A prepared statement for this SQL text and these parameter types, prepared on first use.
asio::awaitable<error_code> Connection::Impl::prepared_name_for(std::string_view sql,
                                                                const ParamSink& params,
                                                                std::string& name) {
  std::string key(sql);
  key += '\0';
  for (std::size_t i = 0; i < params.size(); ++i) key += std::to_string(params.types()[i]) + ',';
  if (auto found = statement_index.find(key); found != statement_index.end()) {
    statements.splice(statements.begin(), statements, found->second);
    name = found->second->name;
    co_return error_code{};
  }
  name = "pgrt_" + std::to_string(next_statement_id++);
  const std::string text(sql);
  if (PQsendPrepare(conn, name.c_str(), text.c_str(), static_cast<int>(params.size()),
                    params.types()) == 0) {
    co_return lost(sql);
  }
  if (auto error = co_await flush(sql)) co_return error;
  Result ignored;
  if (auto error = co_await collect(sql, ignored, nullptr, nullptr)) co_return error;
  statements.push_front(CachedStatement{key, name});
  statement_index.emplace(std::move(key), statements.begin());
  while (statements.size() > std::max<std::size_t>(options.statement_cache_size, 1)) {
    const std::string evicted = statements.back().name;
    statement_index.erase(statements.back().key);
    statements.pop_back();
    const std::string deallocate = "DEALLOCATE " + evicted;
    if (PQsendQuery(conn, deallocate.c_str()) == 0) co_return lost(deallocate);
    if (auto error = co_await flush(deallocate)) co_return error;
    if (auto error = co_await collect(deallocate, ignored, nullptr, nullptr)) co_return error;
  }
  co_return error_code{};
}

void Connection::Impl::forget_statement(const std::string& name) {
  for (auto it = statements.begin(); it != statements.end(); ++it) {
    if (it->name == name) {
      statement_index.erase(it->key);
      statements.erase(it);
      return;
    }
  }
}

}  // namespace pgrt
