#pragma once

// Reading SQL text the way the server's lexer does, as far as pgrt needs without a server: where a
// comment or a string constant ends, the first keyword. One place for the rules (nested block
// comments, '' inside a constant, E'' escapes, $tag$ quoting), used by query()'s refusals and
// advisory-lock check, the pipeline's COPY check and the redaction of passwords in messages.

#include <cstddef>
#include <string>
#include <string_view>

namespace pgrt {

// A character of an identifier or keyword: a letter, digit, '_' or '$', or any byte of a
// non-ASCII character.
bool is_sql_word_char(char c) noexcept;

// Where the comment (`--` to the end of the line, or a nested `/* */`) that starts at `at` ends:
// the index after it (sql.size() for one left open); `at` itself when none starts there.
std::size_t end_of_comment(std::string_view sql, std::size_t at) noexcept;

// The index of the first character at or after `at` that is neither white space nor in a comment
// (sql.size() if none).
std::size_t past_blanks_and_comments(std::string_view sql, std::size_t at) noexcept;

// Where the string constant that starts at `at` ends ('...' with '' inside it, E'...' with
// backslash escapes, U&'...', N'...', B'...', X'...', $$...$$ or $tag$...$tag$): the index after
// it (sql.size() for one left open); `at` itself when none starts there (a parameter such as $1
// is none). `at` must not be in the middle of a word: the E of E'...' is its prefix only as a
// word of its own. With `backslash_escapes`, a backslash escapes in every '...' (as with
// standard_conforming_strings off, and in a '...' continuing an E'...' across a newline).
std::size_t end_of_string_constant(std::string_view sql, std::size_t at,
                                   bool backslash_escapes = false) noexcept;

// Where the quoted identifier ("...", with "" inside it) that starts at `at` ends: the index after
// it (sql.size() for one left open); `at` itself when none starts there. Its text, unquoted, goes
// to `text` when given.
std::size_t end_of_quoted_identifier(std::string_view sql, std::size_t at,
                                     std::string* text = nullptr);

// `name` as a quoted identifier: in double quotes, a quote in it doubled ("Deploy", "a""b").
std::string quote_identifier(std::string_view name);

// Whether `text` holds `lower_case_part` in any case (ASCII).
bool contains_ignoring_case(std::string_view text, std::string_view lower_case_part) noexcept;

// Throws Error(client_errc::conversion) if the statement's text holds a NUL byte: libpq sends SQL
// text up to its first NUL, so the server would run only what comes before it.
void check_statement_text(std::string_view sql);

// Whether `sql` calls a session-level advisory lock function (pg_advisory_lock, its _shared and
// try_ variants, pg_advisory_unlock and its variants): the name as a word of the statement, not
// inside a string constant, a dollar-quoted string or a comment, nor part of a longer name
// (pg_advisory_xact_lock, whose lock ends with the statement's implicit transaction, is fine),
// followed by '(' (past blanks and comments): a column or alias of that name is no call. A quoted
// identifier counts by its exact text; an unquoted word in any case. A guard against a mistake,
// not a boundary: a function or DO block that takes the lock inside is not seen.
bool calls_session_advisory_lock(std::string_view sql);

// Whether `sql` calls set_config() other than with `true` as its last argument (which sets for
// the transaction only): it then sets for the session, as SET does. A word (or quoted identifier)
// set_config followed by '('; strings and comments are skipped. A guard against a mistake, not a
// boundary: a function or DO block that calls it inside is not seen.
bool calls_session_set_config(std::string_view sql);

// What a statement does to its transaction's read-only setting, for
// transaction_read_only_setting().
enum class ReadOnlySetting {
  none,       // nothing that makes it read-only (SET LOCAL transaction_read_only = off included)
  read_only,  // SET TRANSACTION ... READ ONLY, SET LOCAL transaction_read_only to a true value
  unknown,    // SET LOCAL transaction_read_only to a value not read here (DEFAULT, a list, ...)
};

// Whether `sql` makes its transaction read-only: SET TRANSACTION ... READ ONLY, or SET LOCAL
// transaction_read_only (its name in any case, quoted or not) to a value PostgreSQL's boolean
// parsing reads as true. Its value is read as the server does (case-blind; a word, a quoted
// identifier, a plain '...' string or a number: off, false, no, 0 and the prefixes the server
// takes of them are false; on, true, yes, 1 and theirs are true); any other value (DEFAULT, a
// list, an E'...' or dollar-quoted string, a signed number, a word the server would refuse) is
// `unknown`. Empty statements, blanks and comments after the value are harmless (the server
// drops them); a statement of its own after it is `unknown`. In a batch transaction, every write
// after a read-only setting would fail with 25006. Strings and comments are skipped. A guard
// against a mistake, not a boundary: set_config('transaction_read_only', ...) and functions that
// set it are not seen.
ReadOnlySetting transaction_read_only_setting(std::string_view sql);

// Where a statement runs, for needs_own_session().
enum class SessionScope {
  batch_transaction,         // in a transaction with other statements (pending writes)
  own_implicit_transaction,  // alone, on a connection other callers share (Pool::query())
};

// What in `sql` needs a session of its own, as the message names it ("'commit'", "'set'",
// "a temporary table", "set_config() for the session", "a session-level advisory lock"); "" for
// nothing. Refused: transaction control, session state (SET, RESET, LISTEN, PREPARE, DISCARD,
// LOAD, cursors, temporary tables, set_config() without `true`, session advisory locks) and
// COPY. In a batch transaction SET LOCAL, SET CONSTRAINTS and SET TRANSACTION are fine; alone,
// LOCK and DO are refused too, and a temporary table ON COMMIT DROP is fine. A guard against a
// mistake, not a boundary: what functions and DO blocks do inside is not seen.
std::string needs_own_session(std::string_view sql, SessionScope scope);

// The rest of `sql` from its second statement on: past the first statement's ';' at the top
// level (not in a comment, a string constant, a quoted identifier or parentheses) and the empty
// statements, blanks and comments after it; "" for a text of one statement (empty statements
// before or after it included). A routine's SQL-standard body (BEGIN ATOMIC ...; ... END), whose
// statements end with ';' inside the one CREATE statement, is no end either: as psql's lexer does,
// BEGIN ... END (and CASE ... END inside it) is tracked outside parentheses in a statement that
// starts CREATE [OR REPLACE] FUNCTION or PROCEDURE. A text whose
// first ';' at the top level depends on the server (a backslash in a '...': it escapes with
// standard_conforming_strings off, or in a '...' continuing an E'...'): "". A guard against a
// mistake, not a boundary. The first statement is sql.substr(0, sql.size() - rest.size()).
std::string_view after_first_statement(std::string_view sql) noexcept;

// The statement's first keyword, lower case, after white space, empty statements (`;`) and
// comments ("" if none); `end`, if given, gets the offset just past it (for the next keyword:
// first_keyword(sql.substr(end))).
std::string first_keyword(std::string_view sql, std::size_t* end = nullptr);

}  // namespace pgrt
