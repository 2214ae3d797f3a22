// The service benchmark, on GPT-2 small's shapes (124M parameters):
// - the remote step (gradients streamed to an optd process over loopback TCP, the step, the new
//   parameters streamed back) against the same step in-process on the kernels library;
// - gradient streaming throughput (UploadParams, which decodes and checks every chunk as a Step
//   does, without the optimizer) and result streaming (GetParams), per chunk size.
// bench/service.sh runs it beside iperf3 (the raw loopback TCP ceiling) and writes RESULTS.md.
//
// Usage: service_bench OPTD_BINARY [--repetitions=N] [--presets=keller,rmnp] > out.json
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/models.h"
#include "grpcpp/grpcpp.h"
#include "kernels/backend.h"
#include "kernels/cpu/openblas_core.h"
#include "kernels/initializers.h"
#include "kernels/optimizer.h"
#include "optd/v1/optd.grpc.pb.h"
#include "server/session_config.h"

namespace {

using optd::client::NamedTensor;

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::string group;
};

// GPT-2 small in PyTorch's [out, in] layout from the model catalogue (client/models.h): 48 block
// matrices on the matrix preset; embeddings, biases and LayerNorm vectors on AdamW, as the seeds'
// setups do.
std::vector<Tensor> Gpt2Small() {
  const absl::StatusOr<std::vector<optd::loadgen::TensorShape>> shapes =
      optd::loadgen::ModelShapes("gpt2-small");
  std::vector<Tensor> t;
  for (const optd::loadgen::TensorShape& shape : shapes.value()) {
    t.push_back({shape.name, shape.shape, shape.adamw ? "adamw" : "matrices"});
  }
  return t;
}

optd::v1::SessionConfig Config(const std::vector<Tensor>& tensors, const std::string& preset) {
  optd::v1::SessionConfig config;
  for (const auto& [name, p] :
       {std::pair<std::string, std::string>{"matrices", preset}, {"adamw", "adamw"}}) {
    optd::v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(p);
  }
  uint64_t seed = 1;
  for (const Tensor& t : tensors) {
    optd::v1::TensorConfig* tc = config.add_tensors();
    tc->set_name(t.name);
    for (int64_t d : t.shape) tc->add_shape(d);
    tc->set_group(t.group);
    tc->mutable_normal()->set_seed(seed++);
    tc->mutable_normal()->set_std(0.02);
  }
  return config;
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string Json(const std::vector<double>& v) {
  return absl::StrCat("[", absl::StrJoin(v, ", "), "]");
}

// CPU seconds this process has used (user + system).
double ProcessCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// The machine's CPU time from /proc/stat, in clock ticks: all of it, and the busy part (neither
// idle nor waiting for I/O).
struct MachineCpu {
  double total = 0;
  double busy = 0;
};
MachineCpu ReadMachineCpu() {
  std::ifstream stat("/proc/stat");
  std::string cpu;
  stat >> cpu;
  MachineCpu times;
  for (int field = 0; field < 8; ++field) {  // user nice system idle iowait irq softirq steal
    double ticks = 0;
    stat >> ticks;
    times.total += ticks;
    if (field != 3 && field != 4) times.busy += ticks;
  }
  return times;
}

// The fraction of the machine's CPU time that was busy since `start`.
double BusyFraction(const MachineCpu& start) {
  const MachineCpu now = ReadMachineCpu();
  const double total = now.total - start.total;
  return total > 0 ? (now.busy - start.busy) / total : 0.0;
}

// Per-tensor buffers a step's parameters come back into, as a training loop steps in place,
// and the outputs naming them.
struct ResultBuffers {
  ResultBuffers(const std::vector<Tensor>& tensors,
                const std::vector<std::vector<float>>& gradients) {
    values.reserve(tensors.size());  // the outputs' spans stay where they point
    for (size_t t = 0; t < tensors.size(); ++t) {
      values.emplace_back(gradients[t].size());
      outputs.push_back({tensors[t].name, absl::MakeSpan(values.back())});
    }
  }
  ResultBuffers(const ResultBuffers&) = delete;
  ResultBuffers& operator=(const ResultBuffers&) = delete;

  std::vector<std::vector<float>> values;
  std::vector<optd::client::NamedOutput> outputs;
};

void Die(const absl::Status& status, const char* what) {
  if (status.ok()) return;
  std::fprintf(stderr, "service_bench: %s: %s\n", what, status.ToString().c_str());
  std::exit(1);
}

// optd in a child process on a free loopback port.
class Daemon {
 public:
  // optd, with one more command-line flag unless `flag` is empty.
  explicit Daemon(const std::string& binary, const std::string& flag = "")
      : Daemon(binary,
               {"--listen=127.0.0.1:0", "--metrics_addr=127.0.0.1:0",
                "--max_session_bytes=17179869184", flag},
               "--port_file=") {}
  // This binary's bare gRPC server (RunBareServer).
  static std::unique_ptr<Daemon> Bare() {
    return std::unique_ptr<Daemon>(new Daemon("/proc/self/exe", {}, "--bare_server="));
  }
  ~Daemon() {
    kill(pid_, SIGTERM);
    waitpid(pid_, nullptr, 0);
    unlink(port_file_.c_str());
  }
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }
  // The process's CPU time so far (user and system, from /proc/PID/stat), in seconds.
  double CpuSeconds() const {
    std::ifstream stat(absl::StrCat("/proc/", pid_, "/stat"));
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    const std::vector<std::string> fields =
        absl::StrSplit(text.substr(text.rfind(')') + 2), ' ', absl::SkipEmpty());
    if (fields.size() < 13) return 0;
    return static_cast<double>(std::stoll(fields[11]) + std::stoll(fields[12])) /
           static_cast<double>(sysconf(_SC_CLK_TCK));
  }

 private:
  // `binary` with `args` (empty ones left out) and `port_flag` naming the file it writes its
  // port to; waits for the port.
  Daemon(const std::string& binary, std::vector<std::string> args, const std::string& port_flag) {
    static int started = 0;
    port_file_ = absl::StrCat("/tmp/service_bench.", getpid(), ".", started++, ".port");
    unlink(port_file_.c_str());
    args.push_back(port_flag + port_file_);
    std::vector<char*> argv = {const_cast<char*>(binary.c_str())};
    for (std::string& a : args) {
      if (!a.empty()) argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      execv(binary.c_str(), argv.data());
      _exit(127);
    }
    for (int i = 0; i < 3000 && port_ == 0; ++i) {
      std::ifstream in(port_file_);
      if (!(in >> port_)) port_ = 0;
      if (port_ == 0) absl::SleepFor(absl::Milliseconds(10));
    }
    if (port_ == 0) Die(absl::UnavailableError("the server did not start"), binary.c_str());
  }

  pid_t pid_ = -1;
  int port_ = 0;
  std::string port_file_;
};

// The bare gRPC baseline of the streaming figures: the same Optimizer service, but UploadParams
// only receives its messages (gRPC's read and parse, nothing decoded or checked) and GetParams
// only sends the model's tensors in the request's chunks from the server's own copy of them (one
// buffer of the model's size, filled, so that its bytes come from memory as a real server's
// parameters do, not from one cache-resident chunk), so the same client code streams the same
// bytes against it as against optd.
class BareService final : public optd::v1::Optimizer::Service {
 public:
  explicit BareService(std::vector<Tensor> tensors) : tensors_(std::move(tensors)) {
    for (const Tensor& t : tensors_) {
      values_.emplace_back(static_cast<size_t>(*optd::ElementCount(t.shape)));
      optd::FillNormal(values_.size(), 0.0, 1.0, absl::MakeSpan(values_.back()));
    }
  }

  grpc::Status CreateSession(grpc::ServerContext*, const optd::v1::CreateSessionRequest*,
                             optd::v1::CreateSessionResponse* response) override {
    response->set_session_id("bare");
    response->set_token("bare");
    return grpc::Status::OK;
  }
  grpc::Status DeleteSession(grpc::ServerContext*, const optd::v1::DeleteSessionRequest*,
                             optd::v1::DeleteSessionResponse*) override {
    return grpc::Status::OK;
  }
  grpc::Status UploadParams(grpc::ServerContext*,
                            grpc::ServerReader<optd::v1::UploadParamsRequest>* reader,
                            optd::v1::UploadParamsResponse*) override {
    optd::v1::UploadParamsRequest request;
    while (reader->Read(&request)) {
    }
    return grpc::Status::OK;
  }
  grpc::Status GetParams(grpc::ServerContext*, const optd::v1::GetParamsRequest* request,
                         grpc::ServerWriter<optd::v1::TensorChunk>* writer) override {
    const int64_t chunk_floats = std::max<int64_t>(1, request->chunk_bytes() / 4);
    optd::v1::TensorChunk chunk;
    chunk.set_dtype(optd::v1::DTYPE_FP32);
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const int64_t n = static_cast<int64_t>(values_[t].size());
      chunk.set_tensor(tensors_[t].name);
      for (int64_t offset = 0; offset < n; offset += chunk_floats) {
        chunk.set_offset(offset);
        chunk.set_data(values_[t].data() + offset,
                       static_cast<size_t>(std::min(chunk_floats, n - offset)) * 4);
        if (!writer->Write(chunk)) return grpc::Status::CANCELLED;
      }
    }
    return grpc::Status::OK;
  }

 private:
  const std::vector<Tensor> tensors_;
  std::vector<std::vector<float>> values_;  // the model's parameters, one vector per tensor
};

// service_bench --bare_server=PORT_FILE: serves BareService on a free loopback port, written to
// PORT_FILE, until killed.
int RunBareServer(const std::string& port_file) {
  BareService service(Gpt2Small());
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(16 << 20);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) return 1;
  std::ofstream(port_file) << port << "\n";
  server->Wait();
  return 0;
}

// The session's parameters streamed down (GetParams, fp32, 1 MiB chunks) into `outputs`, as a
// step's results come back into a training loop's buffers.
void GetParamsInto(optd::client::Client& client, const optd::client::Session& session,
                   const std::map<std::string, absl::Span<float>>& outputs,
                   int64_t chunk_bytes = int64_t{1} << 20) {
  std::unique_ptr<optd::v1::Optimizer::Stub> stub = optd::v1::Optimizer::NewStub(client.channel());
  grpc::ClientContext context;
  context.AddMetadata("authorization", absl::StrCat("Bearer ", session.token()));
  optd::v1::GetParamsRequest request;
  request.set_session_id(session.id());
  request.set_dtype(optd::v1::DTYPE_FP32);
  request.set_chunk_bytes(chunk_bytes);
  std::unique_ptr<grpc::ClientReader<optd::v1::TensorChunk>> reader =
      stub->GetParams(&context, request);
  optd::v1::TensorChunk chunk;
  while (reader->Read(&chunk)) {
    const absl::Span<float> out = outputs.at(chunk.tensor());
    std::memcpy(out.data() + chunk.offset(), chunk.data().data(), chunk.data().size());
  }
  Die(optd::client::FromGrpcStatus(reader->Finish()), "GetParams");
}

}  // namespace

int main(int argc, char** argv) {
  // The kernels the daemon runs (kernels/cpu/openblas_core.h): the in-process step and the
  // daemons it starts, which inherit the choice, compute with the same products.
  optd::RestartWithSuitedOpenBlasCoreOrWarn(argv);
  if (argc == 2 && std::string(argv[1]).rfind("--bare_server=", 0) == 0) {
    return RunBareServer(std::string(argv[1]).substr(14));
  }
  if (argc < 2) {
    std::fprintf(stderr, "usage: service_bench OPTD_BINARY [--repetitions=N] [--presets=a,b]\n");
    return 2;
  }
  int repetitions = 3;
  std::vector<std::string> presets = {"keller", "rmnp"};
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--repetitions=", 0) == 0) repetitions = std::stoi(arg.substr(14));
    if (arg.rfind("--presets=", 0) == 0) {
      presets = absl::StrSplit(arg.substr(10), ',', absl::SkipEmpty());
    }
  }
  const std::vector<Tensor> tensors = Gpt2Small();
  int64_t elements = 0;
  std::vector<std::vector<float>> gradients;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = *optd::ElementCount(tensors[t].shape);
    elements += n;
    gradients.emplace_back(static_cast<size_t>(n));
    optd::FillNormal(1000 + t, 0.0, 1e-3, absl::MakeSpan(gradients.back()));
  }
  std::vector<NamedTensor> named;
  for (size_t t = 0; t < tensors.size(); ++t) named.push_back({tensors[t].name, gradients[t]});
  const double gradient_bytes = static_cast<double>(elements) * sizeof(float);
  std::fprintf(stderr, "service_bench: GPT-2 small, %zu tensors, %lld parameters\n", tensors.size(),
               static_cast<long long>(elements));

  Daemon daemon(argv[1]);
  optd::client::ChannelOptions channel_options;
  channel_options.target = daemon.target();
  optd::client::Client client(*optd::client::MakeChannel(channel_options));
  // The same daemon with every step serial: what per-tensor pipelining gains, in the same run.
  Daemon serial_daemon(argv[1], "--pipeline_scratch_bytes=0");
  optd::client::ChannelOptions serial_options;
  serial_options.target = serial_daemon.target();
  optd::client::Client serial_client(*optd::client::MakeChannel(serial_options));

  std::vector<std::string> results;
  for (const std::string& preset : presets) {
    const optd::v1::SessionConfig config = Config(tensors, preset);
    // In-process: the kernels library alone, gradients already in its staging buffers.
    std::vector<double> local, local_cpu;
    {
      std::unique_ptr<optd::Backend> backend = *optd::CreateCpuBackend();
      optd::v1::SessionConfig normalized = config;
      Die(optd::server::NormalizeSessionConfig(normalized), "config");
      std::unique_ptr<optd::Optimizer> optimizer =
          *optd::Optimizer::Create(*backend, *optd::server::TensorSpecs(normalized));
      for (int r = 0; r <= repetitions; ++r) {
        for (size_t t = 0; t < tensors.size(); ++t) {
          Die(optimizer->SetGradient(static_cast<int>(t), gradients[t]), "SetGradient");
        }
        const auto start = std::chrono::steady_clock::now();
        const double cpu_start = ProcessCpuSeconds();
        Die(optimizer->Step(), "in-process step");
        if (r > 0) {  // the first is warm-up
          local.push_back(Seconds(start));
          local_cpu.push_back(ProcessCpuSeconds() - cpu_start);
        }
        std::fprintf(stderr, "service_bench: %s in-process step %d/%d: %.3f s\n", preset.c_str(), r,
                     repetitions, Seconds(start));
      }
    }
    // Remote: one worker's Step call, fp32 gradients in, fp32 parameters back; on the serial
    // daemon too, and the same bytes streamed alone (UploadParams of the gradients, GetParams of
    // the parameters into the same buffers) on the pipelining one.
    std::vector<double> remote, remote_bf16, transfer, transfer_busy, remote_busy;
    // One fresh session of `session_config` on `to`, stepped repetitions + 2 times on `path`
    // (the first two untimed); the timed steps' seconds.
    const auto time_steps = [&](optd::client::Client& to,
                                const optd::v1::SessionConfig& session_config,
                                optd::client::StepPath path, bool attach, const char* what) {
      absl::StatusOr<optd::client::Session> session = to.CreateSession(session_config);
      Die(session.status(), "CreateSession");
      if (attach) Die(session->AttachSharedMemory().status(), "AttachSharedMemory");
      ResultBuffers buffers(tensors, gradients);
      std::vector<double> seconds;
      for (int r = -1; r <= repetitions; ++r) {
        optd::client::StepOptions options;
        options.path = path;
        options.outputs = buffers.outputs;
        const auto start = std::chrono::steady_clock::now();
        Die(session->Step(r + 2, named, options).status(), what);
        if (r > 0) seconds.push_back(Seconds(start));
        std::fprintf(stderr, "service_bench: %s %s %d/%d: %.3f s\n", preset.c_str(), what, r,
                     repetitions, Seconds(start));
      }
      Die(session->Delete(), "DeleteSession");
      return seconds;
    };
    const std::vector<double> remote_serial =
        time_steps(serial_client, config, optd::client::StepPath::kAuto,
                   /*attach=*/false, "remote step, serial daemon");
    {
      absl::StatusOr<optd::client::Session> session = client.CreateSession(config);
      Die(session.status(), "CreateSession");
      int64_t step = 0;
      // The parameters come back into the client's own buffers, as a training loop steps.
      ResultBuffers buffers(tensors, gradients);
      const std::vector<optd::client::NamedOutput>& outputs = buffers.outputs;
      for (const optd::DType wire : {optd::DType::kF32, optd::DType::kBF16}) {
        // Two warm-up steps: the daemon's two result buffers are allocated by then.
        for (int r = -1; r <= repetitions; ++r) {
          optd::client::StepOptions options;
          options.wire_dtype = wire;
          options.result_dtype = wire;
          options.outputs = outputs;
          const auto start = std::chrono::steady_clock::now();
          const MachineCpu cpu_start = ReadMachineCpu();
          absl::StatusOr<optd::client::StepResult> result = session->Step(++step, named, options);
          Die(result.status(), "remote step");
          const double seconds = Seconds(start);
          if (r > 0) (wire == optd::DType::kF32 ? remote : remote_bf16).push_back(seconds);
          if (r > 0 && wire == optd::DType::kF32) remote_busy.push_back(BusyFraction(cpu_start));
          std::fprintf(stderr, "service_bench: %s remote step (%s wire) %d/%d: %.3f s\n",
                       preset.c_str(), std::string(optd::DTypeName(wire)).c_str(), r, repetitions,
                       seconds);
        }
      }
      std::map<std::string, absl::Span<float>> by_name;
      for (const optd::client::NamedOutput& o : outputs) by_name[o.name] = o.values;
      for (int r = 0; r <= repetitions; ++r) {
        const auto start = std::chrono::steady_clock::now();
        const MachineCpu cpu_start = ReadMachineCpu();
        Die(session->UploadParameters(named, optd::DType::kF32, int64_t{1} << 20), "UploadParams");
        GetParamsInto(client, *session, by_name);
        if (r > 0) {
          transfer.push_back(Seconds(start));
          transfer_busy.push_back(BusyFraction(cpu_start));
        }
        std::fprintf(stderr, "service_bench: %s the step's bytes alone %d/%d: %.3f s\n",
                     preset.c_str(), r, repetitions, Seconds(start));
      }
      Die(session->Delete(), "DeleteSession");
    }
    // Remote through shared memory: a session with a region for its worker, the fp32 gradients
    // written into it and the parameters read out of it by the client library (README,
    // "Clients"): the same step with no tensor bytes on the wire.
    optd::v1::SessionConfig shared_config = config;
    shared_config.set_shared_memory(true);
    const std::vector<double> remote_shared =
        time_steps(client, shared_config, optd::client::StepPath::kShared, /*attach=*/true,
                   "remote step, shared memory");
    results.push_back(absl::StrCat(
        "{\"preset\": \"", preset, "\", \"in_process_s\": ", Json(local),
        ", \"in_process_cpu_s\": ", Json(local_cpu), ", \"transfer_cpu_busy\": ",
        Json(transfer_busy), ", \"remote_fp32_cpu_busy\": ", Json(remote_busy),
        ", \"remote_fp32_s\": ", Json(remote), ", \"remote_bf16_s\": ", Json(remote_bf16),
        ", \"remote_serial_fp32_s\": ", Json(remote_serial), ", \"remote_shared_fp32_s\": ",
        Json(remote_shared), ", \"transfer_fp32_s\": ", Json(transfer),
        ", \"over_transfer_fp32\": ", Median(remote) / Median(transfer),
        ", \"overhead_fp32\": ", Median(remote) / Median(local),
        ", \"overhead_bf16\": ", Median(remote_bf16) / Median(local), "}"));
  }

  // Streaming throughput per chunk size: UploadParams (client -> optd, decoded and checked into
  // staging as gradients are) and GetParams (optd -> client), into the caller's buffers; at 1 MiB
  // the same against the bare gRPC server, in the same run, the two taking turns repetition by
  // repetition so that both meet the same state of a shared machine.
  std::vector<std::string> streaming;
  std::string bare_json;
  {
    std::unique_ptr<Daemon> bare = Daemon::Bare();
    optd::client::ChannelOptions bare_options;
    bare_options.target = bare->target();
    optd::client::Client bare_client(*optd::client::MakeChannel(bare_options));
    absl::StatusOr<optd::client::Session> bare_session =
        bare_client.CreateSession(Config(tensors, "rmnp"));
    Die(bare_session.status(), "CreateSession (bare server)");
    absl::StatusOr<optd::client::Session> session = client.CreateSession(Config(tensors, "rmnp"));
    Die(session.status(), "CreateSession");
    std::vector<std::vector<float>> buffers;
    std::map<std::string, absl::Span<float>> by_name;
    for (size_t t = 0; t < tensors.size(); ++t) {
      buffers.emplace_back(gradients[t].size());
      by_name[tensors[t].name] = absl::MakeSpan(buffers.back());
    }
    // One upload and one download of the whole model: GB/s of each, and the server's CPU
    // seconds per GB of each (what the transfer costs the server, whatever the client's share).
    struct Rates {
      double up = 0, down = 0, up_cpu = 0, down_cpu = 0;
    };
    const auto measure = [&](optd::client::Client& to, optd::client::Session& s, int64_t chunk,
                             const Daemon& server) {
      Rates rates;
      double cpu = server.CpuSeconds();
      auto start = std::chrono::steady_clock::now();
      Die(s.UploadParameters(named, optd::DType::kF32, chunk), "UploadParams");
      rates.up = gradient_bytes / Seconds(start) / 1e9;
      rates.up_cpu = (server.CpuSeconds() - cpu) / (gradient_bytes / 1e9);
      cpu = server.CpuSeconds();
      start = std::chrono::steady_clock::now();
      GetParamsInto(to, s, by_name, chunk);
      rates.down = gradient_bytes / Seconds(start) / 1e9;
      rates.down_cpu = (server.CpuSeconds() - cpu) / (gradient_bytes / 1e9);
      return rates;
    };
    struct Series {
      std::vector<double> up, down, up_cpu, down_cpu;
      void Add(const Rates& r) {
        up.push_back(r.up);
        down.push_back(r.down);
        up_cpu.push_back(r.up_cpu);
        down_cpu.push_back(r.down_cpu);
      }
      std::string ToJson(int64_t chunk) const {
        return absl::StrCat("{\"chunk_bytes\": ", chunk, ", \"up_gbps\": ", Json(up),
                            ", \"down_gbps\": ", Json(down),
                            ", \"up_cpu_s_per_gb\": ", Json(up_cpu),
                            ", \"down_cpu_s_per_gb\": ", Json(down_cpu), "}");
      }
    };
    std::map<int64_t, Series> optd_rates;
    Series bare_rates;
    for (int r = 0; r <= repetitions; ++r) {
      for (const int64_t chunk : {int64_t{256} << 10, int64_t{1} << 20, int64_t{4} << 20}) {
        if (chunk == int64_t{1} << 20) {
          const Rates bare_run = measure(bare_client, *bare_session, chunk, *bare);
          if (r > 0) bare_rates.Add(bare_run);
          std::fprintf(stderr, "service_bench: bare gRPC, 1024 KiB: up %.2f GB/s, down %.2f GB/s\n",
                       bare_run.up, bare_run.down);
        }
        const Rates run = measure(client, *session, chunk, daemon);
        if (r > 0) optd_rates[chunk].Add(run);
        std::fprintf(stderr, "service_bench: chunk %lld KiB: up %.2f GB/s, down %.2f GB/s\n",
                     static_cast<long long>(chunk >> 10), run.up, run.down);
      }
    }
    bare_json = bare_rates.ToJson(int64_t{1} << 20);
    for (const auto& [chunk, rates] : optd_rates) streaming.push_back(rates.ToJson(chunk));
    Die(session->Delete(), "DeleteSession");
  }
  std::printf(
      "{\"model\": \"gpt2-small\", \"tensors\": %zu, \"parameters\": %lld, "
      "\"repetitions\": %d, \"steps\": [%s], \"streaming\": [%s], \"bare_grpc\": %s}\n",
      tensors.size(), static_cast<long long>(elements), repetitions,
      absl::StrJoin(results, ", ").c_str(), absl::StrJoin(streaming, ", ").c_str(),
      bare_json.c_str());
  return 0;
}
