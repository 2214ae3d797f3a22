// The C++ placement (client/placement.h) as a filter for tests/python/test_placement.py: a
// PlacementManifest as JSON on stdin, the Placement as JSON on stdout, or "CODE message" on
// stderr and exit 1.
#include <iostream>
#include <iterator>
#include <string>

#include "client/placement.h"
#include "google/protobuf/util/json_util.h"

int main() {
  const std::string input((std::istreambuf_iterator<char>(std::cin)),
                          std::istreambuf_iterator<char>());
  optd::v1::PlacementManifest manifest;
  if (!google::protobuf::util::JsonStringToMessage(input, &manifest).ok()) {
    std::cerr << "INVALID_ARGUMENT not a PlacementManifest\n";
    return 2;
  }
  absl::StatusOr<optd::v1::Placement> placement = optd::client::Place(manifest);
  if (!placement.ok()) {
    std::cerr << absl::StatusCodeToString(placement.status().code()) << " "
              << placement.status().message() << "\n";
    return 1;
  }
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(*placement, &json, options);
  std::cout << json << "\n";
  return 0;
}
