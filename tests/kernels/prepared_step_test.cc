// Prepared steps (Optimizer::PrepareTensor / CommitPrepared, the daemon's per-tensor pipelining):
// for every preset, a step prepared tensor by tensor and committed equals Step bit for bit —
// parameters, every state buffer, step counts — over steps with every tensor, with some absent,
// with a learning-rate override, and mixed with Step for the tensors not prepared; and nothing
// committed changes until CommitPrepared, whatever PrepareTensor refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/optimizer.h"
#include "kernels/optimizer_config.h"
#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

// Bits, so that -0 and NaN payloads count as the difference they are.
std::vector<uint32_t> Bits(absl::Span<const float> values) {
  std::vector<uint32_t> bits(values.size());
  if (!values.empty()) std::memcpy(bits.data(), values.data(), values.size() * sizeof(float));
  return bits;
}

class PreparedStepTest : public testing::CpuOptimizerTest {
 protected:
  // Two same-shape matrices (one batch in Step), a transposed one, a batched rank-3 tensor of the
  // same matrix shape, and AdamW's vector and embedding.
  std::vector<TensorSpec> Specs(const std::string& preset) {
    const OptimizerConfig m = Config(preset);
    const OptimizerConfig a = Config("adamw");
    return {
        {"q", {8, 12}, RankPolicy::kFlatten, m},   {"k", {8, 12}, RankPolicy::kFlatten, m},
        {"mlp", {12, 8}, RankPolicy::kFlatten, m}, {"experts", {2, 8, 12}, RankPolicy::kBatch, m},
        {"bias", {16}, RankPolicy::kFlatten, a},   {"embed", {10, 6}, RankPolicy::kFlatten, a}};
  }
  std::unique_ptr<Optimizer> Make(const std::vector<TensorSpec>& specs) {
    auto opt = Optimizer::Create(*backend_, specs);
    EXPECT_TRUE(opt.ok()) << opt.status();
    if (!opt.ok()) return nullptr;
    for (int t = 0; t < (*opt)->num_tensors(); ++t) {
      EXPECT_TRUE(
          (*opt)->SetParameters(t, reference::RandomNormal((*opt)->num_elements(t), 100 + t)).ok());
    }
    return std::move(*opt);
  }
  // Everything a step changes, as bits.
  std::vector<std::vector<uint32_t>> Everything(const Optimizer& opt) {
    std::vector<std::vector<uint32_t>> all;
    for (int t = 0; t < opt.num_tensors(); ++t) {
      std::vector<float> w(opt.num_elements(t));
      EXPECT_TRUE(opt.GetParameters(t, absl::MakeSpan(w)).ok());
      all.push_back(Bits(w));
      for (const StateBuffer& b : opt.state(t)) {
        all.push_back(Bits(absl::MakeConstSpan(b.data, b.count)));  // CPU backend: host memory
      }
      all.push_back({static_cast<uint32_t>(opt.steps_applied(t))});
    }
    return all;
  }
};

std::vector<std::string> PresetSpecs() {
  std::vector<std::string> specs(PresetNames().begin(), PresetNames().end());
  specs.push_back("keller,precision=fp32");
  specs.push_back("normuon,precision=fp32");
  specs.push_back("keller,direction=polar");
  specs.push_back("muoneq_rowcol,pre_normalize.row_at_step=3");
  return specs;
}

TEST_F(PreparedStepTest, EveryPresetEqualsStepBitForBit) {
  for (const std::string& preset : PresetSpecs()) {
    SCOPED_TRACE(preset);
    const std::vector<TensorSpec> specs = Specs(preset);
    auto serial = Make(specs);
    auto prepared = Make(specs);
    ASSERT_NE(serial, nullptr);
    ASSERT_NE(prepared, nullptr);
    const int n = serial->num_tensors();
    for (int step = 1; step <= 4; ++step) {
      SCOPED_TRACE(absl::StrCat("step ", step));
      // Step 2 leaves "k" and "bias" out; step 3 overrides the learning rate (and skips the range
      // check the caller has made); step 4 prepares only some tensors and steps the others with
      // Step before the commit.
      std::unique_ptr<bool[]> present(new bool[n]);
      for (int t = 0; t < n; ++t) present[t] = !(step == 2 && (t == 1 || t == 4));
      const std::optional<double> lr = step == 3 ? std::optional<double>(0.003) : std::nullopt;
      std::unique_ptr<bool[]> rest(new bool[n]);
      for (int t = 0; t < n; ++t) {
        rest[t] = false;
        if (!present[t]) continue;
        const std::vector<float> g =
            reference::RandomNormal(serial->num_elements(t), 10 * step + t);
        ASSERT_TRUE(serial->SetGradient(t, g).ok());
        if (step == 4 && t % 2 == 1) {
          ASSERT_TRUE(prepared->SetGradient(t, g).ok());
          rest[t] = true;
          continue;
        }
        // Step 3 prepares through PrepareCheckedTensor (every value is in range): the same bits.
        const absl::Status status = step == 3 ? prepared->PrepareCheckedTensor(t, g, lr)
                                              : prepared->PrepareTensor(t, g, lr);
        ASSERT_TRUE(status.ok()) << specs[t].name;
        EXPECT_TRUE(prepared->prepared(t));
      }
      ASSERT_TRUE(serial->Step(absl::MakeConstSpan(present.get(), n), lr).ok());
      if (step == 4) {
        ASSERT_TRUE(prepared->Step(absl::MakeConstSpan(rest.get(), n), lr).ok());
      }
      // The prepared parameters are read before the commit; they are what it commits.
      std::vector<std::vector<float>> ahead(n);
      for (int t = 0; t < n; ++t) {
        if (!prepared->prepared(t)) continue;
        ahead[t].resize(prepared->num_elements(t));
        ASSERT_TRUE(prepared->GetPreparedParameters(t, absl::MakeSpan(ahead[t])).ok());
      }
      prepared->CommitPrepared();
      for (int t = 0; t < n; ++t) EXPECT_FALSE(prepared->prepared(t));
      ASSERT_EQ(Everything(*prepared), Everything(*serial));
      for (int t = 0; t < n; ++t) {
        if (ahead[t].empty()) continue;
        std::vector<float> w(serial->num_elements(t));
        ASSERT_TRUE(serial->GetParameters(t, absl::MakeSpan(w)).ok());
        EXPECT_EQ(Bits(ahead[t]), Bits(w)) << specs[t].name;
      }
    }
  }
}

TEST_F(PreparedStepTest, MatricesOfManyTilesToo) {
  // Shapes past the CPU backend's product tiles (and, batched, past one tile row per matrix).
  for (const std::string& preset : {std::string("keller,precision=fp32"), std::string("normuon")}) {
    SCOPED_TRACE(preset);
    const OptimizerConfig m = Config(preset);
    const std::vector<TensorSpec> specs = {{"a", {300, 520}, RankPolicy::kFlatten, m},
                                           {"b", {300, 520}, RankPolicy::kFlatten, m},
                                           {"c", {2, 300, 520}, RankPolicy::kBatch, m}};
    auto serial = Make(specs);
    auto prepared = Make(specs);
    ASSERT_NE(serial, nullptr);
    ASSERT_NE(prepared, nullptr);
    for (int step = 1; step <= 2; ++step) {
      for (int t = 0; t < 3; ++t) {
        const std::vector<float> g = reference::RandomNormal(serial->num_elements(t), step * 7 + t);
        ASSERT_TRUE(serial->SetGradient(t, g).ok());
        ASSERT_TRUE(prepared->PrepareTensor(t, g).ok());
      }
      ASSERT_TRUE(serial->Step().ok());
      EXPECT_EQ(prepared->CommitPrepared(), 3);
      ASSERT_EQ(Everything(*prepared), Everything(*serial));
    }
  }
}

TEST_F(PreparedStepTest, NothingCommittedChangesUntilTheCommit) {
  const std::vector<TensorSpec> specs = Specs("normuon");
  auto opt = Make(specs);
  ASSERT_NE(opt, nullptr);
  for (int t = 0; t < opt->num_tensors(); ++t) {
    ASSERT_TRUE(opt->SetGradient(t, reference::RandomNormal(opt->num_elements(t), t)).ok());
  }
  ASSERT_TRUE(opt->Step().ok());  // a momentum and second-moment history
  const auto before = Everything(*opt);
  for (int t = 0; t < opt->num_tensors(); ++t) {
    ASSERT_TRUE(opt->PrepareTensor(t, reference::RandomNormal(opt->num_elements(t), 50 + t)).ok());
  }
  EXPECT_EQ(Everything(*opt), before);
  opt->DiscardPrepared();
  EXPECT_EQ(Everything(*opt), before);
  EXPECT_EQ(opt->CommitPrepared(), 0);
  EXPECT_EQ(Everything(*opt), before);
  std::vector<float> w(opt->num_elements(0));
  EXPECT_EQ(opt->GetPreparedParameters(0, absl::MakeSpan(w)).code(),
            absl::StatusCode::kFailedPrecondition);

  // A gradient Step would refuse: Step's code and message, the tensor not prepared, nothing
  // changed; one prepared before it stays prepared.
  ASSERT_TRUE(opt->PrepareTensor(1, reference::RandomNormal(opt->num_elements(1), 7)).ok());
  std::vector<float> bad = reference::RandomNormal(opt->num_elements(0), 8);
  bad[5] = std::nanf("");
  bad[9] = 1e30f;
  const absl::Status refused = opt->PrepareTensor(0, bad);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(refused.message(),
            absl::StrCat("gradient for tensor 'q' has 2 of 96 values that are NaN, infinite or "
                         "beyond ±",
                         kMaxGradientMagnitude));
  EXPECT_FALSE(opt->prepared(0));
  EXPECT_TRUE(opt->prepared(1));
  EXPECT_EQ(Everything(*opt), before);
  // So is an lr the tensor's config refuses, and a gradient of the wrong size.
  EXPECT_EQ(opt->PrepareTensor(0, reference::RandomNormal(96, 9), -1.0).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->PrepareTensor(0, reference::RandomNormal(95, 9)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->PrepareTensor(99, reference::RandomNormal(95, 9)).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_FALSE(opt->prepared(0));
  EXPECT_EQ(Everything(*opt), before);
  EXPECT_EQ(opt->CommitPrepared(), 1);
  EXPECT_NE(Everything(*opt), before);
  EXPECT_EQ(opt->steps_applied(1), 2);
  EXPECT_EQ(opt->steps_applied(0), 1);
}

TEST_F(PreparedStepTest, ShadowBytesCountParametersAndState) {
  auto opt = Make(Specs("normuon"));
  ASSERT_NE(opt, nullptr);
  EXPECT_EQ(opt->ShadowBytes(0), (2 * 96 + 8) * 4);  // w, m and one v per row
  EXPECT_EQ(opt->ShadowBytes(4), 3 * 16 * 4);        // AdamW: w, m, v
  auto keller = Make(Specs("keller"));
  ASSERT_NE(keller, nullptr);
  EXPECT_EQ(keller->ShadowBytes(3), 2 * 192 * 4);
  // q, k and experts share a Newton–Schulz batch; mlp is alone; AdamW steps per tensor.
  EXPECT_TRUE(keller->SteppedInABatch(0));
  EXPECT_TRUE(keller->SteppedInABatch(1));
  EXPECT_FALSE(keller->SteppedInABatch(2));
  EXPECT_TRUE(keller->SteppedInABatch(3));
  EXPECT_FALSE(keller->SteppedInABatch(4));
  auto rmnp = Make(Specs("rmnp"));  // fused: per tensor
  ASSERT_NE(rmnp, nullptr);
  EXPECT_FALSE(rmnp->SteppedInABatch(0));
}

}  // namespace
}  // namespace optd
