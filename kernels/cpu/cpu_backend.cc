// The CPU backend: single-threaded OpenBLAS calls on fixed tiles for GEMM and its symmetric forms,
// LAPACKE (fp64) for the SVD, and loops over the shared formulas (kernels/formulas.h) for
// everything else, all spread over the backend's own ThreadPool (kernels/cpu/thread_pool.h).
#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/backend.h"
#include "kernels/backend_checks.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/formulas.h"

// The hot loops are built for AVX2 and the baseline, chosen at load time by an ifunc resolver.
// ThreadSanitizer runs too late for such resolvers, so its builds keep the baseline only.
#if defined(__SANITIZE_THREAD__)
#define OPTD_AVX2_CLONES
#else
#define OPTD_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#endif

namespace optd {
namespace {

using formulas::RoundToBf16;
using formulas::RoundToHalf;

// Loops shorter than this many elements run on one thread: waking a worker costs more than it
// saves.
constexpr int64_t kGrain = 1 << 15;
// BLAS products run single-threaded, one call per tile of the output, and the tiles run on the
// pool. The tiling depends on the shapes alone, so every element comes from the same BLAS call
// whatever the thread count: OpenBLAS's own threading splits the output by thread count, and its
// AVX2 kernels (Haswell, Zen) round an element differently depending on the part it lands in.
constexpr int64_t kBlasTile = 256;
// A symmetric multiply splits one side only (the other reads all of S), in strips this wide: more
// of them than 256-wide tiles give, so a square matrix still spreads evenly over the threads.
constexpr int64_t kSymmStrip = 128;
// A two-operand symmetric product (syrkx, Gram Newton–Schulz's n×n products) tiles its upper
// triangle this finely: at n = 512, 256-wide tiles leave 3 of a full product's 4 (no saving over
// two threads), 128-wide ones 10 of 16 (measured: 512×1024 Gram run 30.0 → 25.9 ms).
constexpr int64_t kSyrkxTile = 128;
// Tiles handed to one thread cover at least this many multiply-adds.
constexpr int64_t kBlasGrain = int64_t{1} << 21;
// Sums of squares add blocks of this many elements in a fixed order, so results do not depend on
// the thread count.
constexpr int64_t kSumBlock = 1 << 14;

// Σx² with vector-wide fp64 partial sums: fp64 so squares of large finite values (|x| > 1.8e19)
// do not overflow to inf and silently zero a normalized update. One function for every caller,
// built for AVX2 and the baseline and chosen at load time, so every path sums in the same order
// on a given machine.
OPTD_AVX2_CLONES double SumSquares(const float* x, int64_t count) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += static_cast<double>(x[i]) * x[i];
  return sum;
}

// Values of x[0, count) out of range: every step reads each gradient once for this check.
OPTD_AVX2_CLONES int64_t OutOfRangeIn(const float* x, int64_t count, float max_magnitude) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < count; ++i) bad += formulas::IsOutOfRange(x[i], max_magnitude) ? 1 : 0;
  return bad;
}

// x[0, count) rounded in place to bf16 or fp16 (RoundTo: every iterate of a bf16 or fp16
// Newton–Schulz). Exact operations only, so the AVX2 clone gives the baseline's bits.
OPTD_AVX2_CLONES void RoundToBf16In(float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = RoundToBf16(x[i]);
}
OPTD_AVX2_CLONES void RoundToHalfIn(float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = RoundToHalf(x[i]);
}

// ‖x‖₂ from the fp64 sum, as fp32.
float Norm(const float* x, int64_t count) {
  return static_cast<float>(std::sqrt(SumSquares(x, count)));
}

template <DType kDType>
[[gnu::always_inline]] inline float RoundScalarTo(float x) {
  if constexpr (kDType == DType::kBF16) return RoundToBf16(x);
  if constexpr (kDType == DType::kF16) return RoundToHalf(x);
  return x;
}

float RoundScalar(float x, DType dtype) {
  if (dtype == DType::kBF16) return RoundScalarTo<DType::kBF16>(x);
  if (dtype == DType::kF16) return RoundScalarTo<DType::kF16>(x);
  return x;
}

// sums[c] = Σ_r x[b][r][c]² in fp64 for matrix b of the batch.
void ColumnSumsOfSquares(const MatrixBatch& x, int64_t b, std::vector<double>& sums) {
  std::fill(sums.begin(), sums.end(), 0.0);
  for (int64_t r = 0; r < x.rows; ++r) {
    const float* row = x.data + (b * x.rows + r) * x.cols;
    for (int64_t c = 0; c < x.cols; ++c) sums[c] += static_cast<double>(row[c]) * row[c];
  }
}

class CpuQueue : public Queue {};

int64_t CeilDiv(int64_t n, int64_t d) { return (n + d - 1) / d; }

CBLAS_TRANSPOSE ToCblas(Transpose t) { return t == Transpose::kYes ? CblasTrans : CblasNoTrans; }

// Element i of a wire-dtype (fp32, bf16 or fp16) array, widened exactly.
float ToFloat(const void* src, DType dtype, int64_t i) {
  if (dtype == DType::kBF16) return formulas::Bf16BitsToFloat(static_cast<const uint16_t*>(src)[i]);
  if (dtype == DType::kF16) return formulas::HalfBitsToFloat(static_cast<const uint16_t*>(src)[i]);
  return static_cast<const float*>(src)[i];
}

// Rows [begin, end) of the fused RMNP step: per row, momentum into `u` (cols floats), its norm,
// then the update, so memory sees one pass over g, m and w. The step dtype is a template
// parameter so the inner loops carry no branch.
template <DType kStepDType>
[[gnu::always_inline]] inline void RmnpRowsOf(float* w, float* m, const float* g, int64_t begin,
                                              int64_t end, int64_t cols, const RmnpStepArgs& a,
                                              float* __restrict u) {
  // Sum momentum, which has no use for 1 − μ.
  const formulas::MomentumScalars momentum{a.momentum, 0.0f, formulas::MomentumKind::kSum,
                                           a.nesterov};
  const float eps = a.eps, scale = a.scale, lr = a.rate->lr, decay = a.rate->decay;
  for (int64_t r = begin; r < end; ++r) {
    float* __restrict m_row = m + r * cols;
    const float* __restrict g_row = g + r * cols;
    float* __restrict w_row = w + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      u[c] = formulas::MomentumStep(m_row[c], g_row[c], momentum);
    }
    // The same sum RowNormalize takes, so the fused and staged paths agree bit for bit.
    const float denominator = formulas::RowL2Denominator(Norm(u, cols), eps);
    for (int64_t c = 0; c < cols; ++c) {
      const float step = RoundScalarTo<kStepDType>((u[c] / denominator) * scale);
      w_row[c] = formulas::DecayAndStep(w_row[c], step, lr, decay);
    }
  }
}

// The RMNP step is compute-bound at SSE2's four lanes (bench/RESULTS.md); built for AVX2 as well,
// chosen at load time. Element results are identical either way: no FMA contraction, IEEE
// division, and SumSquares dispatches the same way.
OPTD_AVX2_CLONES void RmnpRows(float* w, float* m, const float* g, int64_t begin, int64_t end,
                               int64_t cols, const RmnpStepArgs& a, float* u) {
  switch (a.step_dtype) {
    case DType::kBF16:
      RmnpRowsOf<DType::kBF16>(w, m, g, begin, end, cols, a, u);
      break;
    case DType::kF16:
      RmnpRowsOf<DType::kF16>(w, m, g, begin, end, cols, a, u);
      break;
    default:
      RmnpRowsOf<DType::kF32>(w, m, g, begin, end, cols, a, u);
      break;
  }
}

// RmnpRowsOf out of place: m and w read from `m_in` and `w_in`, the new ones written to `m_out`
// and `w_out` (all distinct), each element by the same operations, so the same bits.
template <DType kStepDType>
[[gnu::always_inline]] inline void RmnpRowsIntoOf(float* __restrict w_out, float* __restrict m_out,
                                                  const float* __restrict w_in,
                                                  const float* __restrict m_in, const float* g,
                                                  int64_t begin, int64_t end, int64_t cols,
                                                  const RmnpStepArgs& a, float* __restrict u) {
  const formulas::MomentumScalars momentum{a.momentum, 0.0f, formulas::MomentumKind::kSum,
                                           a.nesterov};
  const float eps = a.eps, scale = a.scale, lr = a.rate->lr, decay = a.rate->decay;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      float m = m_in[row + c];
      u[c] = formulas::MomentumStep(m, g[row + c], momentum);
      m_out[row + c] = m;
    }
    const float denominator = formulas::RowL2Denominator(Norm(u, cols), eps);
    for (int64_t c = 0; c < cols; ++c) {
      const float step = RoundScalarTo<kStepDType>((u[c] / denominator) * scale);
      w_out[row + c] = formulas::DecayAndStep(w_in[row + c], step, lr, decay);
    }
  }
}

OPTD_AVX2_CLONES void RmnpRowsInto(float* w_out, float* m_out, const float* w_in, const float* m_in,
                                   const float* g, int64_t begin, int64_t end, int64_t cols,
                                   const RmnpStepArgs& a, float* u) {
  switch (a.step_dtype) {
    case DType::kBF16:
      RmnpRowsIntoOf<DType::kBF16>(w_out, m_out, w_in, m_in, g, begin, end, cols, a, u);
      break;
    case DType::kF16:
      RmnpRowsIntoOf<DType::kF16>(w_out, m_out, w_in, m_in, g, begin, end, cols, a, u);
      break;
    default:
      RmnpRowsIntoOf<DType::kF32>(w_out, m_out, w_in, m_in, g, begin, end, cols, a, u);
      break;
  }
}

// The element kernels over [0, count), each element by formulas.h's operations. Scalars come by
// value and the step dtype as a template parameter, so every branch is invariant and the loops
// vectorize (GCC versions them for overlap: ApplyUpdate's w may be its o); built for AVX2 as
// well. The bits are the scalar loop's at any width: IEEE division and square root, no
// contraction (-ffp-contract=off), and sqrtf with no errno to keep it out of line
// (-fno-math-errno, kernels/CMakeLists.txt).
OPTD_AVX2_CLONES void MomentumElements(float* m, const float* g, float* u, int64_t count,
                                       formulas::MomentumScalars s) {
  for (int64_t i = 0; i < count; ++i) u[i] = formulas::MomentumStep(m[i], g[i], s);
}

template <DType kStepDType>
[[gnu::always_inline]] inline void ApplyUpdateElementsOf(float* w, const float* o, int64_t count,
                                                         float scale, float lr, float decay) {
  for (int64_t i = 0; i < count; ++i) {
    w[i] = formulas::DecayAndStep(w[i], RoundScalarTo<kStepDType>(o[i] * scale), lr, decay);
  }
}

OPTD_AVX2_CLONES void ApplyUpdateElements(float* w, const float* o, int64_t count, float scale,
                                          float lr, float decay, DType step_dtype) {
  switch (step_dtype) {
    case DType::kBF16:
      ApplyUpdateElementsOf<DType::kBF16>(w, o, count, scale, lr, decay);
      break;
    case DType::kF16:
      ApplyUpdateElementsOf<DType::kF16>(w, o, count, scale, lr, decay);
      break;
    default:
      ApplyUpdateElementsOf<DType::kF32>(w, o, count, scale, lr, decay);
      break;
  }
}

template <formulas::AdamEpsilon kPlacement>
[[gnu::always_inline]] inline void AdamWElementsOf(float* w, float* m, float* v, const float* g,
                                                   int64_t count, formulas::AdamWScalars s) {
  for (int64_t i = 0; i < count; ++i) {
    formulas::AdamWStepWith<kPlacement>(w[i], m[i], v[i], g[i], s);
  }
}

OPTD_AVX2_CLONES void AdamWElements(float* w, float* m, float* v, const float* g, int64_t count,
                                    formulas::AdamWScalars s) {
  if (s.eps_placement == formulas::AdamEpsilon::kTorch) {
    AdamWElementsOf<formulas::AdamEpsilon::kTorch>(w, m, v, g, count, s);
  } else {
    AdamWElementsOf<formulas::AdamEpsilon::kMoonlight>(w, m, v, g, count, s);
  }
}

template <formulas::AdamEpsilon kPlacement>
[[gnu::always_inline]] inline void AdamWElementsIntoOf(
    float* __restrict w_out, float* __restrict m_out, float* __restrict v_out,
    const float* __restrict w_in, const float* __restrict m_in, const float* __restrict v_in,
    const float* __restrict g, int64_t count, formulas::AdamWScalars s) {
  for (int64_t i = 0; i < count; ++i) {
    float w = w_in[i], m = m_in[i], v = v_in[i];
    formulas::AdamWStepWith<kPlacement>(w, m, v, g[i], s);
    w_out[i] = w;
    m_out[i] = m;
    v_out[i] = v;
  }
}

OPTD_AVX2_CLONES void AdamWElementsInto(float* w_out, float* m_out, float* v_out, const float* w_in,
                                        const float* m_in, const float* v_in, const float* g,
                                        int64_t count, formulas::AdamWScalars s) {
  if (s.eps_placement == formulas::AdamEpsilon::kTorch) {
    AdamWElementsIntoOf<formulas::AdamEpsilon::kTorch>(w_out, m_out, v_out, w_in, m_in, v_in, g,
                                                       count, s);
  } else {
    AdamWElementsIntoOf<formulas::AdamEpsilon::kMoonlight>(w_out, m_out, v_out, w_in, m_in, v_in, g,
                                                           count, s);
  }
}

std::string CpuModel() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  absl::string_view name() const override { return "cpu"; }
  bool host_memory() const override { return true; }
  std::string description() const override {
    // openblas_get_config() names OpenBLAS, its version, build options and core.
    return absl::StrCat(CpuModel(), ", ", pool_.threads(), " threads, ", openblas_get_config());
  }

  Queue& default_queue() override { return queue_; }
  absl::StatusOr<std::unique_ptr<Queue>> CreateQueue(QueuePriority) override {
    return std::make_unique<CpuQueue>();
  }
  absl::Status Synchronize(Queue&) override { return absl::OkStatus(); }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override {
    if (bytes == 0) return Buffer();
    constexpr size_t kAlign = 64;
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* data = std::aligned_alloc(kAlign, rounded);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes of host memory"));
    }
    return Buffer(data, bytes, [](void* p) { std::free(p); });
  }

  absl::Status Upload(Queue& queue, void* dst, const void* src, size_t bytes) override {
    return Copy(queue, dst, src, bytes);
  }
  absl::Status Download(Queue& queue, void* dst, const void* src, size_t bytes) override {
    return Copy(queue, dst, src, bytes);
  }
  absl::Status Copy(Queue&, void* dst, const void* src, size_t bytes) override {
    if (bytes > 0 && (dst == nullptr || src == nullptr)) {
      return absl::InvalidArgumentError("copy: null pointer");
    }
    if (bytes > 0 && dst != src) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::Status Fill(Queue&, float* x, int64_t count, float value) override {
    OPTD_RETURN_IF_ERROR(CheckCount("fill", count, x));
    std::fill(x, x + count, value);
    return absl::OkStatus();
  }

  absl::Status Convert(Queue&, const void* src, DType src_dtype, void* dst, DType dst_dtype,
                       int64_t count) override {
    OPTD_RETURN_IF_ERROR(CheckCount("convert", count, src));
    OPTD_RETURN_IF_ERROR(CheckCount("convert", count, dst));
    if (src_dtype == DType::kF64 || dst_dtype == DType::kF64) {
      return absl::InvalidArgumentError("convert: dtypes are fp32, bf16 or fp16 (the wire dtypes)");
    }
    ForEach(count, [&](int64_t i) {
      const float v = ToFloat(src, src_dtype, i);
      if (dst_dtype == DType::kBF16) {
        static_cast<uint16_t*>(dst)[i] = formulas::FloatToBf16Bits(v);
      } else if (dst_dtype == DType::kF16) {
        static_cast<uint16_t*>(dst)[i] = formulas::FloatToHalfBits(v);
      } else {
        static_cast<float*>(dst)[i] = v;
      }
    });
    return absl::OkStatus();
  }

  absl::Status RoundTo(Queue&, float* x, int64_t count, DType dtype) override {
    OPTD_RETURN_IF_ERROR(CheckCount("round", count, x));
    if (dtype == DType::kBF16) {
      ForBlocks(count, [x](int64_t begin, int64_t end) { RoundToBf16In(x + begin, end - begin); });
    } else if (dtype == DType::kF16) {
      ForBlocks(count, [x](int64_t begin, int64_t end) { RoundToHalfIn(x + begin, end - begin); });
    }
    return absl::OkStatus();
  }

  absl::StatusOr<int64_t> CountOutOfRange(Queue&, const float* x, int64_t count,
                                          float max_magnitude) override {
    OPTD_RETURN_IF_ERROR(CheckCount("count out of range", count, x));
    std::atomic<int64_t> bad{0};
    pool_.ParallelFor(count, kGrain, [&](int64_t begin, int64_t end) {
      bad += OutOfRangeIn(x + begin, end - begin, max_magnitude);
    });
    return bad.load();
  }

  absl::Status Gemm(Queue&, const GemmArgs& g) override {
    OPTD_ASSIGN_OR_RETURN(const bool work, CheckGemm(g));
    if (!work) return absl::OkStatus();
    if (g.input_dtype == DType::kF32) {
      GemmTiles(g, static_cast<const float*>(g.a), g.stride_a, static_cast<const float*>(g.b),
                g.stride_b, g.c, g.batch);
      return absl::OkStatus();
    }
    // bf16/fp16 inputs are widened exactly, one matrix at a time; the product then accumulates in
    // fp32 as the GPU's tensor cores do. Exactly the elements the matrices span: the last row ends
    // at its last column.
    const int64_t a_rows = g.trans_a == Transpose::kYes ? g.k : g.m;
    const int64_t a_cols = g.trans_a == Transpose::kYes ? g.m : g.k;
    const int64_t b_rows = g.trans_b == Transpose::kYes ? g.n : g.k;
    const int64_t b_cols = g.trans_b == Transpose::kYes ? g.k : g.n;
    std::vector<float> a32(g.k == 0 ? 0 : (a_rows - 1) * g.lda + a_cols);
    std::vector<float> b32(g.k == 0 ? 0 : (b_rows - 1) * g.ldb + b_cols);
    for (int64_t i = 0; i < g.batch; ++i) {
      const auto* a16 = static_cast<const uint16_t*>(g.a) + i * g.stride_a;
      const auto* b16 = static_cast<const uint16_t*>(g.b) + i * g.stride_b;
      ForEach(static_cast<int64_t>(a32.size()),
              [&](int64_t j) { a32[j] = ToFloat(a16, g.input_dtype, j); });
      ForEach(static_cast<int64_t>(b32.size()),
              [&](int64_t j) { b32[j] = ToFloat(b16, g.input_dtype, j); });
      GemmTiles(g, a32.data(), 0, b32.data(), 0, g.c + i * g.stride_c, 1);
    }
    return absl::OkStatus();
  }

  absl::Status SymmetricRankK(Queue&, const SyrkArgs& s) override {
    OPTD_ASSIGN_OR_RETURN(const bool work, CheckSyrk(s));
    if (!work) return absl::OkStatus();
    // The upper triangle's tiles (I ≤ J): ssyrk on the diagonal, sgemm above it. With trans, A is
    // k×n and tile I takes its columns; without, A is n×k and tile I takes its rows.
    const int64_t tile = s.b != nullptr ? kSyrkxTile : kBlasTile;
    const int64_t tiles = CeilDiv(s.n, tile);
    std::vector<std::pair<int64_t, int64_t>> upper;
    for (int64_t i = 0; i < tiles; ++i) {
      for (int64_t j = i; j < tiles; ++j) upper.emplace_back(i * tile, j * tile);
    }
    // With a second operand B (syrkx) the tiles above the diagonal read B's columns, and a
    // diagonal tile is a general product into a copy whose upper triangle is kept.
    const bool trans = s.trans == Transpose::kYes;
    const bool two = s.b != nullptr;
    const int64_t ldb = two ? s.ldb : s.lda;
    const auto per_matrix = static_cast<int64_t>(upper.size());
    // The upper triangle's multiply-adds, n(n+1)/2 per column of the k summed.
    ForTiles(s.batch * per_matrix, s.batch * s.n * (s.n + 1) / 2 * s.k, [&](int64_t t) {
      const int64_t b = t / per_matrix;
      const auto [r0, c0] = upper[t % per_matrix];
      const int64_t rows = std::min(tile, s.n - r0), cols = std::min(tile, s.n - c0);
      const float* a = s.a + b * s.stride_a;
      const float* second = two ? s.b + b * s.stride_b : a;
      const float* a_rows = trans ? a + r0 : a + r0 * s.lda;
      const float* b_cols = trans ? second + c0 : second + c0 * ldb;
      float* c = s.c + b * s.stride_c + r0 * s.ldc + c0;
      const CBLAS_TRANSPOSE first_op = trans ? CblasTrans : CblasNoTrans;
      const CBLAS_TRANSPOSE second_op = trans ? CblasNoTrans : CblasTrans;
      if (r0 != c0) {
        cblas_sgemm(CblasRowMajor, first_op, second_op, rows, cols, s.k, s.alpha, a_rows, s.lda,
                    b_cols, ldb, s.beta, c, s.ldc);
      } else if (!two) {
        cblas_ssyrk(CblasRowMajor, CblasUpper, ToCblas(s.trans), rows, s.k, s.alpha, a_rows, s.lda,
                    s.beta, c, s.ldc);
      } else {
        thread_local std::vector<float> diagonal;
        diagonal.resize(rows * rows);
        for (int64_t i = 0; i < rows; ++i) {
          std::copy(c + i * s.ldc + i, c + i * s.ldc + rows, diagonal.begin() + i * rows + i);
          // The strict lower triangle only ever holds products (beta·garbage is dropped).
          std::fill(diagonal.begin() + i * rows, diagonal.begin() + i * rows + i, 0.0f);
        }
        cblas_sgemm(CblasRowMajor, first_op, second_op, rows, rows, s.k, s.alpha, a_rows, s.lda,
                    b_cols, ldb, s.beta, diagonal.data(), rows);
        for (int64_t i = 0; i < rows; ++i) {
          std::copy(diagonal.begin() + i * rows + i, diagonal.begin() + (i + 1) * rows,
                    c + i * s.ldc + i);
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status SymmetricMultiply(Queue&, const SymmArgs& s) override {
    OPTD_ASSIGN_OR_RETURN(const bool work, CheckSymm(s));
    if (!work) return absl::OkStatus();
    // S·B splits into tiles of B's and C's columns, B·S into tiles of their rows: each tile reads
    // all of S.
    const bool left = s.side == Side::kLeft;
    const int64_t per_matrix = CeilDiv(left ? s.n : s.m, kSymmStrip);
    const int64_t order = left ? s.m : s.n;
    ForTiles(s.batch * per_matrix, s.batch * s.m * s.n * order, [&](int64_t t) {
      const int64_t b = t / per_matrix, first = t % per_matrix * kSymmStrip;
      const int64_t size = std::min(kSymmStrip, (left ? s.n : s.m) - first);
      const int64_t b_offset = left ? first : first * s.ldb;
      const int64_t c_offset = left ? first : first * s.ldc;
      cblas_ssymm(CblasRowMajor, left ? CblasLeft : CblasRight, CblasUpper, left ? s.m : size,
                  left ? size : s.n, s.alpha, s.s + b * s.stride_s, s.lds,
                  s.b + b * s.stride_b + b_offset, s.ldb, s.beta, s.c + b * s.stride_c + c_offset,
                  s.ldc);
    });
    return absl::OkStatus();
  }

  absl::Status SingularValueDecomposition(Queue&, const MatrixBatch& a, float* s, float* u,
                                          float* vt) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("svd", a));
    const int64_t m = a.rows, n = a.cols, k = std::min(m, n);
    if (a.size() == 0 || k == 0) return absl::OkStatus();
    if (s == nullptr) return absl::InvalidArgumentError("svd: null singular value output");
    const bool vectors = u != nullptr || vt != nullptr;
    // LAPACKE checks ldu and ldvt even when it computes no vectors, so the buffers keep their
    // full shapes.
    for (int64_t i = 0; i < a.size(); ++i) {
      if (!std::isfinite(a.data[i])) {
        return absl::InvalidArgumentError(absl::StrCat("svd: matrix ", i / a.matrix_size(),
                                                       " has a non-finite value at element ",
                                                       i % a.matrix_size()));
      }
    }
    // Every matrix is decomposed into fp64 temporaries first, so a failure writes nothing.
    // LAPACKE checks ldu and ldvt even when it computes no vectors: the buffers keep full shapes.
    std::vector<double> work(m * n), sd(a.batch * k), ud(a.batch * m * k), vtd(a.batch * k * n);
    for (int64_t b = 0; b < a.batch; ++b) {
      std::copy(a.data + b * m * n, a.data + (b + 1) * m * n, work.begin());
      const lapack_int info =
          LAPACKE_dgesdd(LAPACK_ROW_MAJOR, vectors ? 'S' : 'N', m, n, work.data(), n,
                         sd.data() + b * k, ud.data() + b * m * k, k, vtd.data() + b * k * n, n);
      if (info != 0) {
        return absl::InternalError(
            absl::StrCat("svd: LAPACKE_dgesdd failed with info=", info, " on matrix ", b));
      }
    }
    std::copy(sd.begin(), sd.end(), s);
    if (u != nullptr) std::copy(ud.begin(), ud.end(), u);
    if (vt != nullptr) std::copy(vtd.begin(), vtd.end(), vt);
    return absl::OkStatus();
  }

  absl::Status ZeroSmallSingularVectors(Queue&, float* u, const float* s, int64_t batch,
                                        int64_t rows, int64_t k,
                                        float relative_tolerance) override {
    OPTD_RETURN_IF_ERROR(CheckCount("zero small singular vectors", batch * rows * k, u));
    OPTD_RETURN_IF_ERROR(CheckCount("zero small singular vectors", batch * k, s));
    for (int64_t b = 0; b < batch; ++b) {
      const float* sv = s + b * k;
      float* m = u + b * rows * k;
      for (int64_t j = 0; j < k; ++j) {
        if (sv[j] > relative_tolerance * sv[0]) continue;
        for (int64_t r = 0; r < rows; ++r) m[r * k + j] = 0.0f;
      }
    }
    return absl::OkStatus();
  }

  absl::Status Symmetrize(Queue&, float* a, int64_t n, int64_t batch) override {
    OPTD_RETURN_IF_ERROR(CheckCount("symmetrize", batch * n * n, a));
    // Tiles of the lower triangle, each filled from its mirror tile, so reads and writes both
    // stay within a few cache lines per row.
    constexpr int64_t kTile = 32;
    const int64_t tiles = (n + kTile - 1) / kTile;
    ForRows(batch * tiles, kTile * n, [&](int64_t tile_row) {
      float* m = a + (tile_row / tiles) * n * n;
      const int64_t i0 = (tile_row % tiles) * kTile, i1 = std::min(n, i0 + kTile);
      for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
        const int64_t j1 = std::min(n, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < std::min(j1, i); ++j) m[i * n + j] = m[j * n + i];
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status AddDiagonal(Queue&, float* a, int64_t n, int64_t batch, float value) override {
    OPTD_RETURN_IF_ERROR(CheckCount("add diagonal", batch * n * n, a));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < n; ++i) a[b * n * n + i * n + i] += value;
    }
    return absl::OkStatus();
  }

  absl::Status FrobeniusNormalize(Queue&, const MatrixBatch& x, float safety, float eps,
                                  formulas::NormEpsilon mode, DType norm_dtype) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("frobenius normalize", x));
    for (int64_t b = 0; b < x.batch; ++b) {
      float* m = x.data + b * x.matrix_size();
      const int64_t size = x.matrix_size();
      const float norm =
          RoundScalar(static_cast<float>(std::sqrt(ParallelSumSquares(m, size))), norm_dtype);
      const float denominator =
          RoundScalar(formulas::FrobeniusDenominator(norm, safety, eps, mode), norm_dtype);
      ForEach(size, [m, denominator](int64_t i) { m[i] = m[i] / denominator; });
    }
    return absl::OkStatus();
  }

  absl::Status RowSumSquares(Queue&, const float* x, int64_t rows, int64_t cols,
                             float* out) override {
    OPTD_RETURN_IF_ERROR(CheckCount("row sum of squares", rows * cols, x));
    OPTD_RETURN_IF_ERROR(CheckCount("row sum of squares", rows, out));
    ForRows(rows, cols,
            [&](int64_t r) { out[r] = static_cast<float>(SumSquares(x + r * cols, cols)); });
    return absl::OkStatus();
  }

  absl::Status ColumnSumSquares(Queue&, const MatrixBatch& x, float* out) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("column sum of squares", x));
    OPTD_RETURN_IF_ERROR(CheckCount("column sum of squares", x.batch * x.cols, out));
    std::vector<double> sums(x.cols);
    for (int64_t b = 0; b < x.batch; ++b) {
      ColumnSumsOfSquares(x, b, sums);
      for (int64_t c = 0; c < x.cols; ++c) out[b * x.cols + c] = static_cast<float>(sums[c]);
    }
    return absl::OkStatus();
  }

  absl::Status Equilibrate(Queue&, const MatrixBatch& x, const EquilibrateArgs& args,
                           float* scratch) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("equilibrate", x));
    OPTD_RETURN_IF_ERROR(CheckCount("equilibrate", x.batch * (x.rows + x.cols), scratch));
    float* row_scale = scratch;
    float* col_scale = scratch + x.batch * x.rows;
    // Both factors come from the unnormalized input (MuonEq's rowcol mode squares u once), from
    // fp64 sums whose roots are taken before narrowing to fp32.
    auto factor = [&args](double sum_squares) {
      return formulas::EquilibrationScale(static_cast<float>(std::sqrt(sum_squares + args.eps)),
                                          args.exponent, args.clip);
    };
    if (args.rows) {
      ForRows(x.batch * x.rows, x.cols,
              [&](int64_t r) { row_scale[r] = factor(SumSquares(x.data + r * x.cols, x.cols)); });
    }
    if (args.cols) {
      std::vector<double> sums(x.cols);
      for (int64_t b = 0; b < x.batch; ++b) {
        ColumnSumsOfSquares(x, b, sums);
        for (int64_t c = 0; c < x.cols; ++c) col_scale[b * x.cols + c] = factor(sums[c]);
      }
    }
    ForRows(x.batch * x.rows, x.cols, [&](int64_t r) {
      float* row = x.data + r * x.cols;
      const float* cs = col_scale + (r / std::max<int64_t>(1, x.rows)) * x.cols;
      for (int64_t c = 0; c < x.cols; ++c) {
        float v = row[c];
        if (args.rows) v = v * row_scale[r];
        if (args.cols) v = v * cs[c];
        row[c] = v;
      }
    });
    return absl::OkStatus();
  }

  absl::Status RowNormalize(Queue&, float* x, int64_t rows, int64_t cols, float eps) override {
    OPTD_RETURN_IF_ERROR(CheckCount("row normalize", rows * cols, x));
    ForRows(rows, cols, [&](int64_t r) {
      float* row = x + r * cols;
      const float denominator = formulas::RowL2Denominator(Norm(row, cols), eps);
      for (int64_t c = 0; c < cols; ++c) row[c] = row[c] / denominator;
    });
    return absl::OkStatus();
  }

  absl::Status NorMuonNormalize(Queue&, const MatrixBatch& o, float* v,
                                const NorMuonArgs& args) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("normuon normalize", o));
    OPTD_RETURN_IF_ERROR(CheckCount("normuon normalize", o.batch * o.rows, v));
    for (int64_t b = 0; b < o.batch; ++b) {
      float* m = o.data + b * o.matrix_size();
      const float norm_before =
          static_cast<float>(std::sqrt(ParallelSumSquares(m, o.matrix_size())));
      ForRows(o.rows, o.cols, [&](int64_t r) {
        float* row = m + r * o.cols;
        const float mean_square =
            static_cast<float>(SumSquares(row, o.cols) / static_cast<double>(o.cols));
        float& second_moment = v[b * o.rows + r];
        second_moment =
            formulas::NorMuonSecondMoment(second_moment, mean_square, args.one_minus_beta2);
        const float scale = formulas::NorMuonRowScale(second_moment, args.eps);
        for (int64_t c = 0; c < o.cols; ++c) row[c] = row[c] * scale;
      });
      if (args.preserve_frobenius) {
        const float norm_after =
            static_cast<float>(std::sqrt(ParallelSumSquares(m, o.matrix_size())));
        ScaleInPlace(m, o.matrix_size(), norm_before / (norm_after + args.eps));
      }
    }
    return absl::OkStatus();
  }

  absl::Status ScaleToRms(Queue&, const MatrixBatch& x, float rms, float eps) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("scale to rms", x));
    for (int64_t b = 0; b < x.batch; ++b) {
      float* m = x.data + b * x.matrix_size();
      const float norm = static_cast<float>(std::sqrt(ParallelSumSquares(m, x.matrix_size())));
      const float target = rms * std::sqrt(static_cast<float>(x.matrix_size()));
      ScaleInPlace(m, x.matrix_size(), target / (norm + eps));
    }
    return absl::OkStatus();
  }

  absl::Status Momentum(Queue&, float* m, const float* g, float* u, int64_t count,
                        const formulas::MomentumScalars& scalars) override {
    OPTD_RETURN_IF_ERROR(CheckCount("momentum", count, m));
    OPTD_RETURN_IF_ERROR(CheckCount("momentum", count, g));
    OPTD_RETURN_IF_ERROR(CheckCount("momentum", count, u));
    ForBlocks(count, [&](int64_t begin, int64_t end) {
      MomentumElements(m + begin, g + begin, u + begin, end - begin, scalars);
    });
    return absl::OkStatus();
  }

  absl::Status ApplyUpdate(Queue&, float* w, const float* o, int64_t count,
                           const formulas::RateScalars* rate, float scale,
                           DType step_dtype) override {
    OPTD_RETURN_IF_ERROR(CheckCount("apply update", count, w));
    OPTD_RETURN_IF_ERROR(CheckCount("apply update", count, o));
    OPTD_RETURN_IF_ERROR(CheckCount("apply update", 1, rate));
    const float lr = rate->lr, decay = rate->decay;
    ForBlocks(count, [&](int64_t begin, int64_t end) {
      ApplyUpdateElements(w + begin, o + begin, end - begin, scale, lr, decay, step_dtype);
    });
    return absl::OkStatus();
  }

  absl::Status AdamW(Queue&, float* w, float* m, float* v, const float* g, int64_t count,
                     const formulas::AdamWScalars* scalars_in) override {
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, w));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, m));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, v));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, g));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", 1, scalars_in));
    const formulas::AdamWScalars scalars = *scalars_in;
    ForBlocks(count, [&](int64_t begin, int64_t end) {
      AdamWElements(w + begin, m + begin, v + begin, g + begin, end - begin, scalars);
    });
    return absl::OkStatus();
  }

  absl::Status AdamWInto(Queue&, float* w_out, float* m_out, float* v_out, const float* w_in,
                         const float* m_in, const float* v_in, const float* g, int64_t count,
                         const formulas::AdamWScalars* scalars_in) override {
    for (const float* p : {static_cast<const float*>(w_out), static_cast<const float*>(m_out),
                           static_cast<const float*>(v_out), w_in, m_in, v_in, g}) {
      OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, p));
    }
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", 1, scalars_in));
    const formulas::AdamWScalars scalars = *scalars_in;
    ForBlocks(count, [&](int64_t begin, int64_t end) {
      AdamWElementsInto(w_out + begin, m_out + begin, v_out + begin, w_in + begin, m_in + begin,
                        v_in + begin, g + begin, end - begin, scalars);
    });
    return absl::OkStatus();
  }

  absl::Status RmnpStepInto(Queue&, float* w_out, float* m_out, const float* w_in,
                            const float* m_in, const float* g, int64_t rows, int64_t cols,
                            const RmnpStepArgs& a) override {
    for (const float* p :
         {static_cast<const float*>(w_out), static_cast<const float*>(m_out), w_in, m_in, g}) {
      OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, p));
    }
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", 1, a.rate));
    ForRowBlocks(rows, cols, [&](int64_t begin, int64_t end) {
      std::vector<float> u(cols);
      RmnpRowsInto(w_out, m_out, w_in, m_in, g, begin, end, cols, a, u.data());
    });
    return absl::OkStatus();
  }

  absl::Status RmnpStep(Queue&, float* w, float* m, const float* g, int64_t rows, int64_t cols,
                        const RmnpStepArgs& a) override {
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, w));
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, m));
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, g));
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", 1, a.rate));
    ForRowBlocks(rows, cols, [&](int64_t begin, int64_t end) {
      std::vector<float> u(cols);
      RmnpRows(w, m, g, begin, end, cols, a, u.data());
    });
    return absl::OkStatus();
  }

 private:
  // fn(i) for i in [0, count), split over the pool.
  template <typename Fn>
  void ForEach(int64_t count, Fn fn) {
    pool_.ParallelFor(count, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  }

  // fn(begin, end) over blocks of [0, count), split over the pool.
  template <typename Fn>
  void ForBlocks(int64_t count, Fn fn) {
    pool_.ParallelFor(count, kGrain, fn);
  }

  // fn(begin, end) over blocks of `rows` rows of `cols` elements, split over the pool.
  template <typename Fn>
  void ForRowBlocks(int64_t rows, int64_t cols, Fn fn) {
    pool_.ParallelFor(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)), fn);
  }

  // fn(r) for every row of `rows` rows of `cols` elements, split over the pool.
  template <typename Fn>
  void ForRows(int64_t rows, int64_t cols, Fn fn) {
    ForRowBlocks(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fn(r);
    });
  }

  // fn(t) for every tile t in [0, tiles), `work` multiply-adds in all, taken in turn by the
  // pool's threads (tiles may differ in cost), one thread per kBlasGrain of work at most: the
  // small matrices of a small model (a batch of 64×256 products) run on the calling thread, as
  // handing them over costs more than they do. The tiles, and so the bits, are the same either way.
  template <typename Fn>
  void ForTiles(int64_t tiles, int64_t work, Fn fn) {
    const int64_t runners = std::min<int64_t>({static_cast<int64_t>(pool_.threads()), tiles,
                                               CeilDiv(std::max<int64_t>(1, work), kBlasGrain)});
    std::atomic<int64_t> next{0};
    pool_.ParallelFor(runners, 1, [&](int64_t, int64_t) {
      for (int64_t t = next++; t < tiles; t = next++) fn(t);
    });
  }

  // C = alpha·op(A)·op(B) + beta·C for `batch` matrices of fp32 inputs, one single-threaded BLAS
  // call per kBlasTile×kBlasTile tile of each C.
  void GemmTiles(const GemmArgs& g, const float* a, int64_t stride_a, const float* b,
                 int64_t stride_b, float* c, int64_t batch) {
    const int64_t col_tiles = CeilDiv(g.n, kBlasTile);
    const int64_t per_matrix = CeilDiv(g.m, kBlasTile) * col_tiles;
    ForTiles(batch * per_matrix, batch * g.m * g.n * g.k, [&](int64_t t) {
      const int64_t i = t / per_matrix;
      const int64_t r0 = t % per_matrix / col_tiles * kBlasTile, c0 = t % col_tiles * kBlasTile;
      const float* a_tile = a + i * stride_a + (g.trans_a == Transpose::kYes ? r0 : r0 * g.lda);
      const float* b_tile = b + i * stride_b + (g.trans_b == Transpose::kYes ? c0 * g.ldb : c0);
      cblas_sgemm(CblasRowMajor, ToCblas(g.trans_a), ToCblas(g.trans_b),
                  std::min(kBlasTile, g.m - r0), std::min(kBlasTile, g.n - c0), g.k, g.alpha,
                  a_tile, g.lda, b_tile, g.ldb, g.beta, c + i * g.stride_c + r0 * g.ldc + c0,
                  g.ldc);
    });
  }

  // Σx² over blocks summed in a fixed order: the same bits for any thread count.
  double ParallelSumSquares(const float* x, int64_t count) {
    const int64_t blocks = (count + kSumBlock - 1) / kSumBlock;
    std::vector<double> partial(blocks);
    ForRows(blocks, kSumBlock, [&](int64_t b) {
      partial[b] = SumSquares(x + b * kSumBlock, std::min(kSumBlock, count - b * kSumBlock));
    });
    double sum = 0.0;
    for (double p : partial) sum += p;
    return sum;
  }

  void ScaleInPlace(float* x, int64_t count, float scale) {
    ForEach(count, [x, scale](int64_t i) { x[i] = x[i] * scale; });
  }

  ThreadPool pool_;
  CpuQueue queue_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu backend: threads must be >= 0, got ", options.threads));
  }
  // OpenBLAS's own choice (OPENBLAS_NUM_THREADS, or the cores this process may use), read before
  // optd first sets it to one.
  static const int blas_default_threads = openblas_get_num_threads();
  const int threads = options.threads > 0 ? options.threads : blas_default_threads;
  openblas_set_num_threads(1);
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace optd
