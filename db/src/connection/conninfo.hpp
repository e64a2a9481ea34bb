#pragma once

// The conninfo, as libpq parses it: for Connection::Impl::connect() (connect.cpp).

#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace pgrt {

// libpq's `options` startup parameter separates arguments at white space; escapes it (and the
// backslash, and every byte above 0x7f, which a server's locale may take for white space).
std::string escape_option_value(std::string_view value);

std::vector<std::string> split_hosts(const std::string& hosts);

struct ParsedConninfo {
  bool valid = false;
  std::unordered_map<std::string, std::string> values;
  [[nodiscard]] std::string get(const std::string& keyword, const char* env) const {
    if (auto it = values.find(keyword); it != values.end()) return it->second;
    const char* from_env = env != nullptr ? std::getenv(env) : nullptr;
    return from_env != nullptr ? from_env : "";
  }
};

// libpq's keywords and values; valid is false when libpq cannot parse it. load_balance_hosts is
// among them whatever the libpq (take_load_balance_hosts()).
ParsedConninfo parse_conninfo(const std::string& conninfo);

// Takes libpq 16's load_balance_hosts out of `conninfo` (key=value or URL) and returns its value
// (the last one given), or nullopt when it gives none. pgrt applies it itself (connect(): it
// hands libpq one host at a time, so libpq's own shuffle would change nothing), and libpq 15
// refuses the keyword. A key=value text libpq would refuse for another reason is left as it is.
std::optional<std::string> take_load_balance_hosts(std::string& conninfo);

// Why a load_balance_hosts value is refused (libpq 16 takes "disable" and "random" only), or ""
// when it is one of those (or empty: the default). Quotes the value only if it is a plain word.
std::string load_balance_hosts_problem(std::string_view value);

// A conninfo that libpq cannot parse, in a form safe for any message or log: libpq's non-secret
// keywords keep their values; every other value, every unknown keyword that is not a plain word,
// and every word without '=' (it may be part of a password) is "****". A URL keeps its scheme only.
std::string redact_unparsable_conninfo(std::string_view conninfo);

// A URL whose user name or password holds an unencoded '@', '/' or ':' that libpq parses into the
// host, port or database name (where a connect error would show it).
bool url_credentials_misread(std::string_view conninfo);

// Whether a host list (the conninfo's `host`, or PGHOST) looks like a connection URL or a user's
// credentials pasted where a host belongs ("postgresql://app:secret@db/app", "app:secret@db"):
// a host name never holds "://", nor an '@' but at the start of an abstract socket ("@name").
// Such a host is never looked up, nor quoted: it may hold a password.
bool host_holds_credentials(std::string_view hosts);

// Whether a database or user name is a whole conninfo pasted there: a connection URL (it holds
// "postgresql://" or "postgres://" in any case: a JDBC URL too), a password's "password=" in any
// case, or key=value pairs libpq parses. libpq expands none of them there: it would reach the
// server as the name, password and all. (Any other text is a valid name.)
bool name_holds_a_conninfo(std::string_view name);

// Whether the value of conninfo keyword `keyword` may hold a password where none belongs: a host,
// a host address or a service name (host_holds_credentials()), a database name
// (name_holds_a_conninfo()), a user name (the same, or "app:s3cret@db"). Never shown.
bool value_holds_credentials(std::string_view keyword, std::string_view value);

// Why `conninfo` cannot be parsed (or, a URL, is misread: url_credentials_misread()), redacted
// ("the conninfo could not be parsed: host=db PASSWORD=****: \"PASSWORD\" is not a keyword
// (keywords are lower case: \"password\")"), or "" when libpq parses it. Never quotes libpq's own
// message: it may quote a password.
std::string conninfo_problem(std::string_view conninfo);

}  // namespace pgrt
