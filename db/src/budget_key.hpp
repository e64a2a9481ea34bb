#pragma once

// The check of a budget key, shared by PoolConfig (budget.key, PGRT_BUDGET_KEY) and pgrt-diag
// budget (--key, PGRT_BUDGET_KEY), so that the tool lists the budget the service would join.

#include <algorithm>
#include <string>
#include <string_view>

namespace pgrt::detail {

inline bool is_control_character(char c) {
  return static_cast<unsigned char>(c) < 0x20 || c == '\x7f';  // (the same in every locale)
}

// What is wrong with a budget key, or "": white space at either end or a control character
// anywhere would silently make another budget than the one the other processes share.
inline std::string budget_key_problem(std::string_view key) {
  if (std::any_of(key.begin(), key.end(), is_control_character)) {
    return "holds a control character";
  }
  if (!key.empty() && (key.front() == ' ' || key.back() == ' ')) {
    return "starts or ends with a space";
  }
  return {};
}

inline constexpr const char* budget_key_hint =
    "give the key every process sharing the budget gives, without white space at either end or "
    "control characters (a stray space, or a CRLF file's \\r, makes another budget)";

// A key as an error message shows it: control characters as \xNN.
inline std::string shown_budget_key(std::string_view key) {
  std::string out;
  for (const char c : key) {
    if (is_control_character(c)) {
      constexpr std::string_view digits = "0123456789abcdef";
      out += "\\x";
      out += digits[static_cast<unsigned char>(c) >> 4];
      out += digits[static_cast<unsigned char>(c) & 0xf];
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace pgrt::detail
