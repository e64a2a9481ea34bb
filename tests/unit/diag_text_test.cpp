// pgrt-diag's text helpers (tools/, internal): the JSON strings of --json.
#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <string>

#include "json_text.hpp"
#include "utf8_text.hpp"  // (db/src)

namespace pgrt::diag {
namespace {

// Names from the server (a database's or a role's, chosen by its owner; any bytes at all on a
// SQL_ASCII server) go into `pgrt-diag --json` as JSON strings that every parser takes: valid
// UTF-8 (an invalid byte becomes U+FFFD), control characters escaped (not dropped), the rest
// kept as it is.
TEST(DiagJson, StringsAreValidUtf8WithControlCharactersEscaped) {
  EXPECT_EQ(json_string("orders/eu-1"), "\"orders/eu-1\"");
  EXPECT_EQ(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(json_string("line\nbreak\ttab\x1b[2J\x7f"), "\"line\\nbreak\\ttab\\u001b[2J\x7f\"");
  EXPECT_EQ(json_string("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
            "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"")
      << "valid UTF-8 is kept";
  EXPECT_EQ(json_string("bad\xff\xfe end"), "\"bad\xef\xbf\xbd\xef\xbf\xbd end\"");
  EXPECT_EQ(json_string("cut \xe2\x82"), "\"cut \xef\xbf\xbd\"") << "a truncated sequence";
  EXPECT_EQ(json_string("over\xc0\xaf"), "\"over\xef\xbf\xbd\xef\xbf\xbd\"") << "overlong";
  EXPECT_EQ(json_string("surrogate\xed\xa0\x80"),
            "\"surrogate\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
  for (const std::string& name :
       {std::string("db\xff\x01x", 5), std::string("\xc3", 1), std::string("nul\0byte", 8)}) {
    const std::string text = "{\"database\":" + json_string(name) + "}";
    boost::system::error_code error;
    (void)boost::json::parse(text, error);
    EXPECT_FALSE(error) << "not JSON: " << text << " (" << error.message() << ")";
  }
}

// detail::valid_utf8() (db/src/utf8_text.hpp, also behind the metrics' label values): one U+FFFD
// for each maximal ill-formed subpart, as Unicode recommends; well-formed text untouched.
TEST(Utf8Text, EachIllFormedSubpartBecomesOneReplacementCharacter) {
  using pgrt::detail::valid_utf8;
  const std::string r = "\xef\xbf\xbd";
  EXPECT_EQ(valid_utf8(""), "");
  EXPECT_EQ(valid_utf8("plain ASCII\x7f"), "plain ASCII\x7f");
  EXPECT_EQ(valid_utf8("\xf4\x8f\xbf\xbf"), "\xf4\x8f\xbf\xbf") << "U+10FFFF";
  EXPECT_EQ(valid_utf8("\xf4\x90\x80\x80"), r + r + r + r) << "above U+10FFFF";
  EXPECT_EQ(valid_utf8("\xf5x"), r + "x");
  EXPECT_EQ(valid_utf8("\xf0\x9f\x98"), r) << "a 4-byte sequence cut short: one subpart";
  EXPECT_EQ(valid_utf8("\xe2\x82x\x80"), r + "x" + r);
  EXPECT_EQ(valid_utf8(std::string("a\0b", 3)), std::string("a\0b", 3));
}

}  // namespace
}  // namespace pgrt::diag
