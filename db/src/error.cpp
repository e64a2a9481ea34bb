#include "pgrt/db/error.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <libpq-fe.h>
#include <memory>
#include <optional>
#include <utility>

#include "connection/conninfo.hpp"
#include "sql_text.hpp"

namespace pgrt {

namespace {

constexpr std::string_view sqlstate_alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

// A SQLSTATE is five characters of [0-9A-Z]: base 36 fits an int.
int pack_sqlstate(std::string_view sqlstate) noexcept {
  if (sqlstate.size() != 5) return 0;
  int packed = 0;
  for (char c : sqlstate) {
    auto digit = sqlstate_alphabet.find(c);
    if (digit == std::string_view::npos) return 0;
    packed = packed * 36 + static_cast<int>(digit);
  }
  return packed + 1;  // never 0, which means success
}

std::string unpack_sqlstate(int value) {
  if (value <= 0) return {};
  std::string sqlstate(5, '0');
  value -= 1;
  for (int i = 4; i >= 0; --i) {
    sqlstate[static_cast<std::size_t>(i)] = sqlstate_alphabet[static_cast<std::size_t>(value % 36)];
    value /= 36;
  }
  return sqlstate;
}

// Names of the SQLSTATEs services meet most; the rest are reported by code and class.
constexpr std::array<std::pair<std::string_view, std::string_view>, 24> sqlstate_names{{
    {"08000", "connection_exception"},
    {"08003", "connection_does_not_exist"},
    {"08006", "connection_failure"},
    {"08001", "sqlclient_unable_to_establish_sqlconnection"},
    {"08004", "sqlserver_rejected_establishment_of_sqlconnection"},
    {"08P01", "protocol_violation"},
    {"22012", "division_by_zero"},
    {"22P02", "invalid_text_representation"},
    {"23502", "not_null_violation"},
    {"23503", "foreign_key_violation"},
    {"23505", "unique_violation"},
    {"25P02", "in_failed_sql_transaction"},
    {"28000", "invalid_authorization_specification"},
    {"28P01", "invalid_password"},
    {"3D000", "invalid_catalog_name"},
    {"40001", "serialization_failure"},
    {"40P01", "deadlock_detected"},
    {"42601", "syntax_error"},
    {"42P01", "undefined_table"},
    {"53300", "too_many_connections"},
    {"57014", "query_canceled"},
    {"57P01", "admin_shutdown"},
    {"57P02", "crash_shutdown"},
    {"57P03", "cannot_connect_now"},
}};

std::string_view sqlstate_name(std::string_view sqlstate) {
  for (const auto& [code, name] : sqlstate_names) {
    if (code == sqlstate) return name;
  }
  return {};
}

class ClientCategory final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "pgrt.client"; }
  std::string message(int value) const override {
    switch (static_cast<client_errc>(value)) {
      case client_errc::connect_failed:
        return "could not connect to the server";
      case client_errc::connection_lost:
        return "the connection to the server was lost";
      case client_errc::protocol_error:
        return "protocol error";
      case client_errc::timeout:
        return "the operation timed out";
      case client_errc::cancelled:
        return "the operation was cancelled";
      case client_errc::conversion:
        return "a value could not be converted";
      case client_errc::unexpected_null:
        return "unexpected NULL";
      case client_errc::concurrent_use:
        return "a connection was used by two operations at once";
      case client_errc::not_connected:
        return "the connection is closed or broken";
      case client_errc::pipeline_aborted:
        return "skipped: an earlier statement of the pipeline segment failed";
      case client_errc::name_resolution:
        return "the host name could not be resolved";
      case client_errc::pool_timeout:
        return "timed out waiting for a pooled connection";
      case client_errc::pool_queue_full:
        return "the pool's wait queue is full";
      case client_errc::pool_closed:
        return "the pool is closed";
      case client_errc::pool_not_configured:
        return "the process-wide pool is not configured";
      case client_errc::already_configured:
        return "the process-wide pool is already configured";
      case client_errc::invalid_config:
        return "invalid configuration";
      case client_errc::writes_closed:
        return "the pending writes are stopping or stopped; the write was not accepted";
      case client_errc::writes_queue_full:
        return "the pending writes queue is full; the write was not accepted";
      case client_errc::writes_failed:
        return "some accepted pending writes were not written";
      case client_errc::instance_locked:
        return "another instance with the same app and instance names holds the lock";
      case client_errc::tls_failed:
        return "TLS could not be set up with the server";
      case client_errc::needs_session:
        return "the statement needs a server session of its own, which neither a shared "
               "connection (query()) nor a transaction pooler gives";
      case client_errc::budget_exhausted:
        return "every slot of the connection budget is held";
      case client_errc::commit_unconfirmed:
        return "the outcome is unknown: the COMMIT was sent, and its answer lost";
    }
    return "unknown pgrt client error " + std::to_string(value);
  }
  boost::system::error_condition default_error_condition(int value) const noexcept override {
    switch (static_cast<client_errc>(value)) {
      case client_errc::connect_failed:
      case client_errc::connection_lost:
      case client_errc::not_connected:
      case client_errc::name_resolution:
        return make_error_condition(condition::connection_error);
      case client_errc::timeout:
      case client_errc::pool_timeout:
        return make_error_condition(condition::timeout);
      case client_errc::cancelled:
        return make_error_condition(condition::query_canceled);
      case client_errc::invalid_config:
        return boost::system::errc::make_error_condition(boost::system::errc::invalid_argument);
      case client_errc::budget_exhausted:
        return make_error_condition(condition::too_many_connections);
      default:
        return {value, *this};
    }
  }
};

class SqlstateCategory final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "pgrt.sqlstate"; }
  std::string message(int value) const override {
    auto sqlstate = unpack_sqlstate(value);
    auto name = sqlstate_name(sqlstate);
    return "SQLSTATE " + sqlstate + (name.empty() ? "" : " " + std::string(name));
  }
};

class ConditionCategory final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "pgrt.condition"; }
  std::string message(int value) const override {
    switch (static_cast<condition>(value)) {
      case condition::connection_error:
        return "connection error";
      case condition::too_many_connections:
        return "too many connections";
      case condition::admin_shutdown:
        return "administrator shutdown";
      case condition::serialization_failure:
        return "serialization failure";
      case condition::deadlock:
        return "deadlock detected";
      case condition::unique_violation:
        return "unique violation";
      case condition::query_canceled:
        return "query canceled";
      case condition::timeout:
        return "timeout";
    }
    return "unknown pgrt condition " + std::to_string(value);
  }
  bool equivalent(const boost::system::error_code& code, int value) const noexcept override {
    const auto wanted = static_cast<condition>(value);
    if (code.category() == client_category()) {
      return code.category().default_error_condition(code.value()) == make_error_condition(wanted);
    }
    if (code.category() != sqlstate_category()) return false;
    const std::string sqlstate = unpack_sqlstate(code.value());
    const std::string_view klass = std::string_view(sqlstate).substr(0, 2);
    switch (wanted) {
      case condition::connection_error:
        // 08P01 (protocol_violation) as a code is an ERROR the server answered to a message of
        // ours on a connection that stays open (a statement given the wrong number of
        // parameters): the statement's mistake. One that ends the session comes as a FATAL,
        // which is client_errc::connection_lost (with the 08P01 in its diagnostics).
        return (klass == "08" && sqlstate != "08P01") || sqlstate == "57P01" ||
               sqlstate == "57P02" || sqlstate == "57P03";
      case condition::too_many_connections:
        return klass == "53";
      case condition::admin_shutdown:
        return sqlstate == "57P01";
      case condition::serialization_failure:
        return sqlstate == "40001";
      case condition::deadlock:
        return sqlstate == "40P01";
      case condition::unique_violation:
        return sqlstate == "23505";
      case condition::query_canceled:
        return sqlstate == "57014";
      case condition::timeout:
        return false;
    }
    return false;
  }
};

}  // namespace

std::string redact_statement(std::string_view sql) {
  constexpr std::string_view keyword = "password";
  // (Most statements hold no such word: one case-blind search settles those.)
  if (!contains_ignoring_case(sql, keyword)) return std::string(sql);
  std::string out;
  out.reserve(sql.size());
  std::size_t at = 0;
  const std::size_t size = sql.size();
  // A word ending in PASSWORD: the keyword, or an option named after one (a user mapping's
  // sslpassword, postgres_fdw's pass phrase of the client key), bare or as a quoted identifier.
  const auto names_a_password = [&](std::string_view word) {
    return word.size() >= keyword.size() &&
           contains_ignoring_case(word.substr(word.size() - keyword.size()), keyword);
  };
  while (at < size) {
    // A comment, quoted identifier or string constant (not after PASSWORD) stays as it is.
    std::size_t skipped = end_of_comment(sql, at);
    bool quoted_password = false;
    if (skipped == at) {
      std::string identifier;  // ("password" 'secret': the option's name quoted)
      skipped = end_of_quoted_identifier(sql, at, &identifier);
      quoted_password = skipped != at && names_a_password(identifier);
    }
    if (skipped == at) skipped = end_of_string_constant(sql, at);
    if (skipped != at) {
      out.append(sql.substr(at, skipped - at));
      at = skipped;
      if (!quoted_password) continue;
    } else if (!is_sql_word_char(sql[at])) {
      out += sql[at++];
      continue;
    } else {
      std::size_t end = at;
      while (end < size && is_sql_word_char(sql[end])) ++end;
      const std::string_view word = sql.substr(at, end - at);
      out.append(word);
      at = end;
      if (!names_a_password(word)) continue;
    }
    // PASSWORD 'secret' (CREATE/ALTER ROLE, a user mapping's options): the constant is masked,
    // and so are the comments before it (they may hide it as well as anything else) and the
    // constants that continue it ('...' followed, across a line break, by '...' is one).
    std::size_t next = past_blanks_and_comments(sql, at);
    std::size_t secret_end = end_of_string_constant(sql, next);
    if (secret_end == next) continue;
    for (;;) {
      const std::size_t after = secret_end;
      std::size_t following = after;
      while (following < size && std::isspace(static_cast<unsigned char>(sql[following])) != 0) {
        ++following;
      }
      const bool line_break =
          sql.substr(after, following - after).find_first_of("\n\r") != std::string_view::npos;
      if (!line_break || following >= size || sql[following] != '\'') break;
      secret_end = end_of_string_constant(sql, following);
    }
    out += ' ';
    out += "'****'";
    at = secret_end;
  }
  return out;
}

namespace {

std::string describe(const boost::system::error_code& code, const Diagnostics& diagnostics) {
  std::string text = diagnostics.message.empty() ? code.message() : diagnostics.message;
  if (code.category() == sqlstate_category()) {
    auto name = sqlstate_name(diagnostics.sqlstate);
    text += " [" + diagnostics.sqlstate + (name.empty() ? "" : " " + std::string(name)) + "]";
  } else if (!diagnostics.message.empty()) {
    text += " [" + code.message() + "]";
  }
  if (!diagnostics.detail.empty()) text += "\nDETAIL: " + diagnostics.detail;
  if (!diagnostics.hint.empty()) text += "\nHINT: " + diagnostics.hint;
  if (!diagnostics.statement.empty()) {
    text += "\nSTATEMENT: " + redact_statement(diagnostics.statement);
  }
  return text;
}

}  // namespace

const boost::system::error_category& client_category() noexcept {
  static const ClientCategory instance;
  return instance;
}

boost::system::error_code make_error_code(client_errc code) noexcept {
  return {static_cast<int>(code), client_category()};
}

const boost::system::error_category& sqlstate_category() noexcept {
  static const SqlstateCategory instance;
  return instance;
}

boost::system::error_code make_sqlstate_error(std::string_view sqlstate) noexcept {
  int packed = pack_sqlstate(sqlstate);
  if (packed == 0) return make_error_code(client_errc::protocol_error);
  return {packed, sqlstate_category()};
}

std::string sqlstate_of(const boost::system::error_code& code) {
  if (code.category() != sqlstate_category()) return {};
  return unpack_sqlstate(code.value());
}

const boost::system::error_category& condition_category() noexcept {
  static const ConditionCategory instance;
  return instance;
}

boost::system::error_condition make_error_condition(condition value) noexcept {
  return {static_cast<int>(value), condition_category()};
}

namespace {
// A SQLSTATE error's diagnostics say its SQLSTATE, also when whoever made them left it out.
Diagnostics with_sqlstate(const boost::system::error_code& code, Diagnostics diagnostics) {
  if (diagnostics.sqlstate.empty() && code.category() == sqlstate_category()) {
    diagnostics.sqlstate = sqlstate_of(code);
  }
  return diagnostics;
}
}  // namespace

Error::Error(boost::system::error_code code, Diagnostics diagnostics)
    : boost::system::system_error(code),
      diagnostics_(with_sqlstate(code, std::move(diagnostics))),
      what_(describe(code, diagnostics_)) {}

std::string mask_password(std::string_view original) {
  // load_balance_hosts (pgrt's to apply, whatever its libpq knows) is parsed apart, and shown last.
  std::string without_balance(original);
  const std::optional<std::string> balance = take_load_balance_hosts(without_balance);
  const std::string_view conninfo = without_balance;
  char* parse_error = nullptr;
  std::unique_ptr<PQconninfoOption, void (*)(PQconninfoOption*)> options(
      PQconninfoParse(std::string(conninfo).c_str(), &parse_error), PQconninfoFree);
  // libpq's parse error may quote the text around the problem, password included: never show it.
  PQfreemem(parse_error);
  if (!options || url_credentials_misread(conninfo)) return redact_unparsable_conninfo(conninfo);
  std::string masked;
  for (const PQconninfoOption* option = options.get(); option->keyword != nullptr; ++option) {
    if (option->val == nullptr) continue;
    if (!masked.empty()) masked += ' ';
    masked += option->keyword;
    masked += '=';
    if (std::string_view(option->keyword) == "password" ||
        (option->dispchar != nullptr && option->dispchar[0] == '*') ||
        value_holds_credentials(option->keyword, option->val)) {
      masked += "****";
      continue;
    }
    std::string value = option->val;
    bool needs_quotes = value.empty() || value.find_first_of(" '\\") != std::string::npos;
    if (!needs_quotes) {
      masked += value;
      continue;
    }
    masked += '\'';
    for (char c : value) {
      if (c == '\'' || c == '\\') masked += '\\';
      masked += c;
    }
    masked += '\'';
  }
  if (balance) {
    masked += std::string(masked.empty() ? "" : " ") + "load_balance_hosts=" +
              (load_balance_hosts_problem(*balance).empty() ? *balance : "****");
  }
  return masked;
}

}  // namespace pgrt
