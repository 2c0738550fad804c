// 4-bit matmul for a few rows on the CPU: y = x @ dequantize(w), reading only the packed codes.
//
// Registered with XLA through its FFI (lora_jax/kernels/qmatmul/cpu.py compiles this file on first use with the
// host compiler, -O3 -march=native, and caches the library). XLA:CPU has no narrow-weight dot: it converts a 4-bit
// (or bf16, int8) weight to float32 before multiplying, so an XLA 4-bit decode moves more bytes than a float32 one
// (benchmarks/results/int4_matmul_cpu.json). This kernel streams the packed codes once and never writes the
// dequantized weight anywhere.
//
// Layout (see lora_jax/quant/_qtensor.py): the kernel is (K, N); codes[k2, n] (uint8, (K/2, N)) holds the codes of
// rows 2·k2 (low nibble) and 2·k2 + 1 (high nibble); blocks of B consecutive rows share a scale s[g, n] and, for
// asymmetric formats, an offset o[g, n]. Every format is "value table, then affine per block":
//
//   w[k, n] = table[q[k, n]] · s[k / B, n]  (+ o[k / B, n])
//
// with table = NF4's 16 values (nf4), q − 8 (int4_sym, q4_0) or q (int4_asym, q4_1); the table is an input, so
// this file holds no format constants. Hence, with xsum[m, g] = Σ_{k in block g} x[m, k]:
//
//   y[m, n] = Σ_g ( s[g, n] · Σ_{k in g} x[m, k] · table[q[k, n]]  +  o[g, n] · xsum[m, g] )
//
// Vectorisation: one vector of output columns (16 on AVX-512, 8 on AVX2, 4 otherwise; GCC vector extensions for
// the arithmetic, intrinsics for unpacking), the code-to-value map is a register permute
// (NF4) or an integer-to-float conversion (the integer formats, `Affine`), the inner sum
// accumulates per block in a small buffer that stays in L1, four rows of x share each pass over the codes. Work
// is split over column panels and run on XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector = kLanes output columns: 16 on AVX-512, 8 on AVX2, 4 elsewhere (GCC's generic vectors: SSE, NEON).
#if defined(__AVX512F__)
#define LJ_LANES 16
constexpr int kVectorIsa = 2;
#elif defined(__AVX2__)
#define LJ_LANES 8
constexpr int kVectorIsa = 1;
#else
#define LJ_LANES 4
constexpr int kVectorIsa = 0;
#endif
constexpr int64_t kLanes = LJ_LANES;
typedef float f32v __attribute__((vector_size(4 * LJ_LANES)));
typedef int32_t i32v __attribute__((vector_size(4 * LJ_LANES)));
typedef uint32_t u32v __attribute__((vector_size(4 * LJ_LANES)));
typedef uint16_t u16v __attribute__((vector_size(2 * LJ_LANES)));
typedef uint8_t u8v __attribute__((vector_size(LJ_LANES)));

constexpr int64_t kMaxPanel = 512;   // columns per work unit at most: the per-block accumulators stay in L1
constexpr int kRowsPerPass = 4;      // rows of x sharing one pass over the codes

enum ParamType { kF32 = 0, kF16 = 1, kBF16 = 2 };

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

inline void store(float* p, f32v v) { std::memcpy(p, &v, sizeof(v)); }

// Unpacking: kLanes packed bytes widened to 32-bit lanes (`widen`), then table[z & 15] in every lane (`Table`)
// for the low code (z) and the high one (z >> 4; x86 has no byte shift). AVX-512: one permute, which reads only
// the index's low 4 bits; AVX2: two 8-entry permutes blended on bit 3; elsewhere one lookup per lane.
#if defined(__AVX512F__)
inline i32v widen(const uint8_t* p) {
  const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return load<i32v>(&z);
}

struct Table {
  __m512 t;
  explicit Table(const float* v) : t(_mm512_loadu_ps(v)) {}
  f32v operator()(i32v z) const {
    const __m512 r = _mm512_permutexvar_ps(load<__m512i>(&z), t);
    return load<f32v>(&r);
  }
};
#elif defined(__AVX2__)
inline i32v widen(const uint8_t* p) {
  const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return load<i32v>(&z);
}

struct Table {
  __m256 lo, hi;
  explicit Table(const float* v) : lo(_mm256_loadu_ps(v)), hi(_mm256_loadu_ps(v + 8)) {}
  f32v operator()(i32v z) const {
    const __m256i i = load<__m256i>(&z);
    const __m256 r = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i),
                                      _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));  // bit 3 -> sign: upper half
    return load<f32v>(&r);
  }
};
#else
inline i32v widen(const uint8_t* p) { return __builtin_convertvector(load<u8v>(p), i32v); }

struct Table {
  float t[16];
  explicit Table(const float* v) { std::memcpy(t, v, sizeof(t)); }
  f32v operator()(i32v z) const {
    f32v r;
    for (int l = 0; l < kLanes; ++l) r[l] = t[z[l] & 15];
    return r;
  }
};
#endif

// Integer tables (int4_sym, q4_0: q - 8; int4_asym, q4_1: q): table[z & 15] = float(z & 15) + table[0], by a
// conversion and an add instead of `Table`'s permutes (AVX2: two permutes and a blend per vector, the unpacking's
// bottleneck). Small integers are exact in float32, so the values are the table's bit for bit.
struct Affine {
  f32v base;
  explicit Affine(const float* v) : base(f32v{} + v[0]) {}
  f32v operator()(i32v z) const { return __builtin_convertvector(z & 15, f32v) + base; }
};

inline bool is_affine(const float* t) {
  for (int i = 1; i < 16; ++i)
    if (t[i] != t[0] + static_cast<float>(i)) return false;
  return true;
}

// IEEE half -> float by bit manipulation (no _Float16, which older compilers lack on x86): exact, including
// subnormals, infinities and NaN.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    bits = sign | ((112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// kLanes block parameters (scale or offset) as float32, from float32, float16 or bfloat16 storage.
inline f32v load_param(const void* base, ParamType t, int64_t i) {
  switch (t) {
    case kF32:
      return load<f32v>(static_cast<const float*>(base) + i);
    case kF16: {
      const uint16_t* h = static_cast<const uint16_t*>(base) + i;
#if defined(__AVX512F__)
      const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
      return load<f32v>(&v);
#elif defined(__AVX2__) && defined(__F16C__)
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
      return load<f32v>(&v);
#else
      f32v v;
      for (int l = 0; l < kLanes; ++l) v[l] = half_to_float(h[l]);
      return v;
#endif
    }
    default: {
      const u32v bits = __builtin_convertvector(load<u16v>(static_cast<const uint16_t*>(base) + i), u32v) << 16;
      return load<f32v>(&bits);
    }
  }
}

inline float param(const void* base, ParamType t, int64_t i) {
  switch (t) {
    case kF32:
      return static_cast<const float*>(base)[i];
    case kF16:
      return half_to_float(static_cast<const uint16_t*>(base)[i]);
    default: {
      uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      return f;
    }
  }
}

struct Problem {
  const float* x;        // (M, K)
  const uint8_t* codes;  // (K/2, N)
  const void* scale;     // (G, N)
  const void* offset;    // (G, N) or nullptr
  ParamType scale_type, offset_type;
  float table[16];
  bool affine;           // table[i] = table[0] + i (the integer formats): `Affine` instead of `Table`
  float* y;              // (M, N)
  const float* xsum;     // (M, G), when offset
  int64_t m, k, n, block;
};

// Rows [m0, m0 + R) of y over the vector columns [c0, c1) (c1 - c0 a multiple of kLanes, at most kMaxPanel).
template <int R, typename Lookup>
void panel(const Problem& p, int64_t m0, int64_t c0, int64_t c1) {
  const int64_t width = c1 - c0, groups = p.k / p.block, half = p.block / 2;
  alignas(64) float acc[R][kMaxPanel];
  alignas(64) float out[R][kMaxPanel];
  const Lookup table(p.table);
  const float* x[R];
  for (int r = 0; r < R; ++r) {
    x[r] = p.x + (m0 + r) * p.k;
    std::fill(out[r], out[r] + width, 0.0f);
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int r = 0; r < R; ++r) std::fill(acc[r], acc[r] + width, 0.0f);
    // two packed rows (four rows of the kernel) per pass over the accumulators; `half` is even when the block
    // size is a multiple of 4 (every format here), else the last packed row takes a pass of its own
    for (int64_t j = 0; j < half; j += 2) {
      const int64_t k2 = g * half + j;
      const bool pair = j + 1 < half;
      const uint8_t* row0 = p.codes + k2 * p.n + c0;
      const uint8_t* row1 = pair ? row0 + p.n : row0;
      float x0[R], x1[R], x2[R], x3[R];
      for (int r = 0; r < R; ++r) {
        x0[r] = x[r][2 * k2];
        x1[r] = x[r][2 * k2 + 1];
        x2[r] = pair ? x[r][2 * k2 + 2] : 0.0f;
        x3[r] = pair ? x[r][2 * k2 + 3] : 0.0f;
      }
      for (int64_t c = 0; c < width; c += kLanes) {
        const i32v z0 = widen(row0 + c), z1 = widen(row1 + c);
        const f32v v0 = table(z0), v1 = table(z0 >> 4), v2 = table(z1), v3 = table(z1 >> 4);
        for (int r = 0; r < R; ++r)
          store(acc[r] + c, load<f32v>(acc[r] + c) + x0[r] * v0 + x1[r] * v1 + x2[r] * v2 + x3[r] * v3);
      }
    }
    const int64_t pofs = g * p.n + c0;
    for (int64_t c = 0; c < width; c += kLanes) {
      const f32v s = load_param(p.scale, p.scale_type, pofs + c);
      const f32v o = p.offset ? load_param(p.offset, p.offset_type, pofs + c) : f32v{};
      for (int r = 0; r < R; ++r) {
        f32v v = load<f32v>(out[r] + c) + load<f32v>(acc[r] + c) * s;
        if (p.offset) v += o * p.xsum[(m0 + r) * groups + g];
        store(out[r] + c, v);
      }
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(p.y + (m0 + r) * p.n + c0, out[r], width * sizeof(float));
}

// One output y[m, c] weight by weight in the reference's form, x · (table[q] · s + o), accumulated in double: for
// the columns that do not fill a vector, and for rows holding an inf or NaN. (The vector path factors x out of
// each block's offset term, o · Σx, which turns an infinite x into inf − inf = NaN where the reference gives ±inf;
// such rows are a diverged model's, so recomputing them costs nothing in practice.)
float reference_output(const Problem& p, int64_t m, int64_t c) {
  const float* x = p.x + m * p.k;
  double y = 0.0;
  for (int64_t k = 0; k < p.k; ++k) {
    const uint8_t b = p.codes[(k / 2) * p.n + c];
    const int64_t g = (k / p.block) * p.n + c;
    float w = p.table[(k & 1) ? (b >> 4) : (b & 15)] * param(p.scale, p.scale_type, g);
    if (p.offset) w += param(p.offset, p.offset_type, g);
    y += x[k] * w;
  }
  return static_cast<float>(y);
}

void scalar_outputs(const Problem& p, int64_t vec_cols) {
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.k;
    const bool finite = std::all_of(x, x + p.k, [](float v) { return std::isfinite(v); });
    for (int64_t c = (finite || !p.offset) ? vec_cols : 0; c < p.n; ++c) p.y[m * p.n + c] = reference_output(p, m, c);
  }
}

template <typename Lookup>
void run_rows(const Problem& p, int64_t m0, int64_t rows, int64_t c0, int64_t c1) {
  switch (rows) {
    case 4: return panel<4, Lookup>(p, m0, c0, c1);
    case 3: return panel<3, Lookup>(p, m0, c0, c1);
    case 2: return panel<2, Lookup>(p, m0, c0, c1);
    default: return panel<1, Lookup>(p, m0, c0, c1);
  }
}

void run_unit(const Problem& p, int64_t m0, int64_t rows, int64_t c0, int64_t c1) {
  if (p.affine) return run_rows<Affine>(p, m0, rows, c0, c1);
  return run_rows<Table>(p, m0, rows, c0, c1);
}

// Work shared by the caller and the pool's threads: units are (row chunk, column panel) pairs taken from a
// counter; the caller returns once every unit is done. Helpers that start late find no unit left; they hold the
// state through the shared pointer, so it outlives the call if need be.
struct Shared {
  Problem p;
  int64_t panels, panel_width, vec_cols, units;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      const int64_t chunk = u / panels, pi = u % panels;
      const int64_t m0 = chunk * kRowsPerPass, c0 = pi * panel_width;
      run_unit(p, m0, std::min<int64_t>(kRowsPerPass, p.m - m0), c0, std::min(vec_cols, c0 + panel_width));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ParamType param_type(ffi::DataType t, bool* ok) {
  *ok = true;
  switch (t) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::F16: return kF16;
    case ffi::DataType::BF16: return kBF16;
    default: *ok = false; return kF32;
  }
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F32> table, ffi::AnyBuffer scale, ffi::AnyBuffer offset,
                       ffi::ResultBuffer<ffi::F32> y, int64_t block_size, int64_t min_parallel_weights) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || table.element_count() != 16)
    return ffi::Error::InvalidArgument("lj_qmatmul_cpu: expected x (M, K), codes (K/2, N), table (16,), scale (G, N)");
  const int64_t m = xd[0], k = xd[1], n = cd[1];
  if (cd[0] * 2 != k || block_size <= 0 || block_size % 2 || k % block_size || sd[0] != k / block_size || sd[1] != n)
    return ffi::Error::InvalidArgument("lj_qmatmul_cpu: inconsistent shapes (x, codes, scale, block_size)");
  const bool has_offset = offset.element_count() > 0;
  if (has_offset && (offset.dimensions().size() != 2 || offset.dimensions()[0] != sd[0] || offset.dimensions()[1] != n))
    return ffi::Error::InvalidArgument("lj_qmatmul_cpu: offset must have the shape of scale");
  bool ok_s, ok_o = true;
  Problem p;
  p.scale_type = param_type(scale.element_type(), &ok_s);
  p.offset_type = has_offset ? param_type(offset.element_type(), &ok_o) : kF32;
  if (!ok_s || !ok_o) return ffi::Error::InvalidArgument("lj_qmatmul_cpu: block parameters must be f32, f16 or bf16");
  if (m == 0 || n == 0) return ffi::Error::Success();

  p.x = x.typed_data();
  p.codes = codes.typed_data();
  p.scale = scale.untyped_data();
  p.offset = has_offset ? offset.untyped_data() : nullptr;
  std::memcpy(p.table, table.typed_data(), sizeof(p.table));
  p.affine = is_affine(p.table);
  p.y = y->typed_data();
  p.m = m;
  p.k = k;
  p.n = n;
  p.block = block_size;
  const int64_t groups = k / block_size;
  std::vector<float> xsum;
  if (has_offset) {
    xsum.assign(m * groups, 0.0f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.0f;
        for (int64_t j = g * block_size; j < (g + 1) * block_size; ++j) s += p.x[i * k + j];
        xsum[i * groups + g] = s;
      }
    p.xsum = xsum.data();
  } else {
    p.xsum = nullptr;
  }

  const int64_t vec_cols = n / kLanes * kLanes;
  if (vec_cols > 0) {
    const int64_t threads = k * n >= min_parallel_weights ? std::max<int64_t>(1, pool.num_threads()) : 1;
    const int64_t lanes = vec_cols / kLanes;
    const int64_t want = std::max<int64_t>(threads, (vec_cols + kMaxPanel - 1) / kMaxPanel);
    const int64_t panel_width = (lanes + want - 1) / want * kLanes;
    const int64_t panels = (vec_cols + panel_width - 1) / panel_width;
    const int64_t chunks = (m + kRowsPerPass - 1) / kRowsPerPass;
    auto shared = std::make_shared<Shared>();
    shared->p = p;
    shared->panels = panels;
    shared->panel_width = panel_width;
    shared->vec_cols = vec_cols;
    shared->units = panels * chunks;
    const int64_t helpers = std::min<int64_t>(threads, shared->units) - 1;
    for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->work(); });
    shared->work();
    while (shared->done.load(std::memory_order_acquire) < shared->units) std::this_thread::yield();
  }
  scalar_outputs(p, vec_cols);
  return ffi::Error::Success();
}

}  // namespace

// 2: AVX-512, 1: AVX2, 0: generic vectors (what this build unpacks with; see `widen`)
extern "C" int LjQmatmulCpuVectorIsa() { return kVectorIsa; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(LjQmatmulCpu, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::U8>>()    // codes
                                  .Arg<ffi::Buffer<ffi::F32>>()   // table
                                  .Arg<ffi::AnyBuffer>()          // scale
                                  .Arg<ffi::AnyBuffer>()          // offset (empty when none)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("min_parallel_weights"));
