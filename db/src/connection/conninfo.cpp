#include "conninfo.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <libpq-fe.h>
#include <map>
#include <memory>
#include <optional>

#include "impl.hpp"

namespace pgrt {

std::string escape_option_value(std::string_view value) {
  // The server splits the `options` start-up parameter at any white space (pg_split_opts():
  // isspace() in the server's locale, which may take a byte above 0x7f for one), and a backslash
  // keeps the next byte, whatever it is.
  std::string escaped;
  for (char c : value) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '\\' || std::isspace(byte) != 0 || byte > 0x7f) escaped += '\\';
    escaped += c;
  }
  return escaped;
}

std::vector<std::string> split_hosts(const std::string& hosts) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (;;) {
    auto comma = hosts.find(',', start);
    parts.push_back(hosts.substr(start, comma - start));
    if (comma == std::string::npos) return parts;
    start = comma + 1;
  }
}

namespace {

bool is_space(char c) {
  return std::isspace(static_cast<unsigned char>(c)) != 0;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decoded(std::string_view text) {
  std::string decoded;
  for (std::size_t at = 0; at < text.size(); ++at) {
    if (text[at] == '%' && at + 2 < text.size() && hex_digit(text[at + 1]) >= 0 &&
        hex_digit(text[at + 2]) >= 0) {
      decoded += static_cast<char>(hex_digit(text[at + 1]) * 16 + hex_digit(text[at + 2]));
      at += 2;
    } else {
      decoded += text[at];
    }
  }
  return decoded;
}

}  // namespace

std::optional<std::string> take_load_balance_hosts(std::string& conninfo) {
  static constexpr std::string_view keyword = "load_balance_hosts";
  std::optional<std::string> value;
  if (conninfo.starts_with("postgresql://") || conninfo.starts_with("postgres://")) {
    // (The query starts after the hosts: libpq ends the credentials at the first '@' or '/', so a
    // '?' before that '@' is the password's.)
    const std::size_t scheme_end = conninfo.find("://") + 3;
    const std::size_t credentials_end = conninfo.find_first_of("@/", scheme_end);
    const std::size_t hosts =
        credentials_end != std::string::npos && conninfo[credentials_end] == '@'
            ? credentials_end + 1
            : scheme_end;
    const std::size_t query = conninfo.find('?', hosts);
    if (query == std::string::npos) return value;
    std::string kept;
    std::string_view rest = std::string_view(conninfo).substr(query + 1);
    while (!rest.empty()) {
      const std::string_view parameter = rest.substr(0, rest.find('&'));
      rest.remove_prefix(std::min(rest.size(), parameter.size() + 1));
      const std::size_t equals = parameter.find('=');
      if (equals != std::string_view::npos &&
          percent_decoded(parameter.substr(0, equals)) == keyword) {
        value = percent_decoded(parameter.substr(equals + 1));
        continue;
      }
      kept += (kept.empty() ? "" : "&") + std::string(parameter);
    }
    if (value) conninfo = conninfo.substr(0, kept.empty() ? query : query + 1) + kept;
    return value;
  }
  // key=value pairs, read as libpq reads them; a text it would refuse is left as it is.
  std::vector<std::pair<std::size_t, std::size_t>> cuts;  // [start, end) of each pair taken out
  std::size_t at = 0;
  const auto skip_spaces = [&] {
    while (at < conninfo.size() && is_space(conninfo[at])) ++at;
  };
  for (;;) {
    skip_spaces();
    if (at >= conninfo.size()) break;
    const std::size_t start = at;
    while (at < conninfo.size() && conninfo[at] != '=' && !is_space(conninfo[at])) ++at;
    const std::string name = conninfo.substr(start, at - start);
    skip_spaces();
    if (at >= conninfo.size() || conninfo[at] != '=') return std::nullopt;
    ++at;
    skip_spaces();
    std::string pair_value;
    if (at < conninfo.size() && conninfo[at] == '\'') {
      bool closed = false;
      for (++at; at < conninfo.size() && !closed; ++at) {
        if (conninfo[at] == '\\' && at + 1 < conninfo.size()) {
          pair_value += conninfo[++at];
        } else if (conninfo[at] == '\'') {
          closed = true;
        } else {
          pair_value += conninfo[at];
        }
      }
      if (!closed) return std::nullopt;
    } else {
      for (; at < conninfo.size() && !is_space(conninfo[at]); ++at) {
        if (conninfo[at] == '\\' && at + 1 < conninfo.size()) ++at;
        pair_value += conninfo[at];
      }
    }
    if (name == keyword) {
      value = std::move(pair_value);
      cuts.emplace_back(start, at);
    }
  }
  for (auto cut = cuts.rbegin(); cut != cuts.rend(); ++cut) {
    conninfo.erase(cut->first, cut->second - cut->first);
  }
  return value;
}

std::string load_balance_hosts_problem(std::string_view value) {
  if (value.empty() || value == "disable" || value == "random") return "";
  const bool plain = value.size() <= 20 && std::all_of(value.begin(), value.end(), [](char c) {
                       return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
                     });
  return "load_balance_hosts is " + (plain ? "\"" + std::string(value) + "\"" : "****") +
         ": it is disable (the default) or random";
}

ParsedConninfo parse_conninfo(const std::string& conninfo) {
  ParsedConninfo parsed;
  std::string text = conninfo;
  const std::optional<std::string> balance = take_load_balance_hosts(text);
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(text.c_str(), &error);
  PQfreemem(error);  // may quote the password: never shown
  if (options == nullptr) return parsed;
  parsed.valid = true;
  for (const PQconninfoOption* option = options; option->keyword != nullptr; ++option) {
    if (option->val != nullptr) parsed.values.emplace(option->keyword, option->val);
  }
  PQconninfoFree(options);
  if (balance) parsed.values["load_balance_hosts"] = *balance;
  return parsed;
}

namespace {

// libpq's keywords, each with whether its value is a secret (dispchar "*": password, sslpassword).
const std::map<std::string, bool, std::less<>>& known_keywords() {
  static const auto keywords = [] {
    std::map<std::string, bool, std::less<>> result;
    std::unique_ptr<PQconninfoOption, void (*)(PQconninfoOption*)> defaults(PQconndefaults(),
                                                                            PQconninfoFree);
    for (const PQconninfoOption* option = defaults.get(); option && option->keyword; ++option) {
      const bool secret = option->dispchar != nullptr && option->dispchar[0] == '*';
      result.emplace(option->keyword, secret);
    }
    result.emplace("password", true);  // whatever PQconndefaults() said
    return result;
  }();
  return keywords;
}

// Keywords of later libpq versions, with the version that added them: named as such (their
// values never shown: some are secrets) rather than hidden as a word that may be part of a value.
std::string_view newer_libpq_keyword(std::string_view keyword) {
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 13> newer{{
      {"require_auth", "16"},
      {"sslcertmode", "16"},
      {"gssdelegation", "16"},
      {"sslnegotiation", "17"},
      {"min_protocol_version", "18"},
      {"max_protocol_version", "18"},
      {"sslkeylogfile", "18"},
      {"scram_client_key", "18"},
      {"scram_server_key", "18"},
      {"oauth_issuer", "18"},
      {"oauth_client_id", "18"},
      {"oauth_client_secret", "18"},
      {"oauth_scope", "18"},
  }};
  for (const auto& [name, version] : newer) {
    if (name == keyword) return version;
  }
  return {};
}

std::string newer_keyword_problem(std::string_view keyword, std::string_view version) {
  const int here = PQlibVersion();
  return "\"" + std::string(keyword) + "\" is a keyword of libpq " + std::string(version) +
         " and later, and this program's libpq is " + std::to_string(here / 10000) + "." +
         std::to_string(here % 10000) + ": remove it, or build against a newer libpq";
}

std::string lower(std::string_view text) {
  std::string lowered(text);
  for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lowered;
}

bool plain_word(std::string_view text) {
  return !text.empty() && text.size() <= 40 && std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
  });
}

bool is_url(std::string_view conninfo) {
  return conninfo.starts_with("postgresql://") || conninfo.starts_with("postgres://");
}

std::string quoted_if_needed(const std::string& value) {
  if (!value.empty() && value.find_first_of(" '\\") == std::string::npos) return value;
  std::string quoted = "'";
  for (char c : value) {
    if (c == '\'' || c == '\\') quoted += '\\';
    quoted += c;
  }
  return quoted + "'";
}

// The key=value form read the way libpq reads it, redacted as it goes; `problems` gets what is
// wrong with it, naming keywords only (never a value or a word without '=').
std::string redact_pairs(std::string_view text, std::vector<std::string>& problems) {
  const auto& keywords = known_keywords();
  std::string redacted;
  std::size_t at = 0;
  auto skip_spaces = [&] {
    while (at < text.size() && std::isspace(static_cast<unsigned char>(text[at]))) ++at;
  };
  auto add = [&](const std::string& part) {
    if (!redacted.empty()) redacted += ' ';
    redacted += part;
  };
  for (;;) {
    skip_spaces();
    if (at >= text.size()) return redacted;
    const std::size_t keyword_start = at;
    while (at < text.size() && text[at] != '=' &&
           std::isspace(static_cast<unsigned char>(text[at])) == 0) {
      ++at;
    }
    const std::string_view keyword = text.substr(keyword_start, at - keyword_start);
    skip_spaces();
    if (at >= text.size() || text[at] != '=') {
      add("****");
      problems.emplace_back(
          "a word without \"=\" (hidden: a value with spaces needs single quotes, key='a b')");
      continue;
    }
    ++at;
    skip_spaces();
    std::string value;
    bool unclosed = false;
    if (at < text.size() && text[at] == '\'') {
      bool closed = false;
      for (++at; at < text.size(); ++at) {
        if (text[at] == '\\' && at + 1 < text.size()) {
          value += text[++at];
        } else if (text[at] == '\'') {
          closed = true;
          ++at;
          break;
        } else {
          value += text[at];
        }
      }
      if (!closed) {
        unclosed = true;
        problems.emplace_back("a quoted value is not closed");
      }
    } else {
      for (; at < text.size() && std::isspace(static_cast<unsigned char>(text[at])) == 0; ++at) {
        if (text[at] == '\\' && at + 1 < text.size()) ++at;
        value += text[at];
      }
    }
    const auto known = keywords.find(keyword);
    // An unknown keyword is shown only when it is a near miss (a case variant, or a password's
    // misspelling): any other word may be part of a value with an unquoted space.
    const bool near_miss =
        plain_word(keyword) &&
        (keywords.contains(lower(keyword)) || lower(keyword).find("pass") != std::string::npos ||
         lower(keyword).find("pwd") != std::string::npos);
    const std::string_view newer = known == keywords.end() ? newer_libpq_keyword(keyword) : "";
    const std::string shown_keyword =
        known != keywords.end() || near_miss || !newer.empty() ? std::string(keyword) : "****";
    // An unclosed quote swallows the rest of the string, other keywords' values included; a name
    // or host that holds a pasted conninfo is a password's place (value_holds_credentials()).
    const bool show_value = known != keywords.end() && !known->second && !unclosed &&
                            !value_holds_credentials(keyword, value);
    add(shown_keyword + "=" + (show_value ? quoted_if_needed(value) : "****"));
    if (known != keywords.end()) continue;
    if (!newer.empty()) {
      problems.push_back(newer_keyword_problem(keyword, newer));
    } else if (shown_keyword == "****") {
      problems.emplace_back(
          "a keyword that libpq does not know (hidden: it may be part of a value)");
    } else if (keywords.contains(lower(keyword))) {
      problems.emplace_back("\"" + shown_keyword +
                            "\" is not a keyword (keywords are lower case: \"" + lower(keyword) +
                            "\")");
    } else if (lower(keyword).find("pass") != std::string::npos ||
               lower(keyword).find("pwd") != std::string::npos) {
      problems.emplace_back("\"" + shown_keyword +
                            "\" is not a keyword (the password's is \"password\")");
    } else {
      problems.emplace_back("\"" + shown_keyword + "\" is not a keyword that libpq knows");
    }
  }
}

}  // namespace

bool url_credentials_misread(std::string_view conninfo) {
  if (!is_url(conninfo)) return false;
  const std::string_view rest = conninfo.substr(conninfo.find("://") + 3);
  // libpq takes the user name and password up to the first '@' before any '/' (a '?' does not
  // stop it): a password holding a '/' ends them early, and its rest lands in the path.
  const std::size_t authority_end = rest.find_first_of("/?");
  if (authority_end != std::string_view::npos && rest[authority_end] == '/') {
    const std::string_view path =
        rest.substr(authority_end, rest.find('?', authority_end) - authority_end);
    if (path.find('@') != std::string_view::npos) return true;
  }
  // A second '@' in the password, or an '@' in a query parameter after a host without user
  // information, puts what follows the first '@' into the host (a password's rest, or other
  // parameters: "db&password=..."); a ':' in the password, its start into the port.
  const ParsedConninfo parsed = parse_conninfo(std::string(conninfo));
  if (auto host = parsed.values.find("host"); host != parsed.values.end()) {
    if (host->second.find_first_of("@=&?[]") != std::string::npos) return true;
  }
  if (auto port = parsed.values.find("port"); port != parsed.values.end()) {
    return !std::all_of(port->second.begin(), port->second.end(), [](char c) {
      return std::isdigit(static_cast<unsigned char>(c)) != 0 || c == ',';
    });
  }
  return false;
}

bool name_holds_a_conninfo(std::string_view name) {
  // A connection URL in any case and behind any prefix (POSTGRESQL://, jdbc:postgresql://), or a
  // password's parameter ("app?password=..."). (Another "://" is a name's: "tenant://eu-1".)
  const std::string lowered = lower(name);
  for (const char* part : {"postgresql://", "postgres://", "password="}) {
    if (lowered.find(part) != std::string::npos) return true;
  }
  return name.find('=') != std::string_view::npos && parse_conninfo(std::string(name)).valid;
}

bool host_holds_credentials(std::string_view hosts) {
  for (const std::string& host : split_hosts(std::string(hosts))) {
    if (host.find("://") != std::string::npos) return true;
    if (!host.starts_with('/') && host.find('@', 1) != std::string::npos) return true;
  }
  return false;
}

bool value_holds_credentials(std::string_view keyword, std::string_view value) {
  // (A host address is an IP address, a service a plain name: neither has "://" or an '@'.)
  if (keyword == "host" || keyword == "hostaddr" || keyword == "service") {
    return host_holds_credentials(value);
  }
  if (keyword == "dbname") return name_holds_a_conninfo(value);
  if (keyword == "user") {
    // Also credentials without a scheme, "app:s3cret@db" (a ':' before an '@').
    const std::size_t colon = value.find(':');
    return name_holds_a_conninfo(value) ||
           (colon != std::string_view::npos && value.find('@', colon) != std::string_view::npos);
  }
  return false;
}

std::string redact_unparsable_conninfo(std::string_view conninfo) {
  if (is_url(conninfo)) return std::string(conninfo.substr(0, conninfo.find("://") + 3)) + "****";
  std::vector<std::string> problems;
  return redact_pairs(conninfo, problems);
}

namespace {

// A connection URL slipped into a form libpq does not read as one, which it would parse as
// key=value words ("a word without \"=\"", which says nothing of the slip): what it looks like and
// what to give instead. Never quotes it (it may hold a password). Empty: none of these.
std::string url_slip_problem(std::string_view conninfo) {
  constexpr std::string_view url_form = "postgresql://user:password@host:port/dbname";
  std::string_view rest = conninfo;
  while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.front())) != 0) {
    rest.remove_prefix(1);
  }
  const bool blank_before = rest.size() != conninfo.size();
  std::string lowered(rest.substr(0, std::min<std::size_t>(rest.size(), 32)));
  std::transform(lowered.begin(), lowered.end(), lowered.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (!rest.empty() && (rest.front() == '"' || rest.front() == '\'') && is_url(rest.substr(1))) {
    return "the conninfo is a connection URL in quotes (an env file or a YAML value that kept "
           "them: they are part of the value): remove the quotes, giving " +
           std::string(url_form);
  }
  if (blank_before && is_url(rest)) {
    return "the conninfo is a connection URL with a blank before it (libpq reads a URL only from "
           "the first character): remove the blank, giving " +
           std::string(url_form);
  }
  if (lowered.starts_with("jdbc:postgresql:")) {
    return "the conninfo is a JDBC URL, which libpq does not take: drop the \"jdbc:\" prefix, "
           "giving " +
           std::string(url_form) +
           " (JDBC's own parameters are not libpq's: ssl=true is sslmode=require)";
  }
  if ((lowered.starts_with("postgresql+") || lowered.starts_with("postgres+")) &&
      lowered.find("://") != std::string::npos) {
    return "the conninfo is a SQLAlchemy URL (with its driver after \"+\"), which libpq does not "
           "take: drop the \"+driver\", giving " +
           std::string(url_form);
  }
  return "";
}

}  // namespace

std::string conninfo_problem(std::string_view original) {
  // load_balance_hosts is pgrt's own (connect()): its value checked here, the rest by libpq.
  std::string without_balance(original);
  if (auto balance = take_load_balance_hosts(without_balance)) {
    if (auto problem = load_balance_hosts_problem(*balance); !problem.empty()) return problem;
  }
  const std::string_view conninfo = without_balance;
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(std::string(conninfo).c_str(), &error);
  PQfreemem(error);  // may quote the password: never shown
  if (options != nullptr) {
    PQconninfoFree(options);
    if (url_credentials_misread(conninfo)) {
      return "the connection URL has a character where libpq reads the host, port or database "
             "name out of the user name or password (" +
             redact_unparsable_conninfo(conninfo) +
             "): percent-encode the reserved characters in the user name and password (@ is %40, "
             "/ is %2F, : is %3A)";
    }
    return "";
  }
  if (is_url(conninfo)) {
    // A parameter only a later libpq knows: say so, not "check the form".
    const auto& keywords = known_keywords();
    if (const std::size_t query = conninfo.find('?'); query != std::string_view::npos) {
      std::string_view rest = conninfo.substr(query + 1);
      while (!rest.empty()) {
        const std::string_view parameter = rest.substr(0, rest.find('&'));
        rest.remove_prefix(std::min(rest.size(), parameter.size() + 1));
        const std::string_view name = parameter.substr(0, parameter.find('='));
        const std::string_view version = newer_libpq_keyword(name);
        if (!version.empty() && !keywords.contains(name)) {
          return "the connection URL could not be parsed (" + redact_unparsable_conninfo(conninfo) +
                 "): " + newer_keyword_problem(name, version);
        }
      }
    }
    return "the connection URL could not be parsed (" + redact_unparsable_conninfo(conninfo) +
           "): check its form, postgresql://user:password@host:port/dbname?keyword=value, with "
           "reserved characters in the user name and password percent-encoded (@ is %40)";
  }
  if (auto slip = url_slip_problem(conninfo); !slip.empty()) return slip;
  std::vector<std::string> problems;
  std::string message = "the conninfo could not be parsed: " + redact_pairs(conninfo, problems);
  if (problems.empty()) problems.emplace_back("libpq refuses its form");
  if (problems.size() > 3) problems.resize(3);
  for (std::size_t i = 0; i < problems.size(); ++i) message += (i == 0 ? ": " : "; ") + problems[i];
  return message;
}

}  // namespace pgrt
