#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>

#include "impl.hpp"

namespace pgrt {

// Prepares the statement that cached_statement() has just missed, caches it under its key and
// evicts the least recently used statements beyond the cache's size.
asio::awaitable<error_code> Connection::Impl::prepare(std::string_view sql, const ParamSink& params,
                                                      const std::string*& name) {
  std::string key = statement_key;
  std::string new_name = new_statement_name();
  const std::string text(sql);
  if (PQsendPrepare(conn, new_name.c_str(), text.c_str(), static_cast<int>(params.size()),
                    params.types()) == 0) {
    co_return lost(sql);
  }
  if (auto error = co_await flush(sql)) co_return error;
  Result ignored;
  if (auto error = co_await collect(sql, ignored, /*timed=*/false)) co_return error;
  remember_statement(std::move(key), std::move(new_name));
  if (auto error = co_await deallocate_evicted()) co_return error;
  name = &statements.front().name;
  co_return error_code{};
}

std::string Connection::Impl::new_statement_name() {
  if (statement_prefix.empty()) {
    // Unique to this connection, not only within it: behind a pooler that shares server sessions
    // (unconfigured), a name another client prepared there must never be executed as ours; the
    // server then says 26000 instead, and exchange() notices the pooler.
    std::random_device entropy;
    const std::uint64_t nonce = (std::uint64_t{entropy()} << 32) | entropy();
    char digits[17];
    std::snprintf(digits, sizeof digits, "%016llx", static_cast<unsigned long long>(nonce));
    statement_prefix = std::string("pgrt_") + digits + "_";
  }
  return statement_prefix + std::to_string(next_statement_id++);
}

void Connection::Impl::remember_statement(std::string key, std::string name) {
  statements.push_front(CachedStatement{key, std::move(name)});
  statement_index.emplace(std::move(key), statements.begin());
  while (statements.size() > std::max<std::size_t>(options.statement_cache_size, 1)) {
    evicted_statements.push_back(statements.back().name);
    statement_index.erase(statements.back().key);
    statements.pop_back();
  }
}

// Evicted statements are deallocated outside transaction blocks only: a DEALLOCATE that fails
// would abort the caller's transaction. (Behind an unnoticed pooler it may reach another server
// session, which never had the statement: 26000, nothing to free there.)
asio::awaitable<error_code> Connection::Impl::deallocate_evicted() {
  Result ignored;
  while (!evicted_statements.empty() && PQtransactionStatus(conn) == PQTRANS_IDLE) {
    const std::string deallocate = "DEALLOCATE " + evicted_statements.back();
    evicted_statements.pop_back();
    if (PQsendQuery(conn, deallocate.c_str()) == 0) co_return lost(deallocate);
    if (auto error = co_await flush(deallocate)) co_return error;
    if (auto error = co_await collect(deallocate, ignored, /*timed=*/false);
        error && error != make_sqlstate_error("26000")) {
      co_return error;
    }
  }
  co_return error_code{};
}

bool Connection::Impl::retire_stale_statement(std::string name) {
  // (`name` is a copy: the caller's may be the cache's own, which forget_statement() frees.)
  if (!forget_statement(name)) return false;
  evicted_statements.push_back(std::move(name));  // the server still has it
  return true;
}

bool Connection::Impl::server_forgot_statement(const std::string& name) {
  if (statement_index.empty()) return false;
  const bool cached =
      std::any_of(statements.begin(), statements.end(),
                  [&name](const CachedStatement& kept) { return kept.name == name; });
  if (!cached) return false;
  // A DISCARD ALL or DEALLOCATE ALL forgot every one of them: prepared again as they are used.
  statements.clear();
  statement_index.clear();
  return true;
}

void Connection::Impl::note_statements_dropped(const PGresult* result) {
  const char* tag = PQcmdStatus(const_cast<PGresult*>(result));
  if (tag == nullptr || tag[0] != 'D') return;
  const std::string_view said = tag;
  if (said != "DISCARD ALL" && said != "DEALLOCATE ALL") return;
  statements.clear();
  statement_index.clear();
  evicted_statements.clear();  // (gone with the rest)
}

bool Connection::Impl::forget_statement(const std::string& name) {
  for (auto it = statements.begin(); it != statements.end(); ++it) {
    if (it->name == name) {
      statement_index.erase(it->key);
      statements.erase(it);
      return true;
    }
  }
  return false;
}

}  // namespace pgrt
