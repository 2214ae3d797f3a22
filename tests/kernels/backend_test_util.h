// Helpers the kernels tests share: a CPU backend, and host data moved in and out of backend memory.
#ifndef OPTD_TESTS_KERNELS_BACKEND_TEST_UTIL_H_
#define OPTD_TESTS_KERNELS_BACKEND_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/formulas.h"
#include "kernels/optimizer_config.h"

namespace optd::testing {

// The CPU backend; a test failure if it cannot be made.
inline std::unique_ptr<Backend> MakeCpuBackend() {
  auto backend = CreateCpuBackend();
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(*backend) : nullptr;
}

// A test of optimizers on the CPU backend: the backend, and configs parsed from their specs.
class CpuOptimizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = MakeCpuBackend();
    ASSERT_NE(backend_, nullptr);
  }
  OptimizerConfig Config(const std::string& spec) {
    auto config = ParseOptimizerConfig(spec);
    EXPECT_TRUE(config.ok()) << config.status();
    return *config;
  }
  std::unique_ptr<Backend> backend_;
};

// The backend named `name` ("cpu" or "cuda"). Null with `*skip` saying why when the backend
// cannot run here (no CUDA in the build, no driver, no device); a test failure for any other
// error.
inline std::unique_ptr<Backend> MakeBackend(const std::string& name, std::string* skip) {
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      name == "cuda" ? CreateCudaBackend() : CreateCpuBackend();
  if (backend.ok()) return std::move(*backend);
  if (backend.status().code() == absl::StatusCode::kUnavailable) {
    *skip = std::string(backend.status().message());
  } else {
    ADD_FAILURE() << name << " backend: " << backend.status();
  }
  return nullptr;
}

// Backend copies of host vectors, alive as long as this object.
class DeviceMemory {
 public:
  explicit DeviceMemory(Backend& backend) : backend_(backend) {}

  template <typename T>
  T* Upload(const std::vector<T>& host) {
    auto buffer = backend_.Allocate(host.size() * sizeof(T));
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_TRUE(
        backend_
            .Upload(backend_.default_queue(), buffer->data(), host.data(), host.size() * sizeof(T))
            .ok());
    buffers_.push_back(std::move(*buffer));
    return static_cast<T*>(buffers_.back().data());
  }

  std::vector<float> Download(const float* device, size_t count) {
    std::vector<float> host(count);
    Queue& queue = backend_.default_queue();
    EXPECT_TRUE(backend_.Download(queue, host.data(), device, count * sizeof(float)).ok());
    EXPECT_TRUE(backend_.Synchronize(queue).ok());
    return host;
  }

 private:
  Backend& backend_;
  std::vector<Buffer> buffers_;
};

// Rounds x in place to bf16 or fp16 and returns the 16-bit words, so a test can feed a GEMM
// narrow inputs and compute its reference from the same (exact) values.
inline std::vector<uint16_t> ToHalfWords(std::vector<float>& x, DType dtype) {
  std::vector<uint16_t> words(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    words[i] =
        dtype == DType::kBF16 ? formulas::FloatToBf16Bits(x[i]) : formulas::FloatToHalfBits(x[i]);
    x[i] = dtype == DType::kBF16 ? formulas::Bf16BitsToFloat(words[i])
                                 : formulas::HalfBitsToFloat(words[i]);
  }
  return words;
}

// The RMNP step both backend suites run (the conformance suite against its stages, the CUDA one
// against the CPU): Nesterov sum momentum, bf16 step, decay and scale that are not 1. Its rate
// goes to backend memory: TestRmnpStep(memory).
inline constexpr formulas::RateScalars kTestRmnpRate{.lr = 0.02f, .decay = 0.998f};
inline RmnpStepArgs TestRmnpStep(DeviceMemory& memory) {
  return RmnpStepArgs{.momentum = 0.95f,
                      .nesterov = true,
                      .eps = 1e-12f,
                      .rate = memory.Upload(std::vector<formulas::RateScalars>{kTestRmnpRate}),
                      .scale = 1.3f,
                      .step_dtype = DType::kBF16};
}

}  // namespace optd::testing

#endif  // OPTD_TESTS_KERNELS_BACKEND_TEST_UTIL_H_
