// optctl end to end over real loopback gRPC: an in-process daemon, the command functions of
// client/optctl_lib.h called in-process, and the optctl binary (OPTCTL_PATH) run through the
// shell. Results are checked against what the C++ client reads or computes itself: GetParameters
// for dumps, a twin session with the same config stepped through Session::Step for steps.
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "client/npy.h"
#include "client/optctl_lib.h"
#include "google/protobuf/text_format.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kAdminToken[] = "optctl-test-admin-token";

// A 2-D tensor in a Keller group and a 1-D tensor in an AdamW group, both initialized normal with
// a seed; both names need escaping to become file names.
constexpr char kConfig[] = R"pb(
  tensors {
    name: "blocks/0/attn%w"
    shape: [ 8, 6 ]
    group: "matrices"
    normal { seed: 7 std: 0.5 }
  }
  tensors {
    name: "norm/scale"
    shape: [ 6 ]
    group: "vectors"
    normal { seed: 11 std: 0.1 mean: 1 }
  }
  groups {
    name: "matrices"
    preset: "keller"
    overrides { key: "ns.dtype" value: "fp32" }
  }
  groups {
    name: "vectors"
    preset: "adamw"
    overrides { key: "lr" value: "0.001" }
  }
)pb";
constexpr char kMatrix[] = "blocks/0/attn%w";
constexpr char kVector[] = "norm/scale";
// The names above escaped by hand, as optctl --help documents it.
constexpr char kMatrixFile[] = "blocks%2F0%2Fattn%25w.npy";
constexpr char kVectorFile[] = "norm%2Fscale.npy";

v1::SessionConfig ParsedConfig() {
  v1::SessionConfig config;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(kConfig, &config));
  return config;
}

// The value of the "key: value" line of `output`, or "" when there is none.
std::string Field(const std::string& output, absl::string_view key) {
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    if (absl::ConsumePrefix(&line, absl::StrCat(key, ": "))) return std::string(line);
  }
  return "";
}

// The line of `output` that starts with `prefix`, split on whitespace.
std::vector<std::string> Row(const std::string& output, absl::string_view prefix) {
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    line = absl::StripLeadingAsciiWhitespace(line);
    if (absl::StartsWith(line, absl::StrCat(prefix, " "))) {
      return absl::StrSplit(line, ' ', absl::SkipEmpty());
    }
  }
  return {};
}

std::string Path(const std::string& dir, absl::string_view file) {
  return absl::StrCat(dir, "/", file);
}

void WriteText(const std::string& path, absl::string_view text) { std::ofstream(path) << text; }

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Writes `values` as an .npy array of `shape`, as a user's script would.
void WriteGradient(const std::string& path, std::vector<int64_t> shape,
                   const std::vector<float>& values) {
  ASSERT_TRUE(client::WriteNpy(path, shape, values).ok()) << path;
}

struct BinaryRun {
  int exit_code = -1;
  std::string out;
  std::string err;
};

class OptctlTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server::ServerOptions options = LoopbackOptions(MakeTempDir("optctl_state_"));
    options.admin_token = kAdminToken;
    server_ = StartServer(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    dir_ = MakeTempDir("optctl_");
    WriteText(config_path(), kConfig);
  }

  std::string config_path() const { return Path(dir_, "session.textproto"); }

  // A client holding `admin_token` (default: the daemon's).
  client::Client Client(const std::string& admin_token = kAdminToken) const {
    return ConnectTo(*server_, admin_token);
  }

  // Creates session `id` from kConfig with `optctl create` and opens it with the printed token.
  client::Session Create(const std::string& id) {
    client::Client admin = Client();
    std::ostringstream out;
    absl::Status created = client::RunCreate(admin, config_path(), id, out);
    EXPECT_TRUE(created.ok()) << created;
    EXPECT_EQ(Field(out.str(), "session_id"), id) << out.str();
    EXPECT_FALSE(Field(out.str(), "token").empty()) << out.str();
    return admin.OpenSession(id, Field(out.str(), "token"));
  }

  // Runs the optctl binary against the daemon with `args` (shell words) and `env` assignments.
  BinaryRun RunBinary(const std::string& args, const std::string& env = "") const {
    const std::string err_path = Path(dir_, "stderr.txt");
    const std::string command =
        absl::StrCat(env, " '", OPTCTL_PATH, "' --server=", server_->address(), " ", args, " 2>'",
                     err_path, "'");
    BinaryRun run;
    FILE* pipe = popen(command.c_str(), "r");
    if (pipe == nullptr) {
      ADD_FAILURE() << "popen " << command;
      return run;
    }
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) run.out.append(buffer, n);
    const int status = pclose(pipe);
    run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    run.err = ReadText(err_path);
    return run;
  }

  static server::Server* server_;
  std::string dir_;
};

server::Server* OptctlTest::server_ = nullptr;

TEST(OptctlHelpersTest, TensorFileNameEscapesPercentAndSlash) {
  EXPECT_EQ(client::TensorFileName("blocks/0/attn%w"), "blocks%2F0%2Fattn%25w.npy");
  EXPECT_EQ(client::TensorFileName("plain.name"), "plain.name.npy");
  // Every '%' is escaped, so a name that looks escaped stays apart from the name it looks like.
  EXPECT_EQ(client::TensorFileName("a%2Fb"), "a%252Fb.npy");
  EXPECT_EQ(client::TensorFileName("a/b"), "a%2Fb.npy");
  EXPECT_EQ(client::TensorFileName("/"), "%2F.npy");
}

TEST(OptctlHelpersTest, FormatShape) {
  EXPECT_EQ(client::FormatShape({8, 6}), "[8, 6]");
  EXPECT_EQ(client::FormatShape({6}), "[6]");
  EXPECT_EQ(client::FormatShape({}), "[]");
}

TEST(OptctlHelpersTest, HumanBytes) {
  EXPECT_EQ(client::HumanBytes(0), "0 B");
  EXPECT_EQ(client::HumanBytes(1023), "1023 B");
  EXPECT_EQ(client::HumanBytes(1024), "1.0 KiB");
  EXPECT_EQ(client::HumanBytes(1536), "1.5 KiB");
  EXPECT_EQ(client::HumanBytes(int64_t{1} << 20), "1.0 MiB");
  EXPECT_EQ(client::HumanBytes((int64_t{1} << 20) - 1), "1.0 MiB");  // not "1024.0 KiB"
  EXPECT_EQ(client::HumanBytes(int64_t{10} << 20), "10.0 MiB");
  EXPECT_EQ(client::HumanBytes(int64_t{3} << 30), "3.0 GiB");
}

TEST(OptctlHelpersTest, ParseWireDType) {
  EXPECT_EQ(*client::ParseWireDType("--wire_dtype", "fp32"), DType::kF32);
  EXPECT_EQ(*client::ParseWireDType("--wire_dtype", "bf16"), DType::kBF16);
  EXPECT_EQ(*client::ParseWireDType("--wire_dtype", "float16"), DType::kF16);
  for (const char* bad : {"fp64", "int8", ""}) {
    absl::StatusOr<DType> parsed = client::ParseWireDType("--wire_dtype", bad);
    EXPECT_TRUE(client::IsUsageError(parsed.status())) << bad << ": " << parsed.status();
    EXPECT_THAT(parsed.status().message(), HasSubstr("--wire_dtype")) << bad;
  }
  EXPECT_FALSE(client::IsUsageError(absl::InvalidArgumentError("from the daemon")));
}

TEST_F(OptctlTest, HealthIsServing) {
  client::Client c = Client();
  for (const std::string service : {"", "optd.v1.Optimizer"}) {
    std::ostringstream out;
    absl::StatusOr<bool> serving = client::RunHealth(c, service, absl::Seconds(5), out);
    ASSERT_TRUE(serving.ok()) << serving.status();
    EXPECT_TRUE(*serving) << service;
    EXPECT_EQ(out.str(), absl::StrCat("SERVING\nbackend: ", server_->backend().name(), " (",
                                      server_->backend().description(),
                                      ")\nbackend_choice: --backend=", TestBackendName(), "\n"))
        << service;
  }
  std::ostringstream out;
  EXPECT_EQ(client::RunHealth(c, "no.such.Service", absl::Seconds(5), out).status().code(),
            absl::StatusCode::kNotFound);

  const BinaryRun run = RunBinary("health");
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, ::testing::StartsWith("SERVING\nbackend: "));
  const BinaryRun ready = RunBinary("health optd.v1.Optimizer");
  EXPECT_EQ(ready.exit_code, 0) << ready.err;
  EXPECT_THAT(ready.out, HasSubstr("backend_choice: --backend="));
}

TEST(OptctlAutoBackendTest, HealthSaysWhichBackendAutoPickedAndWhy) {
  server::ServerOptions options = LoopbackOptions();
  options.backend = "auto";
  std::unique_ptr<server::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  absl::StatusOr<std::unique_ptr<Backend>> gpu = CreateCudaBackend();
  absl::StatusOr<v1::ServerInfo> info = ConnectTo(*server).ServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend_description(), server->backend().description());
  if (gpu.ok()) {
    EXPECT_EQ(info->backend(), "cuda");
    EXPECT_EQ(info->backend_choice(), "--backend=auto: cuda (a CUDA device is present)");
  } else {
    EXPECT_EQ(info->backend(), "cpu");
    EXPECT_EQ(info->backend_choice(),
              absl::StrCat("--backend=auto: cpu (", gpu.status().message(), ")"));
  }
  // --backend=cuda without a GPU refuses to start, naming why.
  if (!gpu.ok()) {
    options.backend = "cuda";
    absl::StatusOr<std::unique_ptr<server::Server>> refused = server::Server::Start(options);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(refused.status().message(), HasSubstr(gpu.status().message()));
  }
}

TEST_F(OptctlTest, DumpWritesEachTensorAsGetParametersReturnsIt) {
  client::Session session = Create("dump");
  absl::StatusOr<std::map<std::string, std::vector<float>>> expected = session.GetParameters();
  ASSERT_TRUE(expected.ok()) << expected.status();

  const std::string dump_dir = Path(dir_, "dump/nested");  // created by the dump
  std::ostringstream out;
  client::DumpOptions options;
  options.dir = dump_dir;
  absl::Status dumped = client::RunDump(session, options, out);
  ASSERT_TRUE(dumped.ok()) << dumped;
  EXPECT_THAT(out.str(), HasSubstr(Path(dump_dir, kMatrixFile)));

  const std::pair<std::string, std::vector<int64_t>> files[] = {{kMatrixFile, {8, 6}},
                                                                {kVectorFile, {6}}};
  const std::string names[] = {kMatrix, kVector};
  for (int t = 0; t < 2; ++t) {
    absl::StatusOr<client::NpyArray> array = client::ReadNpy(Path(dump_dir, files[t].first));
    ASSERT_TRUE(array.ok()) << array.status();
    EXPECT_EQ(array->shape, files[t].second) << names[t];
    EXPECT_TRUE(BitwiseEqual(array->data, expected->at(names[t]))) << names[t];
  }

  // --tensors picks some; a name the session lacks is a usage error and writes nothing.
  const std::string some_dir = Path(dir_, "some");
  options.dir = some_dir;
  options.tensors = {kVector};
  ASSERT_TRUE(client::RunDump(session, options, out).ok());
  EXPECT_TRUE(std::filesystem::exists(Path(some_dir, kVectorFile)));
  EXPECT_FALSE(std::filesystem::exists(Path(some_dir, kMatrixFile)));
  options.dir = Path(dir_, "none");
  options.tensors = {kVector, "no/such"};
  absl::Status unknown = client::RunDump(session, options, out);
  EXPECT_TRUE(client::IsUsageError(unknown)) << unknown;
  EXPECT_THAT(unknown.message(), HasSubstr("'no/such'"));
  EXPECT_FALSE(std::filesystem::exists(options.dir));
}

TEST_F(OptctlTest, StepFromNpyEqualsTheSameStepThroughTheClient) {
  client::Session session = Create("step");
  // The twin: the same config and seeds, stepped through the C++ client.
  absl::StatusOr<client::Session> twin = Client().CreateSession(ParsedConfig(), "step_twin");
  ASSERT_TRUE(twin.ok()) << twin.status();

  const std::string grads_dir = Path(dir_, "grads");
  const std::string out_dir = Path(dir_, "out");
  std::filesystem::create_directories(grads_dir);
  for (int64_t step = 1; step <= 3; ++step) {
    const std::vector<float> matrix_grad = Gradient(48, 0, step, 0);
    const std::vector<float> vector_grad = Gradient(6, 1, step, 0);
    WriteGradient(Path(grads_dir, kMatrixFile), {8, 6}, matrix_grad);
    // Step 2 has no gradient for the vector: its file is missing.
    std::filesystem::remove(Path(grads_dir, kVectorFile));
    std::vector<client::NamedTensor> grads = {{kMatrix, matrix_grad}};
    if (step != 2) {
      WriteGradient(Path(grads_dir, kVectorFile), {6}, vector_grad);
      grads.push_back({kVector, vector_grad});
    }
    client::StepOptions step_options;
    // The last step sends bf16 on the wire, on both sides.
    if (step == 3) step_options.wire_dtype = DType::kBF16;
    absl::StatusOr<client::StepResult> expected = twin->Step(step, grads, step_options);
    ASSERT_TRUE(expected.ok()) << expected.status();

    client::StepCommandOptions options;
    options.step = step;
    options.grads_dir = grads_dir;
    options.out_dir = out_dir;
    options.step_options = step_options;
    std::ostringstream out;
    absl::Status stepped = client::RunStep(session, options, out);
    ASSERT_TRUE(stepped.ok()) << stepped;
    const int updated = step == 2 ? 1 : 2;
    EXPECT_EQ(Field(out.str(), "step"), absl::StrCat(step)) << out.str();
    EXPECT_EQ(Field(out.str(), "tensors_updated"), absl::StrCat(updated)) << out.str();
    EXPECT_EQ(expected->tensors_updated, updated);
    EXPECT_EQ(Field(out.str(), "skipped"), "false");
    EXPECT_EQ(Field(out.str(), "replayed"), "false");
    EXPECT_EQ(Field(out.str(), "result"), "PARAMETERS");

    const std::pair<std::string, std::vector<int64_t>> files[] = {{kMatrixFile, {8, 6}},
                                                                  {kVectorFile, {6}}};
    const std::string names[] = {kMatrix, kVector};
    for (int t = 0; t < 2; ++t) {
      absl::StatusOr<client::NpyArray> array = client::ReadNpy(Path(out_dir, files[t].first));
      ASSERT_TRUE(array.ok()) << array.status();
      EXPECT_EQ(array->shape, files[t].second);
      EXPECT_TRUE(BitwiseEqual(array->data, expected->values.at(names[t])))
          << "step " << step << " tensor " << names[t];
    }
  }
  // The session's own view agrees.
  EXPECT_TRUE(
      BitwiseEqual(session.GetParameters()->at(kMatrix), twin->GetParameters()->at(kMatrix)));

  // A retry of step 3 replays.
  client::StepCommandOptions retry;
  retry.step = 3;
  retry.grads_dir = grads_dir;
  std::ostringstream out;
  ASSERT_TRUE(client::RunStep(session, retry, out).ok());
  EXPECT_EQ(Field(out.str(), "replayed"), "true") << out.str();
}

TEST_F(OptctlTest, GradientOfTheWrongShapeIsAUsageErrorNamingTheFile) {
  client::Session session = Create("wrong_shape");
  const std::string grads_dir = Path(dir_, "grads");
  std::filesystem::create_directories(grads_dir);
  const std::string path = Path(grads_dir, kMatrixFile);
  WriteGradient(path, {6, 8}, std::vector<float>(48, 1.0f));

  client::StepCommandOptions options;
  options.step = 1;
  options.grads_dir = grads_dir;
  std::ostringstream out;
  absl::Status stepped = client::RunStep(session, options, out);
  EXPECT_TRUE(client::IsUsageError(stepped)) << stepped;
  EXPECT_THAT(stepped.message(), HasSubstr(path));
  EXPECT_THAT(stepped.message(), HasSubstr("[8, 6]"));
  EXPECT_THAT(stepped.message(), HasSubstr("[6, 8]"));
  EXPECT_EQ(session.Info()->step(), 0) << "nothing was sent";

  // The binary exits with 2 and says the same on stderr.
  const BinaryRun run =
      RunBinary(absl::StrCat("step wrong_shape --step=1 --grads='", grads_dir, "'"),
                absl::StrCat("OPTD_TOKEN='", session.token(), "'"));
  EXPECT_EQ(run.exit_code, 2) << run.err;
  EXPECT_THAT(run.err, HasSubstr("optctl: INVALID_ARGUMENT: "));
  EXPECT_THAT(run.err, HasSubstr(path));
}

TEST_F(OptctlTest, ListAndInspectShowSessionsAndTensors) {
  client::Session session = Create("inspected");
  const std::string grads_dir = Path(dir_, "grads");
  std::filesystem::create_directories(grads_dir);
  WriteGradient(Path(grads_dir, kMatrixFile), {8, 6}, Gradient(48, 0, 1, 0));
  client::StepCommandOptions step;
  step.step = 1;
  step.grads_dir = grads_dir;
  std::ostringstream step_out;
  ASSERT_TRUE(client::RunStep(session, step, step_out).ok()) << step_out.str();

  client::Client admin = Client();
  std::ostringstream list;
  ASSERT_TRUE(client::RunList(admin, list).ok());
  EXPECT_THAT(list.str(), HasSubstr("SESSION"));
  const std::vector<std::string> row = Row(list.str(), "inspected");
  ASSERT_GE(row.size(), 2u) << list.str();
  EXPECT_EQ(row[1], "1") << list.str();  // step

  std::ostringstream inspect;
  ASSERT_TRUE(client::RunInspect(session, inspect).ok());
  const std::string text = inspect.str();
  EXPECT_EQ(Field(text, "session_id"), "inspected") << text;
  EXPECT_EQ(Field(text, "step"), "1") << text;
  EXPECT_EQ(Field(text, "world_size"), "1") << text;
  EXPECT_EQ(Field(text, "non_finite_policy"), "REJECT") << text;
  EXPECT_EQ(Field(text, "step_result"), "PARAMETERS") << text;
  EXPECT_EQ(Row(text, "matrices"),
            (std::vector<std::string>{"matrices", "keller", "ns.dtype=fp32"}))
      << text;
  EXPECT_EQ(Row(text, "vectors"), (std::vector<std::string>{"vectors", "adamw", "lr=0.001"}))
      << text;
  // NAME SHAPE DTYPE GROUP ELEMENTS STEPS_APPLIED LR ...; the shape "[8, 6]" splits in two.
  const std::vector<std::string> matrix = Row(text, kMatrix);
  ASSERT_GE(matrix.size(), 8u) << text;
  EXPECT_EQ(absl::StrCat(matrix[1], " ", matrix[2]), "[8, 6]");
  EXPECT_EQ(matrix[4], "matrices");
  EXPECT_EQ(matrix[5], "48");
  EXPECT_EQ(matrix[6], "1");
  const std::vector<std::string> vector = Row(text, kVector);
  ASSERT_GE(vector.size(), 7u) << text;
  EXPECT_EQ(vector[1], "[6]");
  EXPECT_EQ(vector[3], "vectors");
  EXPECT_EQ(vector[4], "6");
  EXPECT_EQ(vector[5], "0");  // no gradient file, no step applied
  EXPECT_EQ(vector[6], "0.001");
}

TEST_F(OptctlTest, CheckpointAndRestore) {
  client::Session session = Create("restored");
  const std::string grads_dir = Path(dir_, "grads");
  std::filesystem::create_directories(grads_dir);
  client::StepCommandOptions step;
  step.grads_dir = grads_dir;
  std::ostringstream out;
  for (step.step = 1; step.step <= 2; ++step.step) {
    WriteGradient(Path(grads_dir, kMatrixFile), {8, 6}, Gradient(48, 0, step.step, 0));
    WriteGradient(Path(grads_dir, kVectorFile), {6}, Gradient(6, 1, step.step, 0));
    ASSERT_TRUE(client::RunStep(session, step, out).ok()) << out.str();
    if (step.step == 1) {
      std::ostringstream checkpoint;
      ASSERT_TRUE(client::RunCheckpoint(session, checkpoint).ok());
      EXPECT_EQ(Field(checkpoint.str(), "step"), "1") << checkpoint.str();
      // "bytes: N (human)". The daemon counts the records' payload (config, parameters, state),
      // which the file at "path" holds along with its framing.
      const std::string path = Field(checkpoint.str(), "path");
      const std::string bytes_field = Field(checkpoint.str(), "bytes");
      int64_t bytes = 0;
      ASSERT_TRUE(absl::SimpleAtoi(bytes_field.substr(0, bytes_field.find(' ')), &bytes))
          << checkpoint.str();
      ASSERT_TRUE(std::filesystem::exists(path)) << checkpoint.str();
      EXPECT_GT(bytes, 0);
      EXPECT_LE(bytes, static_cast<int64_t>(std::filesystem::file_size(path)));
    }
  }
  absl::StatusOr<std::map<std::string, std::vector<float>>> at_two = session.GetParameters();
  ASSERT_TRUE(at_two.ok());

  std::ostringstream restore;
  ASSERT_TRUE(client::RunRestore(session, restore).ok());
  EXPECT_EQ(restore.str(), "step: 1\n");
  EXPECT_EQ(session.Info()->step(), 1);
  // Step 2 again from the checkpoint gives the same parameters as the first time.
  step.step = 2;
  ASSERT_TRUE(client::RunStep(session, step, out).ok()) << out.str();
  EXPECT_EQ(*session.GetParameters(), *at_two);
}

TEST_F(OptctlTest, WrongTokensAreRefusedWithTheDaemonsStatus) {
  client::Session session = Create("guarded");
  Create("other");
  client::Client admin = Client();
  std::ostringstream out;

  client::Session unknown = admin.OpenSession("guarded", "not-a-token");
  absl::Status status = client::RunInspect(unknown, out);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << status;
  EXPECT_FALSE(client::IsUsageError(status));

  client::Session foreign = admin.OpenSession("other", session.token());
  status = client::RunInspect(foreign, out);
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;

  client::Client wrong_admin = Client("not-the-admin-token");
  status = client::RunList(wrong_admin, out);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << status;
  // A session's own token is valid but does not grant the admin calls.
  client::Client session_token_as_admin = Client(session.token());
  status = client::RunList(session_token_as_admin, out);
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
  status = client::RunDelete(wrong_admin, "guarded", "", out);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << status;

  const BinaryRun run = RunBinary("--token=not-a-token inspect guarded");
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.err, HasSubstr("optctl: UNAUTHENTICATED: "));
  const BinaryRun list = RunBinary("--admin_token=wrong list");
  EXPECT_EQ(list.exit_code, 1);
  EXPECT_THAT(list.err, HasSubstr("optctl: UNAUTHENTICATED: "));
}

TEST_F(OptctlTest, AnalysisOfAFreshSession) {
  client::Session session = Create("fresh");
  std::ostringstream out;
  ASSERT_TRUE(client::RunAnalysis(session, {}, out).ok());
  EXPECT_EQ(out.str(), "no analysis yet\n");
}

TEST_F(OptctlTest, AnalysisShowsTheAutoChoices) {
  // A batched tensor of two 6×6 matrices choosing their direction: diag(1..6), whose rows are
  // orthogonal (row normalization is its polar factor), and ones with 1.5 on the diagonal
  // (r_i = 7.25/7 < 1.05·auto.min_dominance).
  v1::SessionConfig config = MakeConfig({{"m", "keller"}}, {{"x", {2, 6, 6}, "m"}});
  config.mutable_tensors(0)->set_rank_policy(v1::RANK_POLICY_BATCH);
  AddOverrides(*config.mutable_groups(0), {{"direction", "auto"}});
  absl::StatusOr<client::Session> session = Client().CreateSession(config, "chooser");
  ASSERT_TRUE(session.ok()) << session.status();
  std::vector<float> g(72, 0.0f);
  for (int i = 0; i < 6; ++i) g[i * 6 + i] = static_cast<float>(i + 1);
  for (int i = 0; i < 36; ++i) g[36 + i] = i % 7 == 0 ? 1.5f : 1.0f;
  ASSERT_TRUE(session->Step(1, {{"x", g}}).ok());
  std::ostringstream out;
  ASSERT_TRUE(client::RunAnalysis(*session, {}, out).ok());
  EXPECT_THAT(out.str(), HasSubstr("no analysis yet\nauto choices\n"));
  EXPECT_THAT(out.str(), ::testing::ContainsRegex("x +5,5 +row_normalize,newton_schulz +1 "));
}

// An output stream another thread can watch while it is written.
class WatchedOutput : public std::streambuf {
 public:
  // True once the text written contains `needle`; false after `timeout`.
  bool WaitFor(const std::string& needle, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto seen = [&]()
                    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return absl::StrContains(text_, needle); };
    return mu_.AwaitWithTimeout(absl::Condition(&seen), timeout);
  }
  std::string text() {
    absl::MutexLock lock(&mu_);
    return text_;
  }

 protected:
  int_type overflow(int_type c) override {
    if (c != traits_type::eof()) {
      absl::MutexLock lock(&mu_);
      text_.push_back(static_cast<char>(c));
    }
    return c;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    absl::MutexLock lock(&mu_);
    text_.append(s, static_cast<size_t>(n));
    return n;
  }

 private:
  absl::Mutex mu_;
  std::string text_ ABSL_GUARDED_BY(mu_);
};

TEST_F(OptctlTest, AnalysisFollowsEachNewAnalysis) {
  v1::SessionConfig config = ParsedConfig();
  config.set_analysis_interval(1);
  client::Client admin = Client();
  absl::StatusOr<client::Session> session = admin.CreateSession(config, "followed");
  ASSERT_TRUE(session.ok()) << session.status();
  WatchedOutput watched;
  std::ostream out(&watched);
  absl::Status followed;
  std::thread follower([&] {
    followed = client::RunAnalysis(
        *session, {.follow = true, .interval = absl::Milliseconds(1), .updates = 2}, out);
  });
  const std::vector<float> matrix = Gradient(48, 0, 1, 0);
  for (int64_t step = 1; step <= 2; ++step) {
    ASSERT_TRUE(session->Step(step, {{kMatrix, matrix}}).ok());
    ASSERT_TRUE(watched.WaitFor(absl::StrCat("step ", step, "\n"), absl::Seconds(60)));
    server_->analyzer().WaitUntilIdle();  // so the next step's analysis is not skipped as busy
  }
  follower.join();
  EXPECT_TRUE(followed.ok()) << followed;
  const std::string text = watched.text();
  // "waiting for the first analysis" first if the follower polled before step 1 was analyzed.
  EXPECT_LT(text.find("step 1\n"), text.find("step 2\n")) << text;
  // Each analysis is a header row and the matrix's row.
  const std::vector<std::string> tables = absl::StrSplit(text, "DOMINANCE_RATIO_MIN");
  const std::vector<std::string> rows = absl::StrSplit(text, kMatrix);
  EXPECT_EQ(tables.size(), 3u) << text;
  EXPECT_EQ(rows.size(), 3u) << text;
}

TEST_F(OptctlTest, DeleteTakesTheAdminTokenOrTheSessionsOwn) {
  Create("deleted_by_admin");
  client::Session by_owner = Create("deleted_by_owner");
  client::Session bystander = Create("kept_from_bystander");
  client::Client admin = Client();
  client::Client anonymous = Client("");
  std::ostringstream out;
  ASSERT_TRUE(client::RunDelete(admin, "deleted_by_admin", "", out).ok());
  EXPECT_EQ(client::RunDelete(anonymous, "deleted_by_owner", bystander.token(), out).code(),
            absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(client::RunDelete(anonymous, "deleted_by_owner", by_owner.token(), out).ok());
  ASSERT_TRUE(client::RunDelete(admin, "kept_from_bystander", "", out).ok());
  EXPECT_EQ(out.str(),
            "deleted: deleted_by_admin\ndeleted: deleted_by_owner\ndeleted: kept_from_bystander\n");
  std::ostringstream list;
  ASSERT_TRUE(client::RunList(admin, list).ok());
  EXPECT_THAT(list.str(), Not(HasSubstr("deleted_by")));
  EXPECT_THAT(list.str(), Not(HasSubstr("kept_from")));
}

// The binary itself: create, then inspect, dump and step with the token from the environment,
// list, delete.
TEST_F(OptctlTest, BinaryDrivesASession) {
  const BinaryRun created = RunBinary(absl::StrCat("create '", config_path(), "' --id=binary"),
                                      absl::StrCat("OPTD_ADMIN_TOKEN=", kAdminToken));
  ASSERT_EQ(created.exit_code, 0) << created.err;
  EXPECT_EQ(Field(created.out, "session_id"), "binary");
  const std::string token = Field(created.out, "token");
  ASSERT_FALSE(token.empty()) << created.out;
  const std::string env = absl::StrCat("OPTD_TOKEN=", token);

  const BinaryRun inspect = RunBinary("inspect binary", env);
  EXPECT_EQ(inspect.exit_code, 0) << inspect.err;
  EXPECT_EQ(Field(inspect.out, "step"), "0") << inspect.out;
  EXPECT_THAT(inspect.out, HasSubstr(kMatrix));

  const std::string dump_dir = Path(dir_, "dump");
  const BinaryRun dump = RunBinary(
      absl::StrCat("dump binary '", dump_dir, "' --tensors=norm/scale --wire_dtype=fp32"), env);
  EXPECT_EQ(dump.exit_code, 0) << dump.err;
  absl::StatusOr<client::NpyArray> array = client::ReadNpy(Path(dump_dir, kVectorFile));
  ASSERT_TRUE(array.ok()) << array.status();
  client::Session session = Client().OpenSession("binary", token);
  EXPECT_TRUE(BitwiseEqual(array->data, session.GetParameters()->at(kVector)));

  // A step with the step flags set, against a twin stepped through the client with the same
  // options.
  absl::StatusOr<client::Session> twin = Client().CreateSession(ParsedConfig(), "binary_twin");
  ASSERT_TRUE(twin.ok()) << twin.status();
  const std::vector<float> matrix_grad = Gradient(48, 0, 1, 0);
  const std::string grads_dir = Path(dir_, "grads");
  std::filesystem::create_directories(grads_dir);
  WriteGradient(Path(grads_dir, kMatrixFile), {8, 6}, matrix_grad);
  client::StepOptions step_options;
  step_options.lr = 0.05;
  step_options.wire_dtype = DType::kF16;
  step_options.result_dtype = DType::kBF16;
  step_options.chunk_bytes = 64;
  absl::StatusOr<client::StepResult> expected =
      twin->Step(1, {{kMatrix, matrix_grad}}, step_options);
  ASSERT_TRUE(expected.ok()) << expected.status();
  const std::string out_dir = Path(dir_, "out");
  const BinaryRun step = RunBinary(
      absl::StrCat("step binary --step=1 --grads='", grads_dir, "' --out='", out_dir,
                   "' --worker=0 --lr=0.05 --wire_dtype=fp16 --result_dtype=bf16 --chunk_bytes=64"),
      env);
  ASSERT_EQ(step.exit_code, 0) << step.err;
  EXPECT_EQ(Field(step.out, "tensors_updated"), "1") << step.out;
  for (const auto& [name, file] :
       {std::pair{kMatrix, kMatrixFile}, std::pair{kVector, kVectorFile}}) {
    absl::StatusOr<client::NpyArray> result = client::ReadNpy(Path(out_dir, file));
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(BitwiseEqual(result->data, expected->values.at(name))) << name;
  }

  const BinaryRun list = RunBinary(absl::StrCat("--admin_token=", kAdminToken, " list"));
  EXPECT_EQ(list.exit_code, 0) << list.err;
  // SESSION STEP LOADED STATE CHECKPOINT_STEP, with a space inside STATE ("1.2 KiB").
  const std::vector<std::string> row = Row(list.out, "binary");
  ASSERT_EQ(row.size(), 6u) << list.out;
  EXPECT_EQ(row[1], "1");
  EXPECT_EQ(row[2], "true");

  const BinaryRun deleted =
      RunBinary("delete binary", absl::StrCat(env, " OPTD_ADMIN_TOKEN=", kAdminToken));
  EXPECT_EQ(deleted.exit_code, 0) << deleted.err;
  EXPECT_EQ(deleted.out, "deleted: binary\n");
}

TEST_F(OptctlTest, BinaryUsageErrorsExitWithTwo) {
  for (const std::string args :
       {"", "frobnicate", "list extra", "--no_such_flag list", "--timeout_s=soon health",
        "list --step=3", "step s --grads=/tmp", "step s --step=1", "dump s d --wire_dtype=fp64"}) {
    const BinaryRun run = RunBinary(args);
    EXPECT_EQ(run.exit_code, 2) << "optctl " << args << ": " << run.err;
    EXPECT_THAT(run.err, HasSubstr("optctl: INVALID_ARGUMENT: ")) << args;
  }
}

}  // namespace
}  // namespace optd::testing
