#pragma once

// Text from elsewhere (a server's names, a name given in the environment) made valid UTF-8 for
// formats that require it: the Prometheus exposition format, JSON (internal, header-only; used
// by service/ and tools/).

#include <cstddef>
#include <string>
#include <string_view>

namespace pgrt::detail {

// `text` with every byte sequence that is not well-formed UTF-8 (RFC 3629: no overlong forms, no
// surrogates, nothing above U+10FFFF, nothing cut short) replaced with U+FFFD, one for each
// maximal ill-formed subpart (as Unicode recommends, and as browsers decode); the rest as it is.
inline std::string valid_utf8(std::string_view text) {
  constexpr std::string_view replacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(text.size());
  std::size_t at = 0;
  while (at < text.size()) {
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
    const unsigned char lead = byte(at);
    if (lead < 0x80) {
      out += text[at++];
      continue;
    }
    // The length of the sequence `lead` starts, and the range of its second byte.
    std::size_t length = 0;
    unsigned char low = 0x80;
    unsigned char high = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead == 0xE0) {
      length = 3;
      low = 0xA0;  // (no overlong form)
    } else if (lead == 0xED) {
      length = 3;
      high = 0x9F;  // (no surrogate)
    } else if (lead >= 0xE1 && lead <= 0xEF) {
      length = 3;
    } else if (lead == 0xF0) {
      length = 4;
      low = 0x90;  // (no overlong form)
    } else if (lead >= 0xF1 && lead <= 0xF3) {
      length = 4;
    } else if (lead == 0xF4) {
      length = 4;
      high = 0x8F;  // (nothing above U+10FFFF)
    }
    std::size_t good = length == 0 ? 0 : 1;  // the bytes of a well-formed start
    while (good < length && at + good < text.size()) {
      const unsigned char next = byte(at + good);
      if (next < (good == 1 ? low : 0x80) || next > (good == 1 ? high : 0xBF)) break;
      ++good;
    }
    if (length != 0 && good == length) {
      out += text.substr(at, length);
    } else {
      out += replacement;
    }
    at += good == 0 ? 1 : good;
  }
  return out;
}

}  // namespace pgrt::detail
