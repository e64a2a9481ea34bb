#include "conninfo.hpp"

#include <cstdlib>
#include <libpq-fe.h>

#include "impl.hpp"

namespace pgrt {

std::string escape_option_value(std::string_view value) {
  std::string escaped;
  for (char c : value) {
    if (c == ' ' || c == '\\') escaped += '\\';
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

ParsedConninfo parse_conninfo(const std::string& conninfo) {
  ParsedConninfo parsed;
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  PQfreemem(error);  // may quote the password: never shown
  if (options == nullptr) return parsed;
  parsed.valid = true;
  for (const PQconninfoOption* option = options; option->keyword != nullptr; ++option) {
    if (option->val != nullptr) parsed.values.emplace(option->keyword, option->val);
  }
  PQconninfoFree(options);
  return parsed;
}

bool mentions_password(std::string_view conninfo) {
  if (contains(conninfo, "password")) return true;
  auto scheme = conninfo.find("://");
  if (scheme == std::string_view::npos) return false;
  auto at = conninfo.find('@', scheme);
  auto colon = conninfo.find(':', scheme + 3);
  return at != std::string_view::npos && colon != std::string_view::npos && colon < at;
}

}  // namespace pgrt
