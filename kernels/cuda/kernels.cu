// optd's CUDA kernels (launch.h). Elementwise kernels run one element per thread over a
// grid-stride loop; row kernels give each row a warp (or, for long rows, a block) and sum its
// squares in fp64 with a fixed reduction tree, so results do not change from run to run.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/launch.h"
#include "kernels/formulas.h"

namespace optd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = 1 << 20;
// Rows at least this long get a block each; shorter ones a warp.
constexpr int64_t kBlockRowMin = 2048;

unsigned Grid(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxGrid));
}

#define OPTD_GRID_STRIDE(i, n)                                                           \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__device__ __forceinline__ float RoundAs(float x, int dtype) {
  if (dtype == kBF16) return formulas::RoundToBf16(x);
  if (dtype == kF16) return formulas::RoundToHalf(x);
  return x;
}

__device__ __forceinline__ float Load(const void* src, int dtype, int64_t i) {
  if (dtype == kBF16) return formulas::Bf16BitsToFloat(static_cast<const uint16_t*>(src)[i]);
  if (dtype == kF16) return formulas::HalfBitsToFloat(static_cast<const uint16_t*>(src)[i]);
  return static_cast<const float*>(src)[i];
}

__device__ __forceinline__ void Store(void* dst, int dtype, int64_t i, float v) {
  if (dtype == kBF16) {
    static_cast<uint16_t*>(dst)[i] = formulas::FloatToBf16Bits(v);
  } else if (dtype == kF16) {
    static_cast<uint16_t*>(dst)[i] = formulas::FloatToHalfBits(v);
  } else {
    static_cast<float*>(dst)[i] = v;
  }
}

// kVec consecutive floats of a row: one 16-byte access when kVec is 4 (the row kernels take that
// path when the row length is a multiple of 4 and the arrays are 16-byte aligned).
template <int kVec>
struct Chunk {
  float v[kVec];
};

template <int kVec>
__device__ __forceinline__ Chunk<kVec> LoadChunk(const float* p) {
  Chunk<kVec> c;
  if constexpr (kVec == 4) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    c.v[0] = f.x;
    c.v[1] = f.y;
    c.v[2] = f.z;
    c.v[3] = f.w;
  } else {
    c.v[0] = *p;
  }
  return c;
}

template <int kVec>
__device__ __forceinline__ void StoreChunk(float* p, const Chunk<kVec>& c) {
  if constexpr (kVec == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(c.v[0], c.v[1], c.v[2], c.v[3]);
  } else {
    *p = c.v[0];
  }
}

__device__ __forceinline__ double WarpSum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The block's sum, returned to every thread. blockDim.x is a multiple of 32.
__device__ double BlockSum(double v) {
  __shared__ double warp_sums[kThreads / kWarp];
  __shared__ double total;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? warp_sums[lane] : 0.0;
    v = WarpSum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// The rows a kernel gives one warp (kRowBlock false) or one block (true) each: the row index,
// the first column this thread handles, the stride between its columns, and the row's Σ.
template <bool kRowBlock>
struct RowTeam {
  __device__ RowTeam(int64_t rows) {
    if (kRowBlock) {
      row = blockIdx.x;
      lane = threadIdx.x;
      stride = blockDim.x;
    } else {
      row = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
      lane = threadIdx.x % kWarp;
      stride = kWarp;
    }
    active = row < rows;
  }
  // Every thread of a block calls this (warps with no row pass zeros), so barriers are uniform.
  __device__ double Sum(double v) const {
    if (kRowBlock) return BlockSum(v);
    v = __shfl_sync(0xffffffffu, WarpSum(v), 0);
    __syncwarp();  // orders each lane's earlier reads before lane 0's writes after the sum
    return v;
  }
  int64_t row;
  int lane;
  int stride;
  bool active;
};

// Launches `kernel` and returns this launch's error. The runtime reports a launch's failure only
// through the host thread's last error, which also holds the error of any earlier runtime call
// that nobody cleared (the backend clears those it checks, cuda_status.h): clearing it first keeps
// an earlier call's failure from being blamed on this launch. A sticky error (the context is
// lost) is reported again by every call, this one included.
template <typename Kernel, typename... Args>
cudaError_t Launch(dim3 grid, dim3 block, size_t shared, cudaStream_t stream, Kernel kernel,
                   Args... args) {
  (void)cudaGetLastError();
  kernel<<<grid, block, shared, stream>>>(args...);
  return cudaGetLastError();
}

// One launch of a row kernel: a block per row for long rows, else a warp per row; `shared`
// bytes of shared memory per row.
template <typename Kernel, typename... Args>
cudaError_t LaunchRowsWith(cudaStream_t stream, int64_t rows, bool row_block,
                           int64_t shared_per_row, Kernel kernel, Args... args) {
  const int64_t rows_per_block = row_block ? 1 : kThreads / kWarp;
  return Launch(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), kThreads,
                static_cast<size_t>(rows_per_block * shared_per_row), stream, kernel, args...);
}

// A row kernel without shared memory, its block or warp form chosen by the row length.
template <typename Kernel, typename... Args>
cudaError_t LaunchRows(cudaStream_t stream, int64_t rows, int64_t cols, Kernel warp_kernel,
                       Kernel block_kernel, Args... args) {
  if (rows <= 0) return cudaSuccess;
  const bool block = cols >= kBlockRowMin;
  return LaunchRowsWith(stream, rows, block, 0, block ? block_kernel : warp_kernel, args...);
}

#define OPTD_LAUNCH_ROWS(stream, rows, cols, kernel, ...) \
  LaunchRows(stream, rows, cols, kernel<false>, kernel<true>, __VA_ARGS__)

template <typename Kernel, typename... Args>
cudaError_t LaunchElements(cudaStream_t stream, int64_t n, Kernel kernel, Args... args) {
  if (n <= 0) return cudaSuccess;
  return Launch(Grid(n), kThreads, 0, stream, kernel, args...);
}

// ---- elementwise ----

__global__ void FillKernel(float* x, int64_t n, float value) {
  OPTD_GRID_STRIDE(i, n) x[i] = value;
}

__global__ void ConvertKernel(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n) {
  OPTD_GRID_STRIDE(i, n) Store(dst, dst_dtype, i, Load(src, src_dtype, i));
}

__global__ void RoundKernel(float* x, int64_t n, int dtype) {
  OPTD_GRID_STRIDE(i, n) x[i] = RoundAs(x[i], dtype);
}

// Counts the out-of-range values of a table of arrays: blockIdx.y picks the array.
__global__ void CountOutOfRangeTableKernel(const float* const* xs, const int64_t* counts,
                                           float max_magnitude, unsigned long long* out) {
  const float* x = xs[blockIdx.y];
  const int64_t n = counts[blockIdx.y];
  double bad = 0;
  OPTD_GRID_STRIDE(i, n) bad += formulas::IsOutOfRange(x[i], max_magnitude) ? 1.0 : 0.0;
  bad = BlockSum(bad);
  if (threadIdx.x == 0 && bad > 0) {
    atomicAdd(out + blockIdx.y, static_cast<unsigned long long>(bad));
  }
}

__global__ void SymmetrizeKernel(float* a, int64_t n, int64_t batch) {
  const int64_t size = n * n;
  OPTD_GRID_STRIDE(idx, batch * size) {
    const int64_t b = idx / size, e = idx % size, i = e / n, j = e % n;
    if (j < i) a[idx] = a[b * size + j * n + i];
  }
}

__global__ void AddDiagonalKernel(float* a, int64_t n, int64_t batch, float value) {
  OPTD_GRID_STRIDE(idx, batch * n) {
    const int64_t b = idx / n, i = idx % n;
    a[b * n * n + i * n + i] += value;
  }
}

__global__ void ZeroSmallKernel(float* u, const float* s, int64_t batch, int64_t rows, int64_t k,
                                float relative_tolerance) {
  OPTD_GRID_STRIDE(idx, batch * rows * k) {
    const int64_t b = idx / (rows * k), j = idx % k;
    const float* sv = s + b * k;
    if (!(sv[j] > relative_tolerance * sv[0])) u[idx] = 0.0f;
  }
}

__global__ void MomentumKernel(float* m, const float* g, float* u, int64_t n,
                               formulas::MomentumScalars scalars) {
  OPTD_GRID_STRIDE(i, n) u[i] = formulas::MomentumStep(m[i], g[i], scalars);
}

__global__ void ApplyUpdateKernel(float* w, const float* o, int64_t n,
                                  const formulas::RateScalars* rate, float scale, int step_dtype) {
  const float lr = rate->lr, decay = rate->decay;
  OPTD_GRID_STRIDE(i, n) {
    w[i] = formulas::DecayAndStep(w[i], RoundAs(o[i] * scale, step_dtype), lr, decay);
  }
}

__global__ void AdamWKernel(float* w, float* m, float* v, const float* g, int64_t n,
                            const formulas::AdamWScalars* scalars_in) {
  const formulas::AdamWScalars scalars = *scalars_in;
  OPTD_GRID_STRIDE(i, n) formulas::AdamWStep(w[i], m[i], v[i], g[i], scalars);
}

__global__ void RoundAndNarrowKernel(float* x, void* narrow, int64_t n, int dtype) {
  OPTD_GRID_STRIDE(i, n) {
    const float r = RoundAs(x[i], dtype);
    x[i] = r;
    Store(narrow, dtype, i, r);
  }
}

__global__ void PolynomialAndNarrowKernel(const float* product, void* gram, int64_t n,
                                          int64_t batch, float a, float b, int dtype) {
  const int64_t size = n * n;
  OPTD_GRID_STRIDE(idx, batch * size) {
    const int64_t e = idx % size;
    // c·A·A + b·A as a GEMM with beta = b forms it, then + a·I, rounded once.
    float v = product[idx] + b * Load(gram, dtype, idx);
    if (e / n == e % n) v += a;
    Store(gram, dtype, idx, RoundAs(v, dtype));
  }
}

__global__ void WidenKernel(const float* in, double* out, int64_t n) {
  OPTD_GRID_STRIDE(i, n) out[i] = in[i];
}

__global__ void NarrowKernel(const double* in, float* out, int64_t n) {
  OPTD_GRID_STRIDE(i, n) out[i] = static_cast<float>(in[i]);
}

__global__ void NarrowTransposedKernel(const double* in, float* out, int64_t batch, int64_t rows,
                                       int64_t k) {
  const int64_t size = rows * k;
  OPTD_GRID_STRIDE(idx, batch * size) {
    const int64_t b = idx / size, e = idx % size, r = e / k, j = e % k;
    out[idx] = static_cast<float>(in[b * size + j * rows + r]);
  }
}

// ---- per-matrix sums ----

__global__ void PartialSumSquaresKernel(const float* x, int64_t batch, int64_t size,
                                        int blocks_per_matrix, double* partials) {
  const int64_t b = blockIdx.x / blocks_per_matrix;
  const int64_t part = blockIdx.x % blocks_per_matrix;
  const float* m = x + b * size;
  double sum = 0;
  for (int64_t i = part * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(blocks_per_matrix) * blockDim.x) {
    sum += static_cast<double>(m[i]) * m[i];
  }
  sum = BlockSum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

__global__ void ReducePartialsKernel(const double* partials, int blocks_per_matrix, double* sums) {
  double sum = 0;
  for (int i = threadIdx.x; i < blocks_per_matrix; i += blockDim.x) {
    sum += partials[blockIdx.x * static_cast<int64_t>(blocks_per_matrix) + i];
  }
  sum = BlockSum(sum);
  if (threadIdx.x == 0) sums[blockIdx.x] = sum;
}

__global__ void FrobeniusDivideKernel(float* x, int64_t batch, int64_t size, const double* sums,
                                      float safety, float eps, int eps_mode, int norm_dtype) {
  OPTD_GRID_STRIDE(i, batch * size) {
    const float norm = RoundAs(static_cast<float>(sqrt(sums[i / size])), norm_dtype);
    const float denominator =
        RoundAs(formulas::FrobeniusDenominator(norm, safety, eps,
                                               static_cast<formulas::NormEpsilon>(eps_mode)),
                norm_dtype);
    x[i] = x[i] / denominator;
  }
}

__global__ void ScaleToNormKernel(float* x, int64_t batch, int64_t size, const double* sums,
                                  float target, float eps) {
  OPTD_GRID_STRIDE(i, batch * size) {
    const float norm = static_cast<float>(sqrt(sums[i / size]));
    x[i] = x[i] * (target / (norm + eps));
  }
}

__global__ void PreserveNormKernel(float* o, int64_t batch, int64_t size, const double* before,
                                   const double* after, float eps) {
  OPTD_GRID_STRIDE(i, batch * size) {
    const float norm_before = static_cast<float>(sqrt(before[i / size]));
    const float norm_after = static_cast<float>(sqrt(after[i / size]));
    o[i] = o[i] * (norm_before / (norm_after + eps));
  }
}

// ---- per-row ----

// Σx² of the team's row in fp64, returned to every thread of the team (all must call it).
template <bool kRowBlock>
__device__ double RowSumOfSquares(const RowTeam<kRowBlock>& team, const float* x, int64_t cols) {
  double sum = 0;
  if (team.active) {
    const float* row = x + team.row * cols;
    for (int64_t c = team.lane; c < cols; c += team.stride) {
      sum += static_cast<double>(row[c]) * row[c];
    }
  }
  return team.Sum(sum);
}

template <bool kRowBlock>
__global__ void RowSumSquaresKernel(const float* x, int64_t rows, int64_t cols, float* out) {
  const RowTeam<kRowBlock> team(rows);
  const double sum = RowSumOfSquares(team, x, cols);
  if (team.active && team.lane == 0) out[team.row] = static_cast<float>(sum);
}

template <bool kRowBlock>
__global__ void RowEquilibrationKernel(const float* x, int64_t rows, int64_t cols, float eps,
                                       float exponent, float clip, float* factors) {
  const RowTeam<kRowBlock> team(rows);
  const double sum = RowSumOfSquares(team, x, cols);
  if (team.active && team.lane == 0) {
    factors[team.row] = formulas::EquilibrationScale(
        static_cast<float>(sqrt(sum + static_cast<double>(eps))), exponent, clip);
  }
}

// Row ℓ2 normalization (RMNP's direction). The fused RMNP step sums each row in the same order
// for the same kVec, so the staged and fused paths agree bit for bit.
template <bool kRowBlock, int kVec>
__global__ void RowNormalizeKernel(float* x, int64_t rows, int64_t cols, float eps) {
  const RowTeam<kRowBlock> team(rows);
  float* row = x + team.row * cols;
  const int64_t chunks = cols / kVec;
  double sum = 0;
  if (team.active) {
    for (int64_t k = team.lane; k < chunks; k += team.stride) {
      const Chunk<kVec> c = LoadChunk<kVec>(row + k * kVec);
      for (int j = 0; j < kVec; ++j) sum += static_cast<double>(c.v[j]) * c.v[j];
    }
  }
  sum = team.Sum(sum);
  if (!team.active) return;
  const float denominator = formulas::RowL2Denominator(static_cast<float>(sqrt(sum)), eps);
  for (int64_t k = team.lane; k < chunks; k += team.stride) {
    Chunk<kVec> c = LoadChunk<kVec>(row + k * kVec);
    for (int j = 0; j < kVec; ++j) c.v[j] = c.v[j] / denominator;
    StoreChunk<kVec>(row + k * kVec, c);
  }
}

template <bool kRowBlock>
__global__ void NorMuonRowsKernel(float* o, float* v, int64_t rows, int64_t cols,
                                  float one_minus_beta2, float eps) {
  const RowTeam<kRowBlock> team(rows);
  float* row = o + team.row * cols;
  // Read by every thread before the sum's barrier, written by one after it.
  const float old_moment = team.active ? v[team.row] : 0.0f;
  const double sum = RowSumOfSquares(team, o, cols);
  if (!team.active) return;
  const float mean_square = static_cast<float>(sum / static_cast<double>(cols));
  const float second_moment =
      formulas::NorMuonSecondMoment(old_moment, mean_square, one_minus_beta2);
  const float scale = formulas::NorMuonRowScale(second_moment, eps);
  for (int64_t c = team.lane; c < cols; c += team.stride) row[c] = row[c] * scale;
  if (team.lane == 0) v[team.row] = second_moment;
}

// The fused RMNP step (seed 000): per row, sum momentum (m written), the row's norm, then the
// scaled, rounded step. With kCached the first pass keeps u in shared memory for the second;
// without, the second pass rebuilds u from the new m and g with the same fp32 operations
// MomentumStep used, so it is the same u bit for bit.
template <bool kRowBlock, bool kCached, int kVec>
__global__ void RmnpStepKernel(float* w, float* m, const float* g, int64_t rows, int64_t cols,
                               RmnpScalars s) {
  extern __shared__ float4 shared[];
  float* cache = reinterpret_cast<float*>(shared);
  const RowTeam<kRowBlock> team(rows);
  const formulas::MomentumScalars momentum{s.momentum, 0.0f, formulas::MomentumKind::kSum,
                                           s.nesterov};
  float* u_row = kRowBlock ? cache : cache + (threadIdx.x / kWarp) * cols;
  const int64_t offset = team.row * cols;
  const int64_t chunks = cols / kVec;
  double sum = 0;
  if (team.active) {
    for (int64_t k = team.lane; k < chunks; k += team.stride) {
      const int64_t e = offset + k * kVec;
      Chunk<kVec> mc = LoadChunk<kVec>(m + e);
      const Chunk<kVec> gc = LoadChunk<kVec>(g + e);
      Chunk<kVec> u;
      for (int j = 0; j < kVec; ++j) {
        u.v[j] = formulas::MomentumStep(mc.v[j], gc.v[j], momentum);
        sum += static_cast<double>(u.v[j]) * u.v[j];
      }
      StoreChunk<kVec>(m + e, mc);
      if (kCached) StoreChunk<kVec>(u_row + k * kVec, u);
    }
  }
  sum = team.Sum(sum);
  if (!team.active) return;
  const float denominator = formulas::RowL2Denominator(static_cast<float>(sqrt(sum)), s.eps);
  const float lr = s.rate->lr, decay = s.rate->decay;
  for (int64_t k = team.lane; k < chunks; k += team.stride) {
    const int64_t e = offset + k * kVec;
    Chunk<kVec> u;
    if (kCached) {
      u = LoadChunk<kVec>(u_row + k * kVec);  // written by this thread in the first pass
    } else {
      const Chunk<kVec> mc = LoadChunk<kVec>(m + e);
      const Chunk<kVec> gc = LoadChunk<kVec>(g + e);
      for (int j = 0; j < kVec; ++j) u.v[j] = s.nesterov ? gc.v[j] + s.momentum * mc.v[j] : mc.v[j];
    }
    Chunk<kVec> wc = LoadChunk<kVec>(w + e);
    for (int j = 0; j < kVec; ++j) {
      const float step = RoundAs((u.v[j] / denominator) * s.scale, s.step_dtype);
      wc.v[j] = formulas::DecayAndStep(wc.v[j], step, lr, decay);
    }
    StoreChunk<kVec>(w + e, wc);
  }
}

// ---- per-column ----

__global__ void ColumnSumSquaresKernel(const float* x, int64_t batch, int64_t rows, int64_t cols,
                                       float* out) {
  OPTD_GRID_STRIDE(idx, batch * cols) {
    const int64_t b = idx / cols, c = idx % cols;
    const float* m = x + b * rows * cols + c;
    double sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += static_cast<double>(m[r * cols]) * m[r * cols];
    out[idx] = static_cast<float>(sum);
  }
}

__global__ void ColumnEquilibrationKernel(const float* x, int64_t batch, int64_t rows, int64_t cols,
                                          float eps, float exponent, float clip, float* factors) {
  OPTD_GRID_STRIDE(idx, batch * cols) {
    const int64_t b = idx / cols, c = idx % cols;
    const float* m = x + b * rows * cols + c;
    double sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += static_cast<double>(m[r * cols]) * m[r * cols];
    factors[idx] = formulas::EquilibrationScale(
        static_cast<float>(sqrt(sum + static_cast<double>(eps))), exponent, clip);
  }
}

__global__ void ApplyEquilibrationKernel(float* x, int64_t batch, int64_t rows, int64_t cols,
                                         const float* row_factors, const float* col_factors) {
  OPTD_GRID_STRIDE(i, batch * rows * cols) {
    const int64_t r = i / cols, c = i % cols, b = r / rows;
    float v = x[i];
    if (row_factors != nullptr) v = v * row_factors[r];
    if (col_factors != nullptr) v = v * col_factors[b * cols + c];
    x[i] = v;
  }
}

}  // namespace

cudaError_t Fill(cudaStream_t stream, float* x, int64_t n, float value) {
  return LaunchElements(stream, n, FillKernel, x, n, value);
}

cudaError_t Convert(cudaStream_t stream, const void* src, int src_dtype, void* dst, int dst_dtype,
                    int64_t n) {
  return LaunchElements(stream, n, ConvertKernel, src, src_dtype, dst, dst_dtype, n);
}

cudaError_t RoundTo(cudaStream_t stream, float* x, int64_t n, int dtype) {
  if (dtype == kF32) return cudaSuccess;
  return LaunchElements(stream, n, RoundKernel, x, n, dtype);
}

cudaError_t CountOutOfRangeTable(cudaStream_t stream, const float* const* xs, const int64_t* counts,
                                 int64_t arrays, int64_t max_count, float max_magnitude,
                                 unsigned long long* out) {
  constexpr int64_t kMaxGridY = 65535;
  if (max_count <= 0) return cudaSuccess;
  for (int64_t first = 0; first < arrays; first += kMaxGridY) {
    const dim3 grid(std::min<unsigned>(Grid(max_count), 1024),
                    static_cast<unsigned>(std::min(kMaxGridY, arrays - first)));
    const cudaError_t e = Launch(grid, kThreads, 0, stream, CountOutOfRangeTableKernel, xs + first,
                                 counts + first, max_magnitude, out + first);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t Symmetrize(cudaStream_t stream, float* a, int64_t n, int64_t batch) {
  return LaunchElements(stream, batch * n * n, SymmetrizeKernel, a, n, batch);
}

cudaError_t AddDiagonal(cudaStream_t stream, float* a, int64_t n, int64_t batch, float value) {
  return LaunchElements(stream, batch * n, AddDiagonalKernel, a, n, batch, value);
}

cudaError_t ZeroSmallSingularVectors(cudaStream_t stream, float* u, const float* s, int64_t batch,
                                     int64_t rows, int64_t k, float relative_tolerance) {
  return LaunchElements(stream, batch * rows * k, ZeroSmallKernel, u, s, batch, rows, k,
                        relative_tolerance);
}

int SumSquaresBlocks(int64_t batch, int64_t size) {
  // Enough blocks to fill the GPU for one large matrix; one per matrix for large batches.
  const int64_t wanted = (size + 16 * kThreads - 1) / (16 * kThreads);
  const int64_t cap = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, batch));
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

cudaError_t MatrixSumSquares(cudaStream_t stream, const float* x, int64_t batch, int64_t size,
                             double* partials, double* sums) {
  if (batch <= 0) return cudaSuccess;
  const int blocks = SumSquaresBlocks(batch, size);
  const cudaError_t e = Launch(static_cast<unsigned>(batch * blocks), kThreads, 0, stream,
                               PartialSumSquaresKernel, x, batch, size, blocks, partials);
  if (e != cudaSuccess) return e;
  return Launch(static_cast<unsigned>(batch), kThreads, 0, stream, ReducePartialsKernel, partials,
                blocks, sums);
}

cudaError_t FrobeniusDivide(cudaStream_t stream, float* x, int64_t batch, int64_t size,
                            const double* sums, float safety, float eps, int eps_mode,
                            int norm_dtype) {
  return LaunchElements(stream, batch * size, FrobeniusDivideKernel, x, batch, size, sums, safety,
                        eps, eps_mode, norm_dtype);
}

cudaError_t ScaleToNorm(cudaStream_t stream, float* x, int64_t batch, int64_t size,
                        const double* sums, float target, float eps) {
  return LaunchElements(stream, batch * size, ScaleToNormKernel, x, batch, size, sums, target, eps);
}

cudaError_t RowSumSquares(cudaStream_t stream, const float* x, int64_t rows, int64_t cols,
                          float* out) {
  return OPTD_LAUNCH_ROWS(stream, rows, cols, RowSumSquaresKernel, x, rows, cols, out);
}

cudaError_t ColumnSumSquares(cudaStream_t stream, const float* x, int64_t batch, int64_t rows,
                             int64_t cols, float* out) {
  return LaunchElements(stream, batch * cols, ColumnSumSquaresKernel, x, batch, rows, cols, out);
}

cudaError_t RowEquilibrationFactors(cudaStream_t stream, const float* x, int64_t rows, int64_t cols,
                                    float eps, float exponent, float clip, float* factors) {
  return OPTD_LAUNCH_ROWS(stream, rows, cols, RowEquilibrationKernel, x, rows, cols, eps, exponent,
                          clip, factors);
}

cudaError_t ColumnEquilibrationFactors(cudaStream_t stream, const float* x, int64_t batch,
                                       int64_t rows, int64_t cols, float eps, float exponent,
                                       float clip, float* factors) {
  return LaunchElements(stream, batch * cols, ColumnEquilibrationKernel, x, batch, rows, cols, eps,
                        exponent, clip, factors);
}

cudaError_t ApplyEquilibration(cudaStream_t stream, float* x, int64_t batch, int64_t rows,
                               int64_t cols, const float* row_factors, const float* col_factors) {
  return LaunchElements(stream, batch * rows * cols, ApplyEquilibrationKernel, x, batch, rows, cols,
                        row_factors, col_factors);
}

namespace {

// Rows of a multiple of 4 floats in 16-byte aligned arrays go 16 bytes at a time.
bool Vectorizable(int64_t cols, std::initializer_list<const void*> arrays) {
  if (cols % 4 != 0) return false;
  for (const void* p : arrays) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

}  // namespace

cudaError_t RowNormalize(cudaStream_t stream, float* x, int64_t rows, int64_t cols, float eps) {
  if (rows <= 0) return cudaSuccess;
  const bool block = cols >= kBlockRowMin;
  if (Vectorizable(cols, {x})) {
    return block ? LaunchRowsWith(stream, rows, true, 0, RowNormalizeKernel<true, 4>, x, rows, cols,
                                  eps)
                 : LaunchRowsWith(stream, rows, false, 0, RowNormalizeKernel<false, 4>, x, rows,
                                  cols, eps);
  }
  return block ? LaunchRowsWith(stream, rows, true, 0, RowNormalizeKernel<true, 1>, x, rows, cols,
                                eps)
               : LaunchRowsWith(stream, rows, false, 0, RowNormalizeKernel<false, 1>, x, rows, cols,
                                eps);
}

cudaError_t NorMuonRows(cudaStream_t stream, float* o, float* v, int64_t rows, int64_t cols,
                        float one_minus_beta2, float eps) {
  return OPTD_LAUNCH_ROWS(stream, rows, cols, NorMuonRowsKernel, o, v, rows, cols, one_minus_beta2,
                          eps);
}

cudaError_t NorMuonPreserveNorm(cudaStream_t stream, float* o, int64_t batch, int64_t size,
                                const double* before, const double* after, float eps) {
  return LaunchElements(stream, batch * size, PreserveNormKernel, o, batch, size, before, after,
                        eps);
}

cudaError_t Momentum(cudaStream_t stream, float* m, const float* g, float* u, int64_t n,
                     formulas::MomentumScalars scalars) {
  return LaunchElements(stream, n, MomentumKernel, m, g, u, n, scalars);
}

cudaError_t ApplyUpdate(cudaStream_t stream, float* w, const float* o, int64_t n,
                        const formulas::RateScalars* rate, float scale, int step_dtype) {
  return LaunchElements(stream, n, ApplyUpdateKernel, w, o, n, rate, scale, step_dtype);
}

cudaError_t AdamW(cudaStream_t stream, float* w, float* m, float* v, const float* g, int64_t n,
                  const formulas::AdamWScalars* scalars) {
  return LaunchElements(stream, n, AdamWKernel, w, m, v, g, n, scalars);
}

cudaError_t RmnpStep(cudaStream_t stream, float* w, float* m, const float* g, int64_t rows,
                     int64_t cols, RmnpScalars scalars) {
  if (rows <= 0) return cudaSuccess;
  // u kept in shared memory when a block's rows fit the default 48 KiB (less BlockSum's own
  // static shared memory, which counts against the same limit): the second pass then reads w
  // alone, 20 bytes moved per element instead of up to 28.
  constexpr int64_t kSharedBytes = (48 << 10) - 1024;
  const bool block = cols >= kBlockRowMin;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
  const bool cached = (block ? 1 : kThreads / kWarp) * row_bytes <= kSharedBytes;
  const bool vec = Vectorizable(cols, {w, m, g});
  const int64_t shared = cached ? row_bytes : 0;
#define OPTD_RMNP(kBlock, kCached, kVec)                                                       \
  LaunchRowsWith(stream, rows, kBlock, shared, RmnpStepKernel<kBlock, kCached, kVec>, w, m, g, \
                 rows, cols, scalars)
  if (cached && vec) return block ? OPTD_RMNP(true, true, 4) : OPTD_RMNP(false, true, 4);
  if (cached) return block ? OPTD_RMNP(true, true, 1) : OPTD_RMNP(false, true, 1);
  if (vec) return block ? OPTD_RMNP(true, false, 4) : OPTD_RMNP(false, false, 4);
  return block ? OPTD_RMNP(true, false, 1) : OPTD_RMNP(false, false, 1);
#undef OPTD_RMNP
}

cudaError_t RoundAndNarrow(cudaStream_t stream, float* x, void* narrow, int64_t n, int dtype) {
  return LaunchElements(stream, n, RoundAndNarrowKernel, x, narrow, n, dtype);
}

cudaError_t PolynomialAndNarrow(cudaStream_t stream, const float* product, void* gram, int64_t n,
                                int64_t batch, float a, float b, int dtype) {
  return LaunchElements(stream, batch * n * n, PolynomialAndNarrowKernel, product, gram, n, batch,
                        a, b, dtype);
}

cudaError_t Widen(cudaStream_t stream, const float* in, double* out, int64_t n) {
  return LaunchElements(stream, n, WidenKernel, in, out, n);
}

cudaError_t Narrow(cudaStream_t stream, const double* in, float* out, int64_t n) {
  return LaunchElements(stream, n, NarrowKernel, in, out, n);
}

cudaError_t NarrowTransposed(cudaStream_t stream, const double* in, float* out, int64_t batch,
                             int64_t rows, int64_t k) {
  return LaunchElements(stream, batch * rows * k, NarrowTransposedKernel, in, out, batch, rows, k);
}

}  // namespace optd::cuda
