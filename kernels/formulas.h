// The per-element and per-row formulas of optd's optimizers, written once for both backends.
//
// Every function here is `OPTD_HOST_DEVICE`: the CPU backend calls it in its loops and the CUDA
// kernels call it per thread, so the CPU tests exercise the arithmetic the GPU runs. The header
// depends on nothing but the C++ standard library so nvcc compiles it as is. All arithmetic is
// fp32 in the order the reference implementations (../shared/REFERENCES.md) evaluate it.
#ifndef OPTD_KERNELS_FORMULAS_H_
#define OPTD_KERNELS_FORMULAS_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/float16.h"  // defines OPTD_HOST_DEVICE

namespace optd::formulas {

// The conversions of common/float16.h, as the formulas name them.
using ::optd::Bf16BitsToFloat;
using ::optd::BitsToFloat;
using ::optd::FloatBits;
using ::optd::FloatToBf16Bits;
using ::optd::FloatToHalfBits;
using ::optd::HalfBitsToFloat;
using ::optd::IsOutOfRange;
using ::optd::RoundToBf16;
using ::optd::RoundToHalf;

// torch.lerp's two-branch evaluation (aten/src/ATen/native/Lerp.h). Scalars such as 1 − μ arrive
// formed in fp64 on the host, as the references form them in Python. The result matches torch up to
// fp32 rounding, not bit for bit: torch's vectorized CPU path fuses a multiply-add.
OPTD_HOST_DEVICE float Lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start)
                              : end - (end - start) * (1.0f - weight);
}

enum class MomentumKind : int { kEma = 0, kSum = 1 };

// Momentum settings as the kernels use them; one_minus_mu = 1 − μ formed in fp64 on the host.
struct MomentumScalars {
  float mu;
  float one_minus_mu;
  MomentumKind kind;
  bool nesterov;
};

// Updates the momentum buffer `m` with gradient `g` and returns the direction's input u.
//   ema: m <- lerp(m, g, 1-mu);  Nesterov u = lerp(g, m, mu), else u = m   (Keller, torch, NorMuon)
//   sum: m <- mu*m + g;          Nesterov u = g + mu*m,      else u = m   (Moonlight, RMNP, MuonEq,
//                                                                          dion)
OPTD_HOST_DEVICE float MomentumStep(float& m, float g, const MomentumScalars& s) {
  if (s.kind == MomentumKind::kEma) {
    m = Lerp(m, g, s.one_minus_mu);
    return s.nesterov ? Lerp(g, m, s.mu) : m;
  }
  m = s.mu * m + g;
  return s.nesterov ? g + s.mu * m : m;
}

// Decoupled weight decay then the scaled step: w <- w·decay − lr·step, where decay = 1 − lr·λ is
// formed in fp64 on the host and `step` is the already scaled (and, where a preset says so,
// rounded) update.
OPTD_HOST_DEVICE float DecayAndStep(float w, float step, float lr, float decay) {
  return w * decay - lr * step;
}

// A matrix step's learning rate and decay factor 1 − lr·λ (formed in fp64 on the host), which the
// update kernels read from backend memory when they run: a recorded step replays with the values
// of the step it runs in, so a learning-rate schedule does not re-record it.
struct RateScalars {
  float lr;
  float decay;
};

// How AdamW places epsilon: kTorch m̂/(√v̂ + ε) (torch.optim.AdamW); kMoonlight m/(√v + ε) scaled by
// √bc2/bc1, i.e. m̂/(√v̂ + ε/√bc2) (Moonlight's toy_train.py).
enum class AdamEpsilon : int { kTorch = 0, kMoonlight = 1 };

// AdamW's per-step scalars, each formed in fp64 on the host as torch and Moonlight form them.
struct AdamWScalars {
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float decay;                  // 1 − lr·λ
  float step_size;              // lr/bc1 (kTorch) or lr·√bc2/bc1 (kMoonlight), bc = 1 − β^t
  float bias_correction2_sqrt;  // √(1 − β₂^t), kTorch only
  AdamEpsilon eps_placement;
};

// One AdamW element update with epsilon placed as kPlacement; updates w, m, v in place.
template <AdamEpsilon kPlacement>
OPTD_HOST_DEVICE void AdamWStepWith(float& w, float& m, float& v, float g, const AdamWScalars& s) {
  m = Lerp(m, g, s.one_minus_beta1);
  w = w * s.decay;
  if constexpr (kPlacement == AdamEpsilon::kTorch) {
    v = v * s.beta2 + s.one_minus_beta2 * (g * g);
    const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
    w = w - s.step_size * (m / denom);
  } else {
    v = Lerp(v, g * g, s.one_minus_beta2);
    w = w - s.step_size * (m / (s.eps + sqrtf(v)));
  }
}

// One AdamW element update; updates w, m, v in place.
OPTD_HOST_DEVICE void AdamWStep(float& w, float& m, float& v, float g, const AdamWScalars& s) {
  if (s.eps_placement == AdamEpsilon::kTorch) {
    AdamWStepWith<AdamEpsilon::kTorch>(w, m, v, g, s);
  } else {
    AdamWStepWith<AdamEpsilon::kMoonlight>(w, m, v, g, s);
  }
}

// RMNP's row ℓ2 normalization (seed 000, D = diag(VVᵀ)^(-1/2)·V): each row is divided by
// max(‖row‖₂, eps), the floor torch's F.normalize applies.
OPTD_HOST_DEVICE float RowL2Denominator(float norm, float eps) { return fmaxf(norm, eps); }

// MuonEq's equilibration factor for one row or column (seed 001): (Σu² + eps)^exponent, exponent
// -1/2 (or -1/4 for the two-sided variant's option), clipped to [1/clip, clip] when clip > 0.
// Takes root = √(Σu² + eps), which stays finite where Σu² itself would overflow fp32.
OPTD_HOST_DEVICE float EquilibrationScale(float root, float exponent, float clip) {
  float scale;
  if (exponent == -0.5f) {
    scale = 1.0f / root;
  } else if (exponent == -0.25f) {
    scale = sqrtf(1.0f / root);  // the reference's rsqrt_().sqrt_()
  } else {
    scale = powf(root, 2.0f * exponent);
  }
  if (clip > 0.0f) scale = fminf(fmaxf(scale, 1.0f / clip), clip);
  return scale;
}

// How the Frobenius normalization before Newton–Schulz treats epsilon: kAdd X/(s‖X‖+ε) (Keller,
// dion), kFloor X/max(s‖X‖, ε) (torch.optim.Muon).
enum class NormEpsilon : int { kAdd = 0, kFloor = 1 };

// The divisor of that normalization.
OPTD_HOST_DEVICE float FrobeniusDenominator(float norm, float safety, float eps, NormEpsilon mode) {
  return mode == NormEpsilon::kAdd ? norm * safety + eps : fmaxf(norm * safety, eps);
}

// NorMuon's per-neuron second moment (seed 002, Algorithm 1): v <- lerp(v, mean_row(o²), 1-β₂).
OPTD_HOST_DEVICE float NorMuonSecondMoment(float v, float mean_square, float one_minus_beta2) {
  return Lerp(v, mean_square, one_minus_beta2);
}

// NorMuon's per-neuron step factor: 1/(√v + ε).
OPTD_HOST_DEVICE float NorMuonRowScale(float v, float eps) { return 1.0f / (sqrtf(v) + eps); }

// The Newton–Schulz polynomial applied to one singular value: p(s) = a·s + b·s³ + c·s⁵.
OPTD_HOST_DEVICE double NewtonSchulzPolynomial(double s, double a, double b, double c) {
  const double s2 = s * s;
  return s * (a + s2 * (b + c * s2));
}

}  // namespace optd::formulas

#endif  // OPTD_KERNELS_FORMULAS_H_
