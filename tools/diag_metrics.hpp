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

// argv[1] is "metrics". Returns the exit code.
int run_metrics(int argc, char** argv);

}  // namespace pgrt::diag
