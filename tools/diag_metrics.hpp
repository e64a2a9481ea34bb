#pragma once

// pgrt-diag metrics URL (diag_metrics.cpp).

#include <string>
#include <string_view>

namespace pgrt::diag {

// Text from a server or an endpoint (an application_name any client sets, a database's name, a
// label value) as a report shows it: valid UTF-8, each invalid sequence (any bytes at all come
// from a SQL_ASCII database's names) replaced by U+FFFD as in --json (pgrt::detail::valid_utf8());
// then control characters, a line break included, and C1 controls (U+0080-U+009F: a terminal may
// take U+009B for an escape) become '?'.
// `keep_line_breaks`: '\n' stays (an error's message, whose lines are pgrt's own, with a server's
// text in them).
std::string printable(std::string_view text, bool keep_line_breaks = false);

// An argument pgrt-diag (or one of its commands) does not know, as its refusal may show it:
// quoted and printable(); one that may hold a password (a URL with credentials, a conninfo's
// password=, another secret's name, a one-letter option with a value such as mysql's -ps3cret)
// is named, not shown: "(not shown: it may hold a password)", after its option name if it has one.
std::string shown_argument(std::string_view argument);

// argv[1] is "metrics". Returns the exit code.
int run_metrics(int argc, char** argv);

}  // namespace pgrt::diag
