// What pgrt reads out of SQL text and server messages without a server: the first keyword that
// query() and the pooler checks refuse by, and the prepared-statement name in a 26000 message.
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "connection/impl.hpp"

namespace pgrt {
namespace {

// set_config() with a last argument other than true sets for the session (pending writes refuse
// it); with true, for the transaction. A word followed by '(', not a part of another name.
TEST(SqlText, SessionSetConfigIsTheCallWithoutTrueAsItsLastArgument) {
  EXPECT_TRUE(calls_session_set_config("SELECT set_config('a.b', 'c', false)"));
  EXPECT_TRUE(calls_session_set_config("select SET_CONFIG ('a.b', $1, $2)"));
  EXPECT_TRUE(calls_session_set_config(R"(SELECT "set_config"('a.b', 'c', false))"));
  EXPECT_TRUE(calls_session_set_config("SELECT set_config('a', f(1, true), false)"));
  EXPECT_FALSE(calls_session_set_config("SELECT set_config('app.user_id', $1, true)"));
  EXPECT_FALSE(calls_session_set_config("SELECT set_config('a', '(,', TRUE )"));
  EXPECT_FALSE(calls_session_set_config("INSERT INTO asset_config VALUES (1)"));
  EXPECT_FALSE(calls_session_set_config("SELECT 'set_config(1, 2, false)' -- set_config(x)"));
  EXPECT_FALSE(calls_session_set_config("SELECT reset_config_count FROM t"));
  EXPECT_TRUE(calls_session_set_config(R"(SELECT U&"set\005fconfig"('a.b', 'c', false))"))
      << "a U&\"...\" identifier with its escapes resolved";
}

// What needs a session of its own: refused by pending writes (in a batch transaction) and by
// query() (alone on a shared connection), with what each scope allows.
TEST(SqlText, WhatNeedsASessionOfItsOwnDependsOnWhereTheStatementRuns) {
  const auto batch = [](std::string_view sql) {
    return needs_own_session(sql, SessionScope::batch_transaction);
  };
  const auto shared = [](std::string_view sql) {
    return needs_own_session(sql, SessionScope::own_implicit_transaction);
  };
  for (const char* sql : {"COMMIT", " ;begin", "SET search_path TO x", "RESET ALL", "LISTEN c",
                          "COPY t FROM STDIN", "DECLARE c CURSOR FOR SELECT 1", "LOAD 'x'"}) {
    EXPECT_NE(batch(sql), "") << sql;
    EXPECT_NE(shared(sql), "") << sql;
  }
  EXPECT_EQ(batch("SET search_path TO x"), "'set'");
  // SET LOCAL ends with the batch's transaction; alone it would do nothing: refused there.
  EXPECT_EQ(batch("SET LOCAL lock_timeout = '1s'"), "");
  EXPECT_EQ(batch("set local_preload_libraries = ''"), "'set'") << "the next word read whole";
  EXPECT_EQ(shared("SET LOCAL lock_timeout = '1s'"), "'set'");
  EXPECT_EQ(batch("LOCK TABLE t"), "");
  EXPECT_EQ(shared("LOCK TABLE t"), "'lock'");
  EXPECT_EQ(batch("DO $$ BEGIN END $$"), "");
  EXPECT_EQ(shared("DO $$ BEGIN END $$"), "'do'");
  // Temporary objects live as long as the session.
  for (const char* sql :
       {"CREATE TEMP TABLE t (x int)", "create global temporary table t (x int)",
        "CREATE LOCAL TEMP SEQUENCE s", "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        "SELECT * INTO TEMP t FROM u", "select 1 into temporary table t",
        "WITH a AS (SELECT 1) SELECT * INTO TEMP \"T\" FROM a", "CREATE TABLE pg_temp.t (x int)",
        "INSERT INTO pg_temp.t VALUES (1)", R"(SELECT * FROM "pg_temp" . t)"}) {
    EXPECT_EQ(batch(sql), "a temporary table") << sql;
    EXPECT_EQ(shared(sql), "a temporary table") << sql;
  }
  EXPECT_EQ(shared("CREATE TEMP TABLE t (x int) ON COMMIT DROP"), "");
  EXPECT_EQ(batch("CREATE TEMP TABLE t (x int) ON COMMIT DROP"), "a temporary table")
      << "later writes that use it land in other transactions";
  for (const char* sql :
       {"CREATE TABLE temp (x int)", "INSERT INTO temp VALUES (1)", "SELECT 1 INTO temp FROM t",
        "SELECT 'CREATE TEMP TABLE t'", "WITH a AS (SELECT 1) INSERT INTO temp SELECT * FROM a",
        "SELECT temp FROM t", "CREATE TABLE t AS SELECT 1 -- temp",
        "SELECT * FROM pg_temp_stats"}) {
    EXPECT_EQ(batch(sql), "") << sql;
    EXPECT_EQ(shared(sql), "") << sql;
  }
  EXPECT_EQ(batch("SELECT set_config('a.b', 'c', false)"), "set_config() for the session");
  EXPECT_EQ(shared("SELECT set_config('a.b', 'c', false)"), "set_config() for the session");
  EXPECT_EQ(shared("SELECT set_config('a.b', $1, true), f()"), "");
  EXPECT_EQ(shared("SELECT pg_advisory_lock(1)"), "a session-level advisory lock");
  EXPECT_EQ(shared("SELECT pg_advisory_xact_lock(1)"), "");
  EXPECT_EQ(batch("INSERT INTO t VALUES (1)"), "");
}

// SET LOCAL transaction_read_only = off is harmless however many empty statements, blanks and
// comments follow it (the server's parser drops empty statements: it runs the same one
// statement); `off;;` was read as a value the check cannot tell, and refused. Anything after it
// that is a statement of its own (which could make the transaction read-only) is not read past:
// still refused.
TEST(SqlText, TransactionReadOnlyOffIsHarmlessWhateverEmptyStatementsFollowIt) {
  for (const char* sql : {
           "SET LOCAL transaction_read_only = off",
           "SET LOCAL transaction_read_only = off;",
           "SET LOCAL transaction_read_only = off;;",
           "SET LOCAL transaction_read_only = off ; ; ",
           "SET LOCAL transaction_read_only = 'off';;",
           "SET LOCAL transaction_read_only = \"off\";;",
           "SET LOCAL transaction_read_only TO false;\n-- done\n;\n",
           "SET LOCAL transaction_read_only = 0; /* c */ ;",
           ";; SET LOCAL transaction_read_only = off;;",
           "SET TRANSACTION READ WRITE;;",
       }) {
    EXPECT_EQ(transaction_read_only_setting(sql), ReadOnlySetting::none) << sql;
  }
  for (const char* sql : {
           "SET LOCAL transaction_read_only = on;;",
           "SET TRANSACTION READ ONLY;;",
           ";; SET LOCAL transaction_read_only = on",
       }) {
    EXPECT_EQ(transaction_read_only_setting(sql), ReadOnlySetting::read_only) << sql;
  }
  for (const char* sql : {
           "SET LOCAL transaction_read_only = off; SET TRANSACTION READ ONLY",
           "SET LOCAL transaction_read_only = off;; SET LOCAL transaction_read_only = on",
           "SET LOCAL transaction_read_only = off; SELECT 1",
           "SET LOCAL transaction_read_only = off;;x",
       }) {
    EXPECT_NE(transaction_read_only_setting(sql), ReadOnlySetting::none) << sql;
  }
}

// The rest of a text from its second statement: past a ';' at the top level only (a ';' in a
// string, a quoted name, a comment or parentheses is no end), and past the empty statements after
// it. Pending writes check each statement of a text (`INSERT ...; COMMIT` was accepted).
TEST(SqlText, AfterFirstStatementFindsTheSecondStatementOnlyAtTheTopLevel) {
  EXPECT_EQ(after_first_statement("INSERT INTO t VALUES (1); COMMIT"), "COMMIT");
  EXPECT_EQ(after_first_statement(";; insert into t values (1) ;;\n-- c\n ; commit ; x"),
            "commit ; x");
  EXPECT_EQ(after_first_statement("SELECT 1;/* ; */SELECT 2"), "SELECT 2");
  EXPECT_EQ(after_first_statement(after_first_statement("a; b; c")), "c");
  for (const char* one : {
           "INSERT INTO t VALUES (1)",
           "INSERT INTO t VALUES (1);",
           "INSERT INTO t VALUES (1) ;; -- done\n ;",
           "INSERT INTO t VALUES ('a; COMMIT')",
           "INSERT INTO t VALUES (E'a\\'; COMMIT')",
           "INSERT INTO \"a;b\" VALUES ($$;$$, $tag$ ; $tag$, $1)",
           "INSERT INTO t VALUES (1) -- ; COMMIT",
           "INSERT INTO t VALUES (1) /* ; /* ; */ COMMIT */",
           "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); DELETE FROM v)",
           "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); "
           "END",
           "",
           ";;",
       }) {
    EXPECT_EQ(after_first_statement(one), "") << one;
  }
}

// A function or procedure with an SQL-standard body (BEGIN ATOMIC ... END, PostgreSQL 14+) holds
// its statements' ';' inside the one CREATE statement, and a CASE in it ends with END too. The
// body was not looked into, nor anything after it: a statement after its END was not seen. As
// psql's lexer does, BEGIN ... END (and CASE ... END inside it) is tracked at the top level of a
// statement that starts CREATE [OR REPLACE] FUNCTION or PROCEDURE, and only there.
TEST(SqlText, AfterFirstStatementFindsTheStatementAfterABeginAtomicBody) {
  const std::string body =
      "CREATE OR REPLACE FUNCTION f(x int) RETURNS int LANGUAGE sql\n"
      "BEGIN ATOMIC\n"
      "  INSERT INTO t VALUES (x);\n"
      "  SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END;\n"
      "END";
  for (const std::string& one : std::vector<std::string>{
           body,
           body + ";",
           body + " ; -- done\n;",
           "create procedure p() language sql begin atomic insert into t values (1); end",
           "CREATE /* c */ FUNCTION f() RETURNS void LANGUAGE sql BEGIN /* ; */ ATOMIC "
           "INSERT INTO t VALUES ('end; commit'); END",
       }) {
    EXPECT_EQ(after_first_statement(one), "") << one;
  }
  EXPECT_EQ(after_first_statement(body + "; INSERT INTO t VALUES (2)"), "INSERT INTO t VALUES (2)");
  EXPECT_EQ(after_first_statement(body + ";\nCOMMIT"), "COMMIT");
  EXPECT_EQ(after_first_statement("CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT 1; END; "
                                  "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC "
                                  "SELECT 2; END"),
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 2; END");
  // A CASE ... END outside a BEGIN, a BEGIN in parentheses or in another statement: no body.
  EXPECT_EQ(after_first_statement("CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN CASE WHEN "
                                  "true THEN 1 END; COMMIT"),
            "COMMIT");
  EXPECT_EQ(after_first_statement("UPDATE t SET x = 'begin'; BEGIN"), "BEGIN");
  EXPECT_EQ(after_first_statement("SELECT begin FROM t; COMMIT"), "COMMIT");
}

// END (and BEGIN) after a '.' or AS is a column label, not the end of a body: a body that reads
// spans.end was cut there, and its next statement refused as a second one (a valid function
// refused by enqueue()).
TEST(SqlText, AColumnLabeledEndInABeginAtomicBodyDoesNotEndIt) {
  const std::string function =
      "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql BEGIN ATOMIC\n"
      "  UPDATE spans SET closed = true WHERE spans.end < now();\n"
      "  SELECT count(*) AS end FROM spans WHERE \"spans\".END IS NOT NULL;\n"
      "  SELECT (s).end FROM spans s;\n"
      "END";
  EXPECT_EQ(after_first_statement(function), "");
  EXPECT_EQ(after_first_statement(function + "; COMMIT"), "COMMIT");
}

// Where a string constant ends depends on the server: with standard_conforming_strings off, a
// backslash escapes in '...' too (`'it\'s; commit'` is one string), and a '...' continuing an
// E'...' across a newline is an escape string under any setting. A ';' that one reading finds at
// the top level and the other inside a string is no second statement to refuse a write for (an
// UPDATE of a legacy server's text was refused as a COMMIT); the server refuses a text of several
// statements at the flush anyway (42601).
TEST(SqlText, AfterFirstStatementSeesNoSecondStatementWhereAStringsEndDependsOnTheServer) {
  for (const char* one : {
           "UPDATE t SET note = 'it\\'s; commit later'",
           "UPDATE t SET note = E'a'\n'\\'; COMMIT; '",
           "UPDATE t SET note = N'x\\'; SET SESSION ROLE r -- '",
       }) {
    EXPECT_EQ(after_first_statement(one), "") << one;
  }
  // (Where both readings agree, the second statement is found.)
  EXPECT_EQ(after_first_statement("UPDATE t SET note = 'C:\\dir'; COMMIT"), "COMMIT");
  EXPECT_EQ(after_first_statement("UPDATE t SET note = 'plain'; COMMIT"), "COMMIT");
  EXPECT_EQ(after_first_statement("UPDATE t SET note = E'it\\'s'; COMMIT"), "COMMIT");
  EXPECT_EQ(after_first_statement("UPDATE t SET note = 'a\\\\b'; COMMIT"), "COMMIT");
}

TEST(FirstKeyword, SkipsWhitespaceEmptyStatementsAndCommentsTheWayTheServerDoes) {
  EXPECT_EQ(first_keyword("  SELECT 1"), "select");
  EXPECT_EQ(first_keyword(";BEGIN"), "begin");
  EXPECT_EQ(first_keyword(" ; ;\n\tSet x = 1"), "set");
  EXPECT_EQ(first_keyword("/* a /* nested */ still a comment */ BEGIN"), "begin");
  EXPECT_EQ(first_keyword("-- a line\nLISTEN x"), "listen");
  EXPECT_EQ(first_keyword("-- ended by a carriage return\rCOMMIT"), "commit");
  EXPECT_EQ(first_keyword("/* never closed BEGIN"), "");
  EXPECT_EQ(first_keyword("-- only a comment"), "");
  EXPECT_EQ(first_keyword("(SELECT 1)"), "");
  EXPECT_EQ(first_keyword("CoPy t FROM STDIN"), "copy");
  EXPECT_EQ(first_keyword("begin;"), "begin");
  EXPECT_EQ(first_keyword("\xc3\xa9t SELECT"), "") << "a non-ASCII byte is no keyword letter";
}

TEST(SqlText, StringConstantsAndQuotedIdentifiersEndWhereTheServersLexerEndsThem) {
  const auto end_of = [](std::string_view sql) { return end_of_string_constant(sql, 0); };
  EXPECT_EQ(end_of("'it''s' x"), 7U);
  EXPECT_EQ(end_of(R"(E'it\'s' x)"), 8U);
  EXPECT_EQ(end_of(R"('a\' x)"), 4U) << "a backslash escapes nothing outside E''";
  EXPECT_EQ(end_of("$$ a ' b $$ x"), 11U);
  EXPECT_EQ(end_of("$body$ $$ $body$ x"), 16U);
  EXPECT_EQ(end_of("$1 + 1"), 0U) << "a parameter is no constant";
  EXPECT_EQ(end_of("'never closed"), 13U);
  EXPECT_EQ(end_of("x'1F' y"), 5U) << "a hex bit string";
  EXPECT_EQ(end_of("B'101' y"), 6U) << "a bit string";
  EXPECT_EQ(end_of("N'it''s' y"), 8U) << "a national character string";
  EXPECT_EQ(end_of(R"(U&'d\0061t''a' y)"), 14U) << "a Unicode-escaped string: '' is its quote";
  EXPECT_EQ(end_of("u&'x' y"), 5U);
  EXPECT_EQ(end_of("U&x"), 0U);
  EXPECT_EQ(end_of("xy'a'"), 0U) << "only one letter makes a prefix";
  std::string text;
  EXPECT_EQ(end_of_quoted_identifier(R"("a""b" x)", 0, &text), 6U);
  EXPECT_EQ(text, R"(a"b)");
  EXPECT_EQ(end_of_quoted_identifier("abc", 0), 0U);
  EXPECT_EQ(quote_identifier(R"(De"ploy)"), R"("De""ploy")");
  const std::string requoted = quote_identifier(R"(a""b c)");
  std::string read_back;
  EXPECT_EQ(end_of_quoted_identifier(requoted, 0, &read_back), requoted.size());
  EXPECT_EQ(read_back, R"(a""b c)") << "quoting then reading back gives the name";
  EXPECT_TRUE(contains_ignoring_case("SELECT PG_Advisory_Lock(1)", "advisory"));
  EXPECT_FALSE(contains_ignoring_case("SELECT 1", "advisory"));
}

TEST(SqlText, ASessionAdvisoryLockSpelledWithUnicodeEscapesIsStillSeen) {
  EXPECT_TRUE(calls_session_advisory_lock(R"(SELECT U&"pg_advisory\005flock"(43))"));
  EXPECT_TRUE(calls_session_advisory_lock(R"(SELECT u&"pg_\0061dvisory_lock" (1))"))
      << "no \"advisory\" in the text at all";
  EXPECT_TRUE(calls_session_advisory_lock(R"(SELECT U&"pg_advisory!+00005Flock" UESCAPE '!' (1))"));
  EXPECT_TRUE(calls_session_advisory_lock(R"(SELECT pg_catalog.U&"pg_advisory_unlock_all"())"));
  EXPECT_FALSE(calls_session_advisory_lock(R"(SELECT U&"PG_ADVISORY_LOCK"(1))"))
      << "a quoted identifier keeps its case: no such function";
  EXPECT_FALSE(calls_session_advisory_lock(R"(SELECT U&"pg_advisory\005flock" FROM t)"))
      << "named, not called";
  EXPECT_FALSE(calls_session_advisory_lock(R"(SELECT U&'pg_advisory\005flock(1)')"))
      << "a string constant";
}

TEST(ForgotStatement, FindsOurNameInTheServersMessageInAnyLanguage) {
  const auto forgotten = make_sqlstate_error("26000");
  const std::string name = "pgrt_5f3a_12";
  const auto said = [&](std::string message) {
    return forgot_statement(forgotten, Diagnostics{.message = std::move(message)}, name);
  };
  EXPECT_TRUE(said("prepared statement \"pgrt_5f3a_12\" does not exist"));
  EXPECT_TRUE(said("vorbereitete Anweisung \u00bbpgrt_5f3a_12\u00ab existiert nicht"));
  EXPECT_TRUE(said("l'instruction pr\u00e9par\u00e9e \u00ab pgrt_5f3a_12 \u00bb n'existe pas"));
  EXPECT_FALSE(said("prepared statement \"pgrt_5f3a_123\" does not exist")) << "another name";
  EXPECT_FALSE(said("prepared statement \"xpgrt_5f3a_12\" does not exist")) << "another name";
  EXPECT_FALSE(forgot_statement(make_sqlstate_error("42P01"),
                                Diagnostics{.message = "\"pgrt_5f3a_12\""}, name));
  EXPECT_FALSE(forgot_statement(forgotten, Diagnostics{.message = "\"\" does not exist"}, ""));
}

}  // namespace
}  // namespace pgrt
