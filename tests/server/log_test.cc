// The daemon's log lines and status messages echo what clients sent: Printable keeps each one
// line, bounded and free of terminal control, without splitting a UTF-8 character.
#include "server/log.h"

#include <string>

#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace optd::server {
namespace {

TEST(PrintableTest, ControlBytesAreEscapedAndTheRestPassesUnchanged) {
  EXPECT_EQ(Printable("w.0", 100), "w.0");
  EXPECT_EQ(Printable(std::string("a\nb\r\x1b[2J\t") + '\0' + "\x7f", 100),
            "a\\x0ab\\x0d\\x1b[2J\\x09\\x00\\x7f");
  // UTF-8 names (protobuf string fields are UTF-8) pass as they are.
  EXPECT_EQ(Printable("gewicht.\xc3\xa4\xe2\x82\xac", 100), "gewicht.\xc3\xa4\xe2\x82\xac");
  EXPECT_EQ(Printable("", 0), "");
}

TEST(PrintableTest, LongTextIsCutAndSaysHowMuchWasCut) {
  EXPECT_EQ(Printable("abcdefgh", 8), "abcdefgh");
  EXPECT_EQ(Printable("abcdefghij", 8), "abcdefgh... (2 more bytes)");
  // An escape is never cut in two: "ab\x0a" needs 6 bytes.
  EXPECT_EQ(Printable("ab\ncd", 5), "ab... (3 more bytes)");
  EXPECT_EQ(Printable(std::string(100000, 'g'), 4096).size(),
            4096 + std::string("... (95904 more bytes)").size());
}

TEST(PrintableTest, ACutNeverSplitsAUtf8Character) {
  // "x€€": '€' is 3 bytes (e2 82 ac). Limits 2, 3 and 4 fall inside the first '€'.
  const std::string text = "x\xe2\x82\xac\xe2\x82\xac";
  EXPECT_EQ(Printable(text, 1), "x... (6 more bytes)");
  EXPECT_EQ(Printable(text, 2), "x... (6 more bytes)");
  EXPECT_EQ(Printable(text, 3), "x... (6 more bytes)");
  EXPECT_EQ(Printable(text, 4), "x\xe2\x82\xac... (3 more bytes)");
  EXPECT_EQ(Printable(text, 6), "x\xe2\x82\xac... (3 more bytes)");
  EXPECT_EQ(Printable(text, 7), text);
  // A 2-byte character at the very start.
  EXPECT_EQ(Printable("\xc3\xa4z", 1), "... (3 more bytes)");
}

TEST(LogEventTest, AnEventIsOneLineWhateverItHolds) {
  ::testing::internal::CaptureStderr();
  LogEvent(std::string("refused: no tensor 'a\n2026-01-01T00:00:00.000000Z optd: forged'") +
           std::string(10000, 'z'));
  const std::string written = ::testing::internal::GetCapturedStderr();
  ASSERT_FALSE(written.empty());
  EXPECT_EQ(written.back(), '\n');
  const std::vector<std::string> lines =
      absl::StrSplit(written.substr(0, written.size() - 1), '\n');
  ASSERT_EQ(lines.size(), 1u) << written;
  EXPECT_NE(lines[0].find("no tensor 'a\\x0a2026-01-01T00:00:00.000000Z optd: forged'"),
            std::string::npos)
      << lines[0];
  EXPECT_NE(lines[0].find("more bytes)"), std::string::npos);
  EXPECT_LT(lines[0].size(), kMaxEventBytes + 100);
}

}  // namespace
}  // namespace optd::server
