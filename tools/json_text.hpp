#pragma once

// JSON text for pgrt-diag's --json reports (internal; unit-tested in
// tests/unit/diag_text_test.cpp).

#include <string>
#include <string_view>

#include "utf8_text.hpp"  // (db/src)

namespace pgrt::diag {

// `text` as a JSON string: valid UTF-8 (an invalid byte becomes U+FFFD, as
// pgrt::detail::valid_utf8()), '"' and '\\' escaped, and control characters (U+0000-U+001F)
// escaped as \n, \t, \r or \u00XX; the rest (DEL, C1 controls) as it is, as JSON allows.
inline std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (const char c : pgrt::detail::valid_utf8(text)) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else if (byte < 0x20) {
      constexpr std::string_view digits = "0123456789abcdef";
      out += "\\u00";
      out += digits[byte >> 4];
      out += digits[byte & 0xf];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace pgrt::diag
