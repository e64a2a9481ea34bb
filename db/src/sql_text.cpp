#include "sql_text.hpp"

#include <algorithm>
#include <array>
#include <cctype>

#include "pgrt/db/error.hpp"

namespace pgrt {

bool is_sql_word_char(char c) noexcept {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_' || c == '$' ||
         static_cast<unsigned char>(c) >= 0x80;
}

std::size_t end_of_string_constant(std::string_view sql, std::size_t at) noexcept {
  const std::size_t size = sql.size();
  if (at >= size) return at;
  bool escapes = false;
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

bool calls_session_set_config(std::string_view sql) {
  if (!contains_ignoring_case(sql, "set_config")) return false;
  const std::size_t size = sql.size();
  // The last top-level argument of the call whose '(' is at `open`, as written (trimmed).
  const auto last_argument = [&](std::size_t open) {
    int depth = 0;
    std::size_t from = open + 1;
    for (std::size_t at = open; at < size;) {
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
  };
  for (std::size_t at = 0; at < size;) {
    std::string word;
    if (const std::size_t after = end_of_comment(sql, at); after != at) {
      at = after;
      continue;
    }
    if (const std::size_t end = end_of_string_constant(sql, at); end != at) {
      at = end;
      continue;
    }
    if (sql[at] == '"') {
      at = end_of_quoted_identifier(sql, at, &word);
    } else if (is_sql_word_char(sql[at])) {
      for (; at < size && is_sql_word_char(sql[at]); ++at) {
        word += static_cast<char>(std::tolower(static_cast<unsigned char>(sql[at])));
      }
    } else {
      ++at;
      continue;
    }
    if (word != "set_config") continue;
    const std::size_t open = past_blanks_and_comments(sql, at);
    if (open >= size || sql[open] != '(') continue;
    std::string last = last_argument(open);
    for (char& c : last) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (last != "true") return true;
  }
  return false;
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

bool calls_session_advisory_lock(std::string_view sql) {
  // (Most statements name no advisory function at all: one case-blind search settles those; a
  // U&"..." identifier may spell it with escapes.)
  if (!contains_ignoring_case(sql, "advisory") && !contains_ignoring_case(sql, "u&")) {
    return false;
  }
  const auto is_session_lock = [](std::string_view word) {
    static constexpr std::array<std::string_view, 7> names{
        "pg_advisory_lock",      "pg_advisory_lock_shared",
        "pg_try_advisory_lock",  "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",    "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all"};
    return std::find(names.begin(), names.end(), word) != names.end();
  };
  std::size_t at = 0;
  const std::size_t size = sql.size();
  const auto called_at = [&sql, size](std::size_t after_name) {
    const std::size_t next = past_blanks_and_comments(sql, after_name);
    return next < size && sql[next] == '(';
  };
  while (at < size) {
    const char c = sql[at];
    if (const std::size_t after = end_of_comment(sql, at); after != at) {
      at = after;
    } else if (const std::size_t constant_end = end_of_string_constant(sql, at);
               constant_end != at) {
      at = constant_end;
    } else if (c == '"') {  // a quoted identifier: its exact text
      std::string identifier;
      at = end_of_quoted_identifier(sql, at, &identifier);
      if (is_session_lock(identifier) && called_at(at)) return true;
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
      if (is_session_lock(decode_unicode_escapes(identifier, escape)) && called_at(at)) {
        return true;
      }
    } else if (is_sql_word_char(c)) {  // (a parameter such as $1 too)
      std::string word;
      while (at < size && is_sql_word_char(sql[at])) {
        word += static_cast<char>(std::tolower(static_cast<unsigned char>(sql[at])));
        ++at;
      }
      if (is_session_lock(word) && called_at(at)) return true;
    } else {
      ++at;
    }
  }
  return false;
}

}  // namespace pgrt
