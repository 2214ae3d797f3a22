// ViewChunk reads a plain chunk request where gRPC received it, cut into slices anywhere, to the
// fields protobuf parses; everything else it leaves to protobuf.
#include "server/chunk_view.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "optd/v1/optd.pb.h"

namespace optd::server {
namespace {

std::vector<grpc::Slice> Cut(const std::string& bytes, std::vector<size_t> cuts) {
  cuts.push_back(bytes.size());
  std::vector<grpc::Slice> slices;
  size_t from = 0;
  for (size_t to : cuts) {
    slices.emplace_back(bytes.data() + from, to - from);  // empty slices too
    from = to;
  }
  return slices;
}

std::string Joined(const ChunkView& view) {
  std::string data;
  for (absl::string_view piece : view.data) data.append(piece.data(), piece.size());
  return data;
}

v1::TensorChunk Chunk() {
  v1::TensorChunk chunk;
  chunk.set_tensor("blocks.3.mlp.w\xc3\xa4");
  chunk.set_offset(int64_t{1} << 33);
  chunk.set_dtype(v1::DTYPE_BF16);
  chunk.set_tensor_elements(int64_t{1} << 34);
  for (int i = 0; i < 300; ++i) chunk.mutable_data()->push_back(static_cast<char>(i * 7));
  return chunk;
}

TEST(ChunkViewTest, APlainChunkReadsAsProtobufParsesIt) {
  v1::StepRequest request;
  *request.mutable_chunk() = Chunk();
  const std::string bytes = request.SerializeAsString();
  for (size_t a = 0; a <= bytes.size(); a += 5) {
    for (size_t b = a; b <= bytes.size(); b += 11) {
      SCOPED_TRACE(::testing::Message() << "cut at " << a << ", " << b);
      const std::vector<grpc::Slice> slices = Cut(bytes, {a, b});  // the view points into them
      ChunkView view;
      ASSERT_TRUE(ViewChunk(slices, view));
      EXPECT_EQ(view.tensor, request.chunk().tensor());
      EXPECT_EQ(view.offset, request.chunk().offset());
      EXPECT_EQ(view.dtype, request.chunk().dtype());
      EXPECT_EQ(view.tensor_elements, request.chunk().tensor_elements());
      EXPECT_EQ(view.data_bytes, request.chunk().data().size());
      EXPECT_EQ(Joined(view), request.chunk().data());
    }
  }
  // The same for an upload's chunk, and for fields left at zero (absent on the wire).
  v1::UploadParamsRequest upload;
  upload.mutable_chunk()->set_tensor("b");
  upload.mutable_chunk()->set_data("abcd");
  const std::vector<grpc::Slice> slices = Cut(upload.SerializeAsString(), {3});
  ChunkView view;
  ASSERT_TRUE(ViewChunk(slices, view));
  EXPECT_EQ(view.tensor, "b");
  EXPECT_EQ(view.offset, 0);
  EXPECT_EQ(view.dtype, 0);
  EXPECT_EQ(Joined(view), "abcd");
  // ChunkView::Of gives the same fields from a parsed chunk.
  const v1::TensorChunk parsed = Chunk();
  const ChunkView of = ChunkView::Of(parsed);
  EXPECT_EQ(of.tensor, parsed.tensor());
  EXPECT_EQ(of.offset, parsed.offset());
  EXPECT_EQ(Joined(of), parsed.data());
}

TEST(ChunkViewTest, EverythingElseIsLeftToProtobuf) {
  v1::StepRequest chunk;
  *chunk.mutable_chunk() = Chunk();
  const std::string plain = chunk.SerializeAsString();
  v1::StepRequest header;
  header.mutable_header()->set_session_id("s");
  // A string field that is not UTF-8 (protobuf refuses the message).
  v1::StepRequest latin1;
  latin1.mutable_chunk()->set_data("abcd");
  std::string bad_name = latin1.SerializeAsString();
  const std::string name_field = std::string("\x0a\x02\xe4\x41", 4);  // "\xe4A": not UTF-8
  bad_name.insert(2, name_field);
  bad_name[1] = static_cast<char>(bad_name[1] + name_field.size());
  // A chunk with a field TensorChunk does not have (field 9, a varint).
  v1::StepRequest unknown;
  unknown.mutable_chunk()->set_tensor("w");
  std::string with_unknown = unknown.SerializeAsString();
  with_unknown += "\x48\x01";
  with_unknown[1] = static_cast<char>(with_unknown[1] + 2);
  const struct {
    const char* what;
    std::string bytes;
  } cases[] = {
      {"a header", header.SerializeAsString()},
      {"two chunks in one message (protobuf merges them)", plain + plain},
      {"a name that is not UTF-8", bad_name},
      {"an unknown field", with_unknown},
      {"cut short", plain.substr(0, plain.size() - 1)},
      {"an empty message", ""},
      // Found by chunk_view_fuzz: tag 0x12 in six bytes, which protobuf refuses.
      {"a tag in a longer form than it needs", std::string("\x92\x80\x80\x80\x80\x00\x00", 7)},
      {"an offset in a longer form than it needs", std::string("\x12\x03\x10\x81\x00", 5)},
  };
  for (const auto& c : cases) {
    ChunkView view;
    EXPECT_FALSE(ViewChunk(Cut(c.bytes, {}), view)) << c.what;
  }
  // The bad name really is one protobuf refuses, and the unknown field one it keeps apart.
  v1::StepRequest parsed;
  EXPECT_FALSE(parsed.ParseFromString(bad_name));
  ASSERT_TRUE(parsed.ParseFromString(with_unknown));
  EXPECT_EQ(parsed.chunk().tensor(), "w");
}

}  // namespace
}  // namespace optd::server
