#include "client/npy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"

namespace optd::client {
namespace {

constexpr char kPython[] = "/usr/bin/python3";

// Exact in float16, float32 and float64 (multiples of 1/8 in [-6.25, 6.25]), so every dtype
// holds it unrounded. The Python scripts below compute the same values as `formula`.
float Formula(int64_t i) { return static_cast<float>((i * 37) % 101 - 50) / 8.0f; }

std::vector<float> FormulaValues(int64_t count) {
  std::vector<float> values(count);
  for (int64_t i = 0; i < count; ++i) values[i] = Formula(i);
  return values;
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t product = 1;
  for (const int64_t dim : shape) product *= dim;
  return product;
}

// A path under the test temp directory, unique to the running test.
std::string TestPath(absl::string_view name) {
  const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
  return absl::StrCat(
      ::testing::TempDir(),
      absl::StrReplaceAll(absl::StrCat(test->test_suite_name(), "_", test->name()), {{"/", "_"}}),
      "_", name);
}

void WriteFile(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool FileExists(const std::string& path) { return std::ifstream(path).good(); }

template <typename T>
std::string RawBytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

uint32_t Bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// A .npy file built by hand: magic, version, little-endian header length, `dict` ended by '\n'
// (unpadded, which readers must accept), then `data`.
std::string NpyBytes(absl::string_view dict, absl::string_view data, int major = 1) {
  const size_t header_length = dict.size() + 1;
  std::string bytes("\x93NUMPY", 6);
  bytes.push_back(static_cast<char>(major));
  bytes.push_back(0);
  for (int i = 0; i < (major == 1 ? 2 : 4); ++i) {
    bytes.push_back(static_cast<char>((header_length >> (8 * i)) & 0xff));
  }
  return absl::StrCat(bytes, dict, "\n", data);
}

std::string F4Dict(absl::string_view shape) {
  return absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': ", shape, ", }");
}

void ExpectError(const absl::Status& status, absl::StatusCode code, const std::string& path,
                 absl::string_view fragment) {
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_NE(status.message().find(path), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find(fragment), absl::string_view::npos)
      << status << "\nexpected to contain: " << fragment;
}

class RoundTripTest : public ::testing::TestWithParam<std::vector<int64_t>> {};

TEST_P(RoundTripTest, ReadsBackWhatItWrote) {
  const std::vector<int64_t>& shape = GetParam();
  const std::vector<float> values = FormulaValues(Product(shape));
  const std::string path = TestPath("array.npy");
  ASSERT_TRUE(WriteNpy(path, shape, values).ok());
  EXPECT_FALSE(FileExists(path + ".tmp"));

  // np.save's layout: version 1.0, '\n'-terminated header, data at a multiple of 64 bytes.
  const std::string bytes = ReadFile(path);
  ASSERT_GE(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t header_length = static_cast<unsigned char>(bytes[8]) |
                               static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8;
  const size_t data_start = 10 + header_length;
  EXPECT_EQ(data_start % 64, 0u);
  EXPECT_EQ(bytes[data_start - 1], '\n');
  EXPECT_EQ(bytes.size(), data_start + 4 * values.size());

  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->shape, shape);
  EXPECT_EQ(array->data, values);
}

INSTANTIATE_TEST_SUITE_P(Shapes, RoundTripTest,
                         ::testing::Values(std::vector<int64_t>{}, std::vector<int64_t>{5},
                                           std::vector<int64_t>{3, 4},
                                           std::vector<int64_t>{2, 3, 4}, std::vector<int64_t>{0},
                                           std::vector<int64_t>{2, 0, 3}));

TEST(WriteNpyTest, ReplacesAnExistingFile) {
  const std::string path = TestPath("array.npy");
  ASSERT_TRUE(WriteNpy(path, {3}, {1.0f, 2.0f, 3.0f}).ok());
  ASSERT_TRUE(WriteNpy(path, {2}, {4.0f, 5.0f}).ok());
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->data, (std::vector<float>{4.0f, 5.0f}));
}

TEST(WriteNpyTest, RejectsDataThatDoesNotMatchTheShape) {
  const std::string path = TestPath("array.npy");
  ExpectError(WriteNpy(path, {3, 4}, FormulaValues(11)), absl::StatusCode::kInvalidArgument, path,
              "(3, 4) holds 12 elements but the data has 11");
  ExpectError(WriteNpy(path, {2, -1}, {}), absl::StatusCode::kInvalidArgument, path,
              "negative dimension");
  ExpectError(WriteNpy(path, {int64_t{1} << 40, int64_t{1} << 40}, {}),
              absl::StatusCode::kInvalidArgument, path, "overflows");
  EXPECT_FALSE(FileExists(path));
  EXPECT_FALSE(FileExists(path + ".tmp"));
}

TEST(WriteNpyTest, ReportsAMissingDirectory) {
  const std::string path = TestPath("no_such_directory/array.npy");
  ExpectError(WriteNpy(path, {1}, {1.0f}), absl::StatusCode::kNotFound, path, "cannot create");
}

TEST(WriteNpyTest, UsesVersion2OnlyWhenTheHeaderOutgrows65535Bytes) {
  // Each dimension adds "1, " to the header: 22000 of them pass version 1.0's 65535 bytes.
  const std::vector<int64_t> shape(22000, 1);
  const std::string path = TestPath("array.npy");
  ASSERT_TRUE(WriteNpy(path, shape, {2.5f}).ok());
  const std::string bytes = ReadFile(path);
  ASSERT_GE(bytes.size(), 12u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x02\x00", 8));
  size_t header_length = 0;
  for (int i = 0; i < 4; ++i) {
    header_length |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
  }
  EXPECT_GT(header_length, 65535u);
  EXPECT_EQ((12 + header_length) % 64, 0u);
  EXPECT_EQ(bytes.size(), 12 + header_length + 4);
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->shape, shape);
  EXPECT_EQ(array->data, std::vector<float>{2.5f});
}

TEST(ReadNpyTest, AcceptsHeaderVariants) {
  const std::string data = RawBytes(FormulaValues(6));
  const struct {
    std::string dict;
    std::vector<int64_t> shape;
  } cases[] = {
      {R"({"shape": (2, 3), "fortran_order": False, "descr": "<f4"})", {2, 3}},
      {"{'descr':'<f4','fortran_order':False,'shape':(6,)}", {6}},
      {"{'fortran_order': False, 'shape': (2L, 3L), 'descr': '<f4', }   ", {2, 3}},
      {" { 'descr' : '<f4' ,\t'fortran_order' : False , 'shape' : ( 3 , 2 , ) , } ", {3, 2}},
  };
  for (const auto& c : cases) {
    const std::string path = TestPath("array.npy");
    WriteFile(path, NpyBytes(c.dict, data));
    const absl::StatusOr<NpyArray> array = ReadNpy(path);
    ASSERT_TRUE(array.ok()) << c.dict << ": " << array.status();
    EXPECT_EQ(array->shape, c.shape) << c.dict;
    EXPECT_EQ(array->data, FormulaValues(6)) << c.dict;
  }
}

TEST(ReadNpyTest, ReadsVersion3) {
  const std::string path = TestPath("array.npy");
  WriteFile(path, NpyBytes(F4Dict("(2, 2)"), RawBytes(FormulaValues(4)), /*major=*/3));
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(array->data, FormulaValues(4));
}

TEST(ReadNpyTest, ConvertsFortranOrderToCOrder) {
  // Column-major storage of [[0, 1, 2], [3, 4, 5]].
  const std::string path = TestPath("array.npy");
  WriteFile(path, NpyBytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                           RawBytes(std::vector<float>{0, 3, 1, 4, 2, 5})));
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(array->data, (std::vector<float>{0, 1, 2, 3, 4, 5}));
}

TEST(ReadNpyTest, ReadsAnEmptyFortranArrayWhoseOtherDimensionsOverflowTogether) {
  // Found by npy_fuzz: the strides of the other dimensions overflowed int64 (UBSan), although
  // the array has no elements to place.
  const std::string path = TestPath("array.npy");
  WriteFile(path, NpyBytes("{'descr': '<f8', 'fortran_order': True, "
                           "'shape': (0, 66666, 66, 6666, 666, 363, 666, 363), }",
                           ""));
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->shape, (std::vector<int64_t>{0, 66666, 66, 6666, 666, 363, 666, 363}));
  EXPECT_TRUE(array->data.empty());
}

TEST(ReadNpyTest, RoundsFloat64ToNearestEven) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const std::vector<double> input = {
      0x1.000001p0,           // halfway between 1 and 1 + 2^-23: ties to the even 1
      0x1.000003p0,           // halfway between 1 + 2^-23 and 1 + 2^-22: ties to 1 + 2^-22
      0x1.0000010000001p0,    // just above halfway: rounds up
      -0x1.fffffep127,        // -FLT_MAX, exact
      0x1.fffffefffffffp127,  // just below the midpoint to 2^128: rounds to FLT_MAX
      0x1p-150,               // halfway between 0 and the smallest subnormal: ties to 0
      0x1.0000000000001p-150,
      -kInf,
      std::nan(""),
  };
  const std::string path = TestPath("array.npy");
  WriteFile(path,
            NpyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (9,), }", RawBytes(input)));
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  ASSERT_EQ(array->data.size(), 9u);
  EXPECT_EQ(array->data[0], 1.0f);
  EXPECT_EQ(array->data[1], 0x1.000004p0f);
  EXPECT_EQ(array->data[2], 0x1.000002p0f);
  EXPECT_EQ(array->data[3], -std::numeric_limits<float>::max());
  EXPECT_EQ(array->data[4], std::numeric_limits<float>::max());
  EXPECT_EQ(Bits(array->data[5]), 0u);
  EXPECT_EQ(array->data[6], std::numeric_limits<float>::denorm_min());
  EXPECT_EQ(array->data[7], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(array->data[8]));
}

TEST(ReadNpyTest, RejectsFloat64BeyondFloatRange) {
  for (const double value : {0x1.ffffffp127, -1e300}) {
    const std::string path = TestPath("array.npy");
    WriteFile(path, NpyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
                             RawBytes(std::vector<double>{1.0, value})));
    ExpectError(ReadNpy(path).status(), absl::StatusCode::kInvalidArgument, path, "element 1 (");
    ExpectError(ReadNpy(path).status(), absl::StatusCode::kInvalidArgument, path,
                "beyond float32 range");
  }
}

TEST(ReadNpyTest, WidensFloat16Exactly) {
  const std::vector<uint16_t> input = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x8400, 0x3555, 0x7c00};
  const std::string path = TestPath("array.npy");
  WriteFile(path,
            NpyBytes("{'descr': '<f2', 'fortran_order': False, 'shape': (7,), }", RawBytes(input)));
  const absl::StatusOr<NpyArray> array = ReadNpy(path);
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->data, (std::vector<float>{1.0f, -2.0f, 65504.0f, 0x1p-24f, -0x1p-14f,
                                             0x1.554p-2f, std::numeric_limits<float>::infinity()}));
}

TEST(ReadNpyTest, MissingFileIsNotFound) {
  const std::string path = TestPath("missing.npy");
  ExpectError(ReadNpy(path).status(), absl::StatusCode::kNotFound, path, "cannot open");
}

TEST(ReadNpyTest, DirectoryIsInvalidArgument) {
  const std::string path = ::testing::TempDir();
  ExpectError(ReadNpy(path).status(), absl::StatusCode::kInvalidArgument, path,
              "not a regular file");
}

TEST(ReadNpyTest, RejectsMalformedFiles) {
  const std::string twelve_floats = RawBytes(FormulaValues(12));
  const struct {
    const char* name;
    std::string bytes;
    std::string fragment;
  } cases[] = {
      {"bad magic", "GIF89a" + twelve_floats, "magic"},
      {"short file", std::string("\x93NUM", 4), "magic"},
      {"preamble cut short", std::string("\x93NUMPY\x01\x00\x10", 9), "ends inside the preamble"},
      {"int64 dtype",
       NpyBytes("{'descr': '<i8', 'fortran_order': False, 'shape': (6,), }", twelve_floats),
       "unsupported dtype '<i8'"},
      {"big-endian float32",
       NpyBytes("{'descr': '>f4', 'fortran_order': False, 'shape': (3, 4), }", twelve_floats),
       "unsupported dtype '>f4'"},
      {"truncated data", NpyBytes(F4Dict("(3, 4)"), twelve_floats.substr(0, 44)),
       "the data is 44 bytes but shape (3, 4) of '<f4' needs 48"},
      {"extra data", NpyBytes(F4Dict("(3, 4)"), twelve_floats + "abcd"),
       "the data is 52 bytes but shape (3, 4) of '<f4' needs 48"},
      {"overflowing shape", NpyBytes(F4Dict("(4611686018427387904, 4)"), ""), "overflows"},
      {"overflowing bytes", NpyBytes(F4Dict("(2305843009213693952, 2)"), ""), "overflows"},
      {"dimension beyond int64", NpyBytes(F4Dict("(99999999999999999999,)"), ""),
       "overflows int64"},
      {"negative dimension", NpyBytes(F4Dict("(-3,)"), ""), "does not parse"},
      {"shape that is not a tuple", NpyBytes(F4Dict("(12)"), twelve_floats), "does not parse"},
      {"missing key", NpyBytes("{'descr': '<f4', 'shape': (12,), }", twelve_floats),
       "no 'fortran_order' key"},
      {"unknown key",
       NpyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (12,), 'x': 1}", twelve_floats),
       "unexpected or repeated key 'x'"},
      {"repeated key",
       NpyBytes("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (12,)}",
                twelve_floats),
       "unexpected or repeated key 'descr'"},
      {"unterminated dict", NpyBytes("{'descr': '<f4', 'fortran_order': False", twelve_floats),
       "does not parse"},
      {"text after the dict", NpyBytes(F4Dict("(12,)") + " x", twelve_floats), "does not parse"},
      {"structured dtype",
       NpyBytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (12,), }",
                twelve_floats),
       "does not parse"},
      {"unsupported version", NpyBytes(F4Dict("(12,)"), twelve_floats, /*major=*/4),
       "unsupported .npy format version 4.0"},
      {"header past the end", std::string("\x93NUMPY\x01\x00\x00\x10{}", 12), "runs past the end"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = TestPath("malformed.npy");
    WriteFile(path, c.bytes);
    ExpectError(ReadNpy(path).status(), absl::StatusCode::kInvalidArgument, path, c.fragment);
  }
}

// Interoperability with numpy itself, run through Debian's /usr/bin/python3.
class NumpyInteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static const bool numpy_available =
        std::system(absl::StrCat(kPython, " -c 'import numpy' >/dev/null 2>&1").c_str()) == 0;
    if (!numpy_available) GTEST_SKIP() << kPython << " cannot import numpy";
  }

  // Runs `body` under Python after a prelude that imports sys and numpy as np and defines
  // formula(n), the float64 values of Formula(0..n-1). Returns whether it exited 0.
  static bool RunPython(absl::string_view body, const std::vector<std::string>& args) {
    const std::string script_path = TestPath("script.py");
    WriteFile(script_path, absl::StrCat(R"py(import sys
import numpy as np


def formula(n):
    return ((np.arange(n) * 37) % 101 - 50) / 8.0


)py",
                                        body));
    std::string command = absl::StrCat(kPython, " '", script_path, "'");
    for (const std::string& arg : args) absl::StrAppend(&command, " '", arg, "'");
    return std::system(command.c_str()) == 0;
  }
};

TEST_F(NumpyInteropTest, NumpyLoadsWhatWeWrite) {
  constexpr absl::string_view kCheck = R"py(
path = sys.argv[1]
shape = tuple(int(d) for d in sys.argv[2].split(',') if d)
with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    header_shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    assert version == (1, 0), version
    assert f.tell() % 64 == 0, f.tell()
    assert not fortran_order
a = np.load(path)
assert a.dtype == np.dtype('<f4'), a.dtype
assert a.shape == shape, (a.shape, shape)
expected = formula(a.size).astype(np.float32).reshape(shape)
assert np.array_equal(a, expected), (a, expected)
)py";
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{}, std::vector<int64_t>{5}, std::vector<int64_t>{3, 4},
        std::vector<int64_t>{2, 3, 4}}) {
    const std::string path = TestPath("ours.npy");
    ASSERT_TRUE(WriteNpy(path, shape, FormulaValues(Product(shape))).ok());
    EXPECT_TRUE(RunPython(kCheck, {path, absl::StrJoin(shape, ",")}))
        << "shape (" << absl::StrJoin(shape, ", ") << ")";
  }
}

TEST_F(NumpyInteropTest, ReadsWhatNumpyWrites) {
  constexpr absl::string_view kWrite = R"py(
path, dtype, order, version = sys.argv[1:5]
shape = tuple(int(d) for d in sys.argv[5].split(',') if d)
a = formula(int(np.prod(shape))).reshape(shape).astype(dtype)
if order == 'F':
    a = np.asfortranarray(a)
    assert a.flags.f_contiguous and not a.flags.c_contiguous
version = None if version == 'default' else tuple(int(v) for v in version.split('.'))
with open(path, 'wb') as f:
    np.lib.format.write_array(f, a, version=version)
)py";
  const struct {
    std::string dtype;
    std::string order;
    std::string version;  // "default": what np.save picks, 1.0 here
    std::vector<int64_t> shape;
  } cases[] = {
      {"<f4", "C", "default", {3, 4}},    {"<f4", "C", "default", {}},
      {"<f8", "C", "default", {2, 3, 4}}, {"<f2", "C", "default", {5}},
      {"<f4", "F", "default", {2, 3, 4}}, {"<f8", "F", "default", {3, 4}},
      {"<f2", "F", "default", {4, 3}},    {"<f4", "C", "2.0", {3, 4}},
      {"<f4", "F", "3.0", {2, 3, 4}},
  };
  for (const auto& c : cases) {
    const std::string label = absl::StrCat(c.dtype, " ", c.order, " version ", c.version,
                                           " shape (", absl::StrJoin(c.shape, ", "), ")");
    SCOPED_TRACE(label);
    const std::string path = TestPath("numpy.npy");
    ASSERT_TRUE(
        RunPython(kWrite, {path, c.dtype, c.order, c.version, absl::StrJoin(c.shape, ",")}));

    // Check numpy wrote what the case is about, so the read below exercises it.
    const std::string bytes = ReadFile(path);
    ASSERT_GE(bytes.size(), 8u);
    EXPECT_EQ(bytes[6], c.version == "default" ? 1 : c.version[0] - '0');
    EXPECT_NE(bytes.find(absl::StrCat("'descr': '", c.dtype, "'")), std::string::npos);
    EXPECT_NE(bytes.find(c.order == "F" ? "'fortran_order': True" : "'fortran_order': False"),
              std::string::npos);

    const absl::StatusOr<NpyArray> array = ReadNpy(path);
    ASSERT_TRUE(array.ok()) << array.status();
    EXPECT_EQ(array->shape, c.shape);
    EXPECT_EQ(array->data, FormulaValues(Product(c.shape)));
  }
}

// Compares ReadNpy's conversion of every value in a numpy-written file against numpy's own
// astype(np.float32), which the script stores raw beside it.
void ExpectMatchesNumpyConversion(const std::string& npy_path, const std::string& expected_path,
                                  size_t count) {
  const absl::StatusOr<NpyArray> array = ReadNpy(npy_path);
  ASSERT_TRUE(array.ok()) << array.status();
  const std::string expected_bytes = ReadFile(expected_path);
  ASSERT_EQ(array->data.size(), count);
  ASSERT_EQ(expected_bytes.size(), 4 * count);
  size_t mismatches = 0;
  for (size_t i = 0; i < count; ++i) {
    uint32_t expected;
    memcpy(&expected, expected_bytes.data() + 4 * i, 4);
    if (Bits(array->data[i]) != expected && ++mismatches <= 5) {
      ADD_FAILURE() << "element " << i << ": read bits 0x" << std::hex << Bits(array->data[i])
                    << ", numpy's 0x" << expected;
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST_F(NumpyInteropTest, Float64RoundingMatchesNumpy) {
  constexpr absl::string_view kWrite = R"py(
rng = np.random.default_rng(0)
n = 200000
# Magnitudes from float32's subnormals to near its maximum, plus exact ties and extremes.
a = rng.standard_normal(n) * 2.0 ** rng.integers(-150, 126, n).astype(np.float64)
ties = np.array([1 + 2.0**-24, 1 + 3 * 2.0**-24, 2.0**-150, 3 * 2.0**-150, -np.inf, np.inf,
                 float.fromhex('0x1.fffffefffffffp127'), 0.0, -0.0])
a = np.concatenate([a, ties])
assert np.all(np.isinf(a) | (np.abs(a) < float.fromhex('0x1.ffffffp127')))
np.save(sys.argv[1], a.astype('<f8'))
a.astype(np.float32).tofile(sys.argv[2])
)py";
  const std::string npy_path = TestPath("f8.npy");
  const std::string expected_path = TestPath("f8_as_f4.raw");
  ASSERT_TRUE(RunPython(kWrite, {npy_path, expected_path}));
  ExpectMatchesNumpyConversion(npy_path, expected_path, 200009);
}

TEST_F(NumpyInteropTest, Float16WideningMatchesNumpyForEveryValue) {
  constexpr absl::string_view kWrite = R"py(
a = np.arange(65536, dtype=np.uint16).view('<f2')
np.save(sys.argv[1], a)
a.astype(np.float32).tofile(sys.argv[2])
)py";
  const std::string npy_path = TestPath("f2.npy");
  const std::string expected_path = TestPath("f2_as_f4.raw");
  ASSERT_TRUE(RunPython(kWrite, {npy_path, expected_path}));
  ExpectMatchesNumpyConversion(npy_path, expected_path, 65536);
}

}  // namespace
}  // namespace optd::client
