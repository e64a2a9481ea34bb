#include "sql_text.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <optional>

#include "pgrt/db/error.hpp"

namespace pgrt {

bool is_sql_word_char(char c) noexcept {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_' || c == '$' ||
         static_cast<unsigned char>(c) >= 0x80;
}

std::size_t end_of_string_constant(std::string_view sql, std::size_t at,
                                   bool backslash_escapes) noexcept {
  const std::size_t size = sql.size();
  if (at >= size) return at;
  bool escapes = backslash_escapes;
  std::size_t quote = at;
  const char prefix = static_cast<char>(std::tolower(static_cast<unsigned char>(sql[at])));
  if (prefix == 'e' && at + 1 < size && sql[at + 1] == '\'') {
    escapes = true;
    quote = at + 1;
  } else if ((prefix == 'n' || prefix == 'b' || prefix == 'x') && at + 1 < size &&
             sql[at + 1] == '\'') {
    quote = at + 1;  // N'...' (national), B'...' and X'...' (bit strings): quoted as '...'
  } else if (prefix == 'u' && at + 2 < size && sql[at + 1] == '&' && sql[at + 2] == '\'') {
    quote = at + 2;  // U&'...': its escapes are \XXXX, and a quote in it is still ''
  }
  if (sql[quote] == '\'') {
    std::size_t i = quote + 1;
    while (i < size) {
      if (escapes && sql[i] == '\\') {
        i += 2;
      } else if (sql[i] == '\'') {
        if (i + 1 < size && sql[i + 1] == '\'') {
          i += 2;
        } else {
          return i + 1;
        }
      } else {
        ++i;
      }
    }
    return size;
  }
  if (sql[at] == '$') {
    std::size_t end = at + 1;
    while (end < size && sql[end] != '$' && is_sql_word_char(sql[end])) ++end;
    if (end >= size || sql[end] != '$' ||
        (end > at + 1 && std::isdigit(static_cast<unsigned char>(sql[at + 1])) != 0)) {
      return at;  // a parameter ($1), not a dollar quote
    }
    const std::string_view tag = sql.substr(at, end - at + 1);
    const std::size_t close = sql.find(tag, end + 1);
    return close == std::string_view::npos ? size : close + tag.size();
  }
  return at;
}

std::string quote_identifier(std::string_view name) {
  std::string quoted = "\"";
  for (char c : name) {
    quoted += c;
    if (c == '"') quoted += '"';
  }
  return quoted + "\"";
}

std::size_t end_of_quoted_identifier(std::string_view sql, std::size_t at, std::string* text) {
  if (at >= sql.size() || sql[at] != '"') return at;
  ++at;
  while (at < sql.size()) {
    if (sql[at] == '"') {
      if (at + 1 < sql.size() && sql[at + 1] == '"') {
        if (text != nullptr) *text += '"';
        at += 2;
        continue;
      }
      return at + 1;
    }
    if (text != nullptr) *text += sql[at];
    ++at;
  }
  return sql.size();
}

bool contains_ignoring_case(std::string_view text, std::string_view lower_case_part) noexcept {
  return std::search(text.begin(), text.end(), lower_case_part.begin(), lower_case_part.end(),
                     [](char in_text, char wanted) {
                       return std::tolower(static_cast<unsigned char>(in_text)) == wanted;
                     }) != text.end();
}

std::size_t end_of_comment(std::string_view sql, std::size_t at) noexcept {
  if (sql.substr(at, 2) == "--") {
    at = sql.find_first_of("\r\n", at);  // (the server's lexer ends one at either)
    return at == std::string_view::npos ? sql.size() : at;
  }
  if (sql.substr(at, 2) != "/*") return at;
  // Block comments nest in PostgreSQL: "/* a /* b */ c */" is one comment.
  int depth = 0;
  do {
    if (sql.substr(at, 2) == "/*") {
      ++depth;
      at += 2;
    } else if (sql.substr(at, 2) == "*/") {
      --depth;
      at += 2;
    } else {
      ++at;
    }
  } while (depth > 0 && at < sql.size());
  return depth > 0 ? sql.size() : at;
}

std::size_t past_blanks_and_comments(std::string_view sql, std::size_t at) noexcept {
  while (at < sql.size()) {
    if (std::isspace(static_cast<unsigned char>(sql[at])) != 0) {
      ++at;
    } else if (const std::size_t after = end_of_comment(sql, at); after != at) {
      at = after;
    } else {
      break;
    }
  }
  return at;
}

std::string first_keyword(std::string_view sql, std::size_t* end) {
  std::size_t at = past_blanks_and_comments(sql, 0);
  while (at < sql.size() && sql[at] == ';') {
    // (the server's parser drops empty statements: ";BEGIN" is one BEGIN)
    at = past_blanks_and_comments(sql, at + 1);
  }
  // Keywords are ASCII letters (a byte of a UTF-8 identifier ends it); no locale lookups: this
  // runs for every statement of every pipeline.
  std::string keyword;
  for (; at < sql.size(); ++at) {
    const char c = sql[at];
    if (c >= 'a' && c <= 'z') {
      keyword += c;
    } else if (c >= 'A' && c <= 'Z') {
      keyword += static_cast<char>(c - 'A' + 'a');
    } else {
      break;
    }
  }
  if (end != nullptr) *end = at;
  return keyword;
}

namespace {

// after_first_statement(), with a backslash escaping in every '...' or only in E'...'.
std::string_view after_first_statement(std::string_view sql, bool backslash_escapes) noexcept {
  const std::size_t size = sql.size();
  std::size_t at = past_blanks_and_comments(sql, 0);
  while (at < size && sql[at] == ';') at = past_blanks_and_comments(sql, at + 1);
  int depth = 0;  // parentheses (a rule's actions: (INSERT ...; INSERT ...))
  // A routine's SQL-standard body (BEGIN ATOMIC ...; ... END) holds ';' too. As psql's lexer does:
  // in a statement that starts CREATE [OR REPLACE] FUNCTION or PROCEDURE, BEGIN and END at the top
  // level open and close a body, and a CASE in a body ends with END as well.
  int words = 0;               // the statement's words, while they may start a routine's
  bool may_be_routine = true;  // its words so far start CREATE [OR REPLACE]
  bool routine = false;        // it starts CREATE [OR REPLACE] FUNCTION or PROCEDURE
  int begin_depth = 0;         // BEGIN (and CASE inside it) not yet closed by END
  // The next word is a label, not a keyword: after a '.' (spans.end) or AS (SELECT 1 AS end).
  bool label_next = false;
  while (at < size) {
    const char c = sql[at];
    if (const std::size_t after = end_of_comment(sql, at); after != at) {
      at = after;
    } else if (const std::size_t end = end_of_string_constant(sql, at, backslash_escapes);
               end != at) {
      at = end;
      may_be_routine = routine;
    } else if (c == '"') {
      at = end_of_quoted_identifier(sql, at);
      may_be_routine = routine;
    } else if (is_sql_word_char(c)) {
      const std::size_t start = at;
      while (at < size && is_sql_word_char(sql[at])) ++at;
      const std::string_view word = sql.substr(start, at - start);
      const auto is = [word](std::string_view lower) {
        return word.size() == lower.size() && contains_ignoring_case(word, lower);
      };
      if (may_be_routine && !routine) {
        const bool routine_word = is("function") || is("procedure");
        switch (words++) {
          case 0:
            may_be_routine = is("create");
            break;
          case 1:
            routine = routine_word;
            may_be_routine = routine_word || is("or");
            break;
          case 2:
            may_be_routine = is("replace");
            break;
          default:
            routine = may_be_routine = routine_word;
            break;
        }
      } else if (routine && depth == 0 && !label_next) {
        if (is("begin") || (is("case") && begin_depth > 0)) {
          ++begin_depth;
        } else if (is("end") && begin_depth > 0) {
          --begin_depth;
        }
      }
      label_next = is("as");
    } else if (c == ';' && depth == 0 && begin_depth == 0) {
      at = past_blanks_and_comments(sql, at + 1);
      while (at < size && sql[at] == ';') at = past_blanks_and_comments(sql, at + 1);
      return sql.substr(at);
    } else {
      if (c == '(') ++depth;
      if (c == ')' && depth > 0) --depth;
      if (c == '.') {
        label_next = true;
      } else if (std::isspace(static_cast<unsigned char>(c)) == 0) {
        label_next = false;
      }
      ++at;
    }
  }
  return {};
}

}  // namespace

std::string_view after_first_statement(std::string_view sql) noexcept {
  // Where a '...' with a backslash in it ends depends on the server (standard_conforming_strings,
  // and a '...' continuing an E'...' is an escape string): a second statement is one only if both
  // readings find it at the same place. (Otherwise the text is one statement to one of them, and
  // to the other several, which the server refuses at the flush: 42601.)
  const std::string_view rest = after_first_statement(sql, false);
  return after_first_statement(sql, true).size() == rest.size() ? rest : std::string_view{};
}

void check_statement_text(std::string_view sql) {
  const std::size_t nul = sql.find('\0');
  if (nul == std::string_view::npos) return;
  throw Error(make_error_code(client_errc::conversion),
              Diagnostics{.message = "the statement's text holds a NUL byte at offset " +
                                     std::to_string(nul) +
                                     ": the server would run only the text before it; nothing "
                                     "was sent",
                          .hint = "remove it; pass data as parameters ($1), binary data as "
                                  "pgrt::Bytes",
                          .statement = std::string(sql.substr(0, nul))});
}

namespace {

// The text of a U&"..." identifier with its Unicode escapes (\XXXX, \+XXXXXX, the escape
// doubled) resolved; a character past ASCII becomes '?' (no name looked for has one).
std::string decode_unicode_escapes(std::string_view text, char escape) {
  std::string decoded;
  const auto hex_value = [&text](std::size_t from, std::size_t digits) -> long {
    if (from + digits > text.size()) return -1;
    long value = 0;
    for (std::size_t i = from; i < from + digits; ++i) {
      const char c = text[i];
      const int digit = c >= '0' && c <= '9'   ? c - '0'
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                               : -1;
      if (digit < 0) return -1;
      value = value * 16 + digit;
    }
    return value;
  };
  for (std::size_t at = 0; at < text.size(); ++at) {
    if (text[at] != escape) {
      decoded += text[at];
      continue;
    }
    if (at + 1 < text.size() && text[at + 1] == escape) {
      decoded += escape;
      ++at;
      continue;
    }
    const bool long_form = at + 1 < text.size() && text[at + 1] == '+';
    const long code = hex_value(at + (long_form ? 2 : 1), long_form ? 6 : 4);
    if (code < 0) return std::string(text);  // (the server refuses it: nothing runs)
    decoded += code < 128 ? static_cast<char>(code) : '?';
    at += long_form ? 7 : 4;
  }
  return decoded;
}

}  // namespace

namespace {

// A word of a statement as the server's lexer reads it: a keyword or an unquoted name (lower
// case), a quoted identifier (its exact text) or a U&"..." identifier (its escapes resolved).
struct SqlWord {
  std::string text;
  bool quoted = false;
  std::size_t end = 0;  // the offset just past it
};

// Calls `visit` with each word of `sql` in order, strings and comments skipped (a parameter such
// as $1 is a word too), until it returns true; returns whether one did.
template <typename Visit>
bool find_word(std::string_view sql, Visit&& visit) {
  const std::size_t size = sql.size();
  std::size_t at = 0;
  SqlWord word;
  while (at < size) {
    const char c = sql[at];
    word.text.clear();
    if (const std::size_t after = end_of_comment(sql, at); after != at) {
      at = after;
      continue;
    }
    if (const std::size_t constant_end = end_of_string_constant(sql, at); constant_end != at) {
      at = constant_end;
      continue;
    }
    if (c == '"') {
      at = end_of_quoted_identifier(sql, at, &word.text);
      word.quoted = true;
    } else if ((c == 'u' || c == 'U') && at + 2 < size && sql[at + 1] == '&' &&
               sql[at + 2] == '"') {
      // U&"..." [UESCAPE 'c']: the identifier with its escapes resolved.
      std::string identifier;
      at = end_of_quoted_identifier(sql, at + 2, &identifier);
      char escape = '\\';
      const std::size_t next = past_blanks_and_comments(sql, at);
      std::string next_word;
      for (std::size_t i = next; i < size && is_sql_word_char(sql[i]); ++i) {
        next_word += static_cast<char>(std::tolower(static_cast<unsigned char>(sql[i])));
      }
      if (next_word == "uescape") {
        const std::size_t quote = past_blanks_and_comments(sql, next + 7);
        if (quote + 2 < size && sql[quote] == '\'' && sql[quote + 2] == '\'') {
          escape = sql[quote + 1];
          at = quote + 3;
        }
      }
      word.text = decode_unicode_escapes(identifier, escape);
      word.quoted = true;
    } else if (is_sql_word_char(c)) {
      for (; at < size && is_sql_word_char(sql[at]); ++at) {
        word.text += static_cast<char>(std::tolower(static_cast<unsigned char>(sql[at])));
      }
      word.quoted = false;
    } else {
      ++at;
      continue;
    }
    word.end = at;
    if (visit(static_cast<const SqlWord&>(word))) return true;
  }
  return false;
}

// The character after `after` past blanks and comments ('\0' at the end).
char next_char(std::string_view sql, std::size_t after) noexcept {
  const std::size_t next = past_blanks_and_comments(sql, after);
  return next < sql.size() ? sql[next] : '\0';
}

// The last top-level argument, as written (trimmed), of the call whose '(' is at `open`.
std::string last_argument(std::string_view sql, std::size_t open) {
  int depth = 0;
  std::size_t from = open + 1;
  for (std::size_t at = open; at < sql.size();) {
    if (const std::size_t after = end_of_comment(sql, at); after != at) {
      at = after;
    } else if (const std::size_t end = end_of_string_constant(sql, at); end != at) {
      at = end;
    } else if (sql[at] == '"') {
      at = end_of_quoted_identifier(sql, at, nullptr);
    } else {
      if (sql[at] == '(') ++depth;
      if (sql[at] == ',' && depth == 1) from = at + 1;
      if (sql[at] == ')' && --depth == 0) {
        std::string_view argument = sql.substr(from, at - from);
        while (!argument.empty() && std::isspace(static_cast<unsigned char>(argument.front())))
          argument.remove_prefix(1);
        while (!argument.empty() && std::isspace(static_cast<unsigned char>(argument.back())))
          argument.remove_suffix(1);
        return std::string(argument);
      }
      ++at;
    }
  }
  return std::string();
}

}  // namespace

bool calls_session_set_config(std::string_view sql) {
  // (Most statements name no set_config at all: one case-blind search settles those; a U&"..."
  // identifier may spell it with escapes.)
  if (!contains_ignoring_case(sql, "set_config") && !contains_ignoring_case(sql, "u&")) {
    return false;
  }
  return find_word(sql, [sql](const SqlWord& word) {
    if (word.text != "set_config") return false;
    const std::size_t open = past_blanks_and_comments(sql, word.end);
    if (open >= sql.size() || sql[open] != '(') return false;
    std::string last = last_argument(sql, open);
    for (char& c : last) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return last != "true";
  });
}

bool calls_session_advisory_lock(std::string_view sql) {
  if (!contains_ignoring_case(sql, "advisory") && !contains_ignoring_case(sql, "u&")) {
    return false;
  }
  static constexpr std::array<std::string_view, 7> session_locks{
      "pg_advisory_lock",      "pg_advisory_lock_shared",
      "pg_try_advisory_lock",  "pg_try_advisory_lock_shared",
      "pg_advisory_unlock",    "pg_advisory_unlock_shared",
      "pg_advisory_unlock_all"};
  return find_word(sql, [sql](const SqlWord& word) {
    return std::find(session_locks.begin(), session_locks.end(), word.text) !=
               session_locks.end() &&
           next_char(sql, word.end) == '(';
  });
}

namespace {

// PostgreSQL's parse_bool(): true, false, or nullopt for a value it refuses. Case-blind; a
// non-empty prefix of true, false, yes or no, at least two letters of on or off, 1 or 0.
std::optional<bool> postgres_boolean(std::string_view value) {
  std::string lower;
  for (char c : value) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const auto prefix_of = [&lower](std::string_view word, std::size_t shortest) {
    return lower.size() >= shortest && word.starts_with(lower);
  };
  if (prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || lower == "1") {
    return true;
  }
  if (prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || lower == "0") {
    return false;
  }
  return std::nullopt;
}

// The value of `SET LOCAL name = value` or `... TO value`, read from `at` (just past the name)
// to the end of the statement: the boolean PostgreSQL would read from it, nullopt if it is
// anything else (DEFAULT, a list, a string with escapes or dollar quotes, a signed number, more
// after it than empty statements, blanks and comments).
std::optional<bool> set_boolean_value(std::string_view sql, std::size_t at) {
  at = past_blanks_and_comments(sql, at);
  if (at < sql.size() && sql[at] == '=') {
    ++at;
  } else if (sql.size() - at >= 2 && std::tolower(static_cast<unsigned char>(sql[at])) == 't' &&
             std::tolower(static_cast<unsigned char>(sql[at + 1])) == 'o' &&
             (at + 2 == sql.size() || !is_sql_word_char(sql[at + 2]))) {
    at += 2;
  } else {
    return std::nullopt;
  }
  at = past_blanks_and_comments(sql, at);
  if (at >= sql.size()) return std::nullopt;
  std::string value;
  if (sql[at] == '\'') {  // a plain string: '' is a quote
    const std::size_t end = end_of_string_constant(sql, at);
    if (end == at || end - at < 2 || sql[end - 1] != '\'') return std::nullopt;
    for (std::size_t i = at + 1; i + 1 < end; ++i) {
      value += sql[i];
      if (sql[i] == '\'') ++i;
    }
    at = end;
  } else if (sql[at] == '"') {
    at = end_of_quoted_identifier(sql, at, &value);
  } else if (is_sql_word_char(sql[at]) && sql[at] != '$') {
    // A word or a number; a prefixed string (E'...', U&'...') is not read.
    for (; at < sql.size() && is_sql_word_char(sql[at]); ++at) value += sql[at];
    if (at < sql.size() && (sql[at] == '\'' || sql[at] == '&' || sql[at] == '.')) {
      return std::nullopt;
    }
  } else {
    return std::nullopt;
  }
  // Then only empty statements, blanks and comments, which the server's parser drops (`off;;` is
  // the one statement `off` is); another statement after it is not read (nullopt).
  at = past_blanks_and_comments(sql, at);
  while (at < sql.size() && sql[at] == ';') at = past_blanks_and_comments(sql, at + 1);
  if (at != sql.size()) return std::nullopt;
  return postgres_boolean(value);
}

}  // namespace

ReadOnlySetting transaction_read_only_setting(std::string_view sql) {
  ReadOnlySetting setting = ReadOnlySetting::none;
  std::size_t index = 0;
  std::string second;    // TRANSACTION or LOCAL
  std::string previous;  // the word before, in SET TRANSACTION
  (void)find_word(sql, [&](const SqlWord& word) {
    const std::string keyword = word.quoted ? std::string() : word.text;
    const std::size_t at = index++;
    if (at == 0) return keyword != "set";  // (not a SET: stops at once)
    if (at == 1) {
      second = keyword;
      return second != "transaction" && second != "local";
    }
    if (second == "local" && at == 2 && keyword == "transaction") {
      second = keyword;  // SET LOCAL TRANSACTION ...: as SET TRANSACTION
      return false;
    }
    if (second == "local") {  // SET LOCAL name ...: the name, quoted or not (GUC names are
                              // case-blind), then its value
      std::string name;
      for (char c : word.text) {
        name += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      }
      if (name == "transaction_read_only") {
        const std::optional<bool> value = set_boolean_value(sql, word.end);
        setting = !value   ? ReadOnlySetting::unknown
                  : *value ? ReadOnlySetting::read_only
                           : ReadOnlySetting::none;
      }
      return true;
    }
    // SET TRANSACTION ..., READ ONLY
    if (previous == "read" && keyword == "only") setting = ReadOnlySetting::read_only;
    previous = keyword;
    return setting != ReadOnlySetting::none;
  });
  return setting;
}

namespace {

// Whether `sql` makes a temporary table, view or sequence, which lives as long as the session
// (ON COMMIT DROP: only as long as its transaction, fine when `on_commit_drop_is_fine`), or
// names an object in the session's own temporary schema (pg_temp.name).
bool uses_temporary_objects(std::string_view sql, std::string_view keyword,
                            bool on_commit_drop_is_fine) {
  // (Most statements hold no "temp" at all: one case-blind search settles those.)
  if (!contains_ignoring_case(sql, "temp")) return false;
  const bool creates = keyword == "create";
  const bool selects = keyword == "select" || keyword == "with";
  const bool temp_schema = contains_ignoring_case(sql, "pg_temp");
  if (!creates && !selects && !temp_schema) return false;
  // SELECT ... INTO TEMP name: "temp" there is the keyword, unless a clause follows it (then it
  // is the new table's name: SELECT 1 INTO temp FROM t), or it is INSERT INTO temp (WITH ...).
  static constexpr std::array<std::string_view, 20> not_a_name{
      "as",        "except", "fetch",  "for",   "from",   "group",      "having",
      "intersect", "limit",  "offset", "on",    "order",  "overriding", "returning",
      "select",    "union",  "values", "where", "window", "default"};
  std::size_t index = 0;  // the word's place in the statement
  std::string previous;
  std::string before_previous;
  bool temporary = false;  // CREATE ... TEMP seen (or SELECT ... INTO TEMP)
  bool on_commit_drop = false;
  const bool found = find_word(sql, [&](const SqlWord& word) {
    const std::string& text = word.text;
    if (temp_schema && text == "pg_temp" && next_char(sql, word.end) == '.') return true;
    const bool temp_word = !word.quoted && (text == "temp" || text == "temporary");
    if (creates && temp_word && !temporary) {
      // CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY]: within the first five words.
      temporary = index <= 4 && (previous == "create" || previous == "replace" ||
                                 previous == "global" || previous == "local");
    }
    if (selects && !word.quoted && previous == "into" && temp_word) {
      const std::size_t after = past_blanks_and_comments(sql, word.end);
      std::string next;
      for (std::size_t i = after; i < sql.size() && is_sql_word_char(sql[i]); ++i) {
        next += static_cast<char>(std::tolower(static_cast<unsigned char>(sql[i])));
      }
      const bool named = (!next.empty() || (after < sql.size() && sql[after] == '"')) &&
                         std::find(not_a_name.begin(), not_a_name.end(), next) == not_a_name.end();
      if (named && before_previous != "insert") return true;
    }
    if (!word.quoted && text == "drop" && previous == "commit" && before_previous == "on") {
      on_commit_drop = true;
    }
    before_previous = std::move(previous);
    previous = word.quoted ? std::string() : text;
    ++index;
    return false;
  });
  return found || (temporary && !(on_commit_drop && on_commit_drop_is_fine));
}

}  // namespace

std::string needs_own_session(std::string_view sql, SessionScope scope) {
  std::size_t end = 0;
  const std::string keyword = first_keyword(sql, &end);
  // (string_views: a comparison looks at the lengths first, not at strlen and memcmp of each.)
  static constexpr std::array<std::string_view, 21> session_keywords{
      "begin",   "start",   "commit",     "end",     "rollback", "abort",    "savepoint",
      "release", "prepare", "set",        "reset",   "listen",   "unlisten", "copy",
      "discard", "load",    "deallocate", "declare", "fetch",    "move",     "close"};
  bool refused = std::find(session_keywords.begin(), session_keywords.end(), keyword) !=
                 session_keywords.end();
  if (scope == SessionScope::batch_transaction) {
    // SET LOCAL, SET CONSTRAINTS and SET TRANSACTION end with the batch's transaction. (The next
    // word is read whole: a setting's name may begin with "local_" or "transaction_".)
    const std::string_view rest = sql.substr(end);
    std::size_t second_end = 0;
    const std::string second = first_keyword(rest, &second_end);
    const bool whole = second_end >= rest.size() || !is_sql_word_char(rest[second_end]);
    if (keyword == "set" && whole &&
        (second == "local" || second == "constraints" || second == "transaction")) {
      refused = false;
    }
  } else if (keyword == "lock" || keyword == "do") {
    // A statement of its own: LOCK outlives nothing, but is refused with the reason (it needs a
    // transaction block); DO runs procedural code, whose statements this check cannot see.
    refused = true;
  }
  if (refused) return "'" + keyword + "'";
  // (ON COMMIT DROP ends with the statement's implicit transaction; in a batch it would be
  // used by later writes, which batch boundaries and retries put in other transactions.)
  if (uses_temporary_objects(sql, keyword, scope == SessionScope::own_implicit_transaction)) {
    return "a temporary table";
  }
  // set_config(name, value, false) sets for the session, as SET does; with true, for the
  // transaction only. (Functions and DO blocks are not looked into: a guard against a mistake,
  // not a boundary.)
  if (calls_session_set_config(sql)) return "set_config() for the session";
  if (calls_session_advisory_lock(sql)) return "a session-level advisory lock";
  return {};
}

}  // namespace pgrt
