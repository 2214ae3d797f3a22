// A SessionConfig from a client: as protobuf text (optctl create's reader) and as the wire's
// binary form, then the daemon's validation and sizing exactly as CreateSession runs them. No
// input may crash, overflow or allocate what it does not describe.
#include <cstddef>
#include <cstdint>
#include <string>

#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "optd/v1/optd.pb.h"
#include "server/session.h"
#include "server/session_config.h"

namespace {

// Silences the text parser: a fuzzer makes every error it can report.
class Quiet : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int, int, const std::string&) override {}
};

void Validate(optd::v1::SessionConfig config) {
  if (!optd::server::NormalizeSessionConfig(config).ok()) return;
  absl::StatusOr<int64_t> bytes = optd::server::Session::RequiredBytes(config);
  if (bytes.ok() && *bytes < 0) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  optd::v1::SessionConfig text;
  Quiet quiet;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&quiet);
  if (parser.ParseFromString(input, &text)) Validate(text);
  optd::v1::SessionConfig binary;
  if (binary.ParseFromString(input)) Validate(binary);
  return 0;
}
