// Fused attention for CPUs, as XLA FFI handlers: softmax attention (the
// FlashAttention-2 algorithm with each block's scores kept in cache between
// its two matmuls) and causal linear attention (chunked, further below).
//
// Built on first use by zoo/attention/fused_cpu.py with the machine's C++
// compiler (-O3 -march=native); GCC/Clang vector extensions, no intrinsics,
// so it compiles for any x86 or Arm CPU.
//
// Softmax layouts (row-major float32): q, out, dq [B, T, H, D]; k, v, dk, dv
// [B, T, G, D] with H a multiple of G (query head h reads kv head h / (H/G));
// lse [B, H, T]. T and D are multiples of 16 (the caller pads). Query t sees
// key s when s <= t (causal) or s < valid (not causal).
// Work is split over threads by (batch, head, query block) forward and by
// (batch, kv head) backward, each unit in a fixed order, so results do not
// depend on the thread count or timing.

#ifdef __linux__
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));
constexpr int W = 16;      // floats per vector
constexpr int BQ = 128;    // query rows per block
constexpr int BK = 256;    // keys per block
constexpr float NEG = -INFINITY;

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }
inline v16 splat(float a) { return v16{} + a; }
inline float hmax(v16 x) {
  float m = x[0];
  for (int e = 1; e < W; ++e) m = std::max(m, x[e]);
  return m;
}
inline float hsum(v16 x) {
  float s = 0.0f;
  for (int e = 0; e < W; ++e) s += x[e];
  return s;
}

// e^x for x <= 0 (x below -87 gives about 1e-38): x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error
// about 2e-7), 2^n through the exponent bits.
inline v16 vexp(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16 round = splat(12582912.0f);  // 1.5 * 2^23: round to nearest
  v16 n = (x * 1.44269504088896341f + round) - round;
  v16 r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  v16 p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  return p * (v16)bits;  // a vector cast keeps the bits
}

// C[MR x 16 NV] (+)= A[MR x K] B[K x 16 NV] in registers: one broadcast of A
// and NV loads of B per k feed MR x NV fused multiply-adds.
template <int MR, int NV>
inline void Tile(int K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  v16 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? load(C + r * ldc + v * W) : splat(0.0f);
  for (int k = 0; k < K; ++k) {
    v16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * W);
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * lda + k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * W, c[r][v]);
}

template <int NV, int MR>
void Rows(int M, int K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int i = 0;
  for (; i + MR <= M; i += MR)
    Tile<MR, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i + 2 <= M; i += 2)
    Tile<2, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i < M; ++i)
    Tile<1, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

// C[M x N] (+)= A[M x K] B[K x N], row-major with leading dimensions;
// N a multiple of 16.
void Gemm(int M, int N, int K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int j = 0;
  for (; j + 4 * W <= N; j += 4 * W)
    Rows<4, 6>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  for (; j < N; j += W)
    Rows<1, 8>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
}

// The matmuls read their operands from buffers laid out for them: rows a
// power of two apart (T or H x D floats) alias in the L1 cache.

// dst [ceil(T / P) panels][D][P] = scale * src^T, panel p holding rows
// p P ... p P + P - 1 of src [T x D] (rows lds apart): a block of P
// transposed rows is one contiguous D x P matrix.
void Panels(int T, int D, int P, const float* src, int64_t lds, float* dst,
            float scale) {
  for (int t = 0; t < T; ++t) {
    float* col = dst + int64_t(t / P) * D * P + t % P;
    for (int d = 0; d < D; ++d) col[int64_t(d) * P] = src[t * lds + d] * scale;
  }
}

// dst [T x D] contiguous = src [T x D] with rows lds apart.
void Compact(int T, int D, const float* src, int64_t lds, float* dst) {
  for (int t = 0; t < T; ++t)
    std::copy(src + t * lds, src + t * lds + D, dst + int64_t(t) * D);
}

int Blocks(int T, int P) { return (T + P - 1) / P; }

// The CPUs this process may run on (its affinity mask on Linux).
int NumThreads() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs f(0) ... f(n - 1) on the CPUs this process may use.
template <class F>
void Parallel(int n, const F& f) {
  const int threads = std::min(n, NumThreads());
  std::atomic<int> next{0};
  auto work = [&] {
    for (int i; (i = next++) < n;) f(i);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

struct Shape {
  int B, T, H, G, D;
  int64_t ldq() const { return int64_t(H) * D; }
  int64_t ldk() const { return int64_t(G) * D; }
};

void Forward(const Shape& s, const float* q, const float* k, const float* v,
             float* out, float* lse, bool causal, int valid, float scale) {
  const int64_t ldq = s.ldq(), ldk = s.ldk();
  const int R = s.H / s.G, nq = Blocks(s.T, BQ);
  // Per (batch, kv head): keys as D x BK panels, values contiguous.
  const int64_t panels = int64_t(Blocks(s.T, BK)) * BK * s.D;
  std::vector<float> kt(s.B * s.G * panels),
      vc(int64_t(s.B) * s.G * s.T * s.D);
  Parallel(s.B * s.G, [&](int bg) {
    const int64_t off = int64_t(bg / s.G) * s.T * ldk + bg % s.G * s.D;
    Panels(s.T, s.D, BK, k + off, ldk, kt.data() + bg * panels, 1.0f);
    Compact(s.T, s.D, v + off, ldk, vc.data() + int64_t(bg) * s.T * s.D);
  });
  Parallel(s.B * s.H * nq, [&](int unit) {
    const int b = unit / (s.H * nq), h = unit / nq % s.H, g = h / R;
    const int i0 = unit % nq * BQ, bq = std::min(BQ, s.T - i0);
    std::vector<float> qs(BQ * s.D), p(BQ * BK), o(BQ * s.D, 0.0f),
        m(BQ, NEG), l(BQ, 0.0f);
    const float* qb = q + (int64_t(b) * s.T + i0) * ldq + h * s.D;
    for (int i = 0; i < bq; ++i)
      for (int d = 0; d < s.D; ++d) qs[i * s.D + d] = qb[i * ldq + d] * scale;
    const float* ktb = kt.data() + (b * s.G + g) * panels;
    const float* vb = vc.data() + int64_t(b * s.G + g) * s.T * s.D;
    const int end = causal ? i0 + bq : (valid + W - 1) / W * W;
    for (int j0 = 0; j0 < end; j0 += BK) {
      const int bk = std::min(BK, end - j0);
      Gemm(bq, bk, s.D, qs.data(), s.D, ktb + int64_t(j0) * s.D, BK,
           p.data(), BK, false);
      for (int i = 0; i < bq; ++i) {
        float* pi = p.data() + i * BK;
        const int limit = (causal ? i0 + i + 1 : valid) - j0;  // keys < limit
        for (int j = std::max(0, limit); j < bk; ++j) pi[j] = NEG;
        v16 mx = splat(m[i]);
        for (int j = 0; j < bk; j += W) {
          const v16 x = load(pi + j);
          mx = x > mx ? x : mx;
        }
        const float mnew = hmax(mx);
        if (mnew == NEG) continue;  // every key so far masked
        const float alpha = m[i] == NEG ? 0.0f : std::exp(m[i] - mnew);
        v16 sum = splat(0.0f);
        for (int j = 0; j < bk; j += W) {
          const v16 x = load(pi + j);
          const v16 e = x == NEG ? splat(0.0f) : vexp(x - mnew);
          store(pi + j, e);
          sum += e;
        }
        l[i] = l[i] * alpha + hsum(sum);
        m[i] = mnew;
        if (alpha != 1.0f)
          for (int d = 0; d < s.D; d += W)
            store(o.data() + i * s.D + d, load(o.data() + i * s.D + d) * alpha);
      }
      // Rows whose every key was masked keep stale scores: zero them.
      for (int i = 0; i < bq; ++i)
        if (m[i] == NEG)
          std::fill(p.begin() + i * BK, p.begin() + i * BK + bk, 0.0f);
      Gemm(bq, s.D, bk, p.data(), BK, vb + int64_t(j0) * s.D, s.D, o.data(),
           s.D, true);
    }
    float* ob = out + (int64_t(b) * s.T + i0) * ldq + h * s.D;
    float* lb = lse + (int64_t(b) * s.H + h) * s.T + i0;
    for (int i = 0; i < bq; ++i) {
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      for (int d = 0; d < s.D; ++d) ob[i * ldq + d] = o[i * s.D + d] * inv;
      lb[i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : NEG;
    }
  });
}

// Per (batch, kv head), per query head of its group, per key block: the
// block's probabilities transposed, P^T [keys x queries], are recomputed from
// lse; dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
// dK += dS^T Q, dQ^T += K^T dS^T. Everything is row-major in this form.
void Backward(const Shape& s, const float* q, const float* k, const float* v,
              const float* out, const float* lse, const float* dout, float* dq,
              float* dk, float* dv, bool causal, int valid, float scale) {
  const int64_t ldq = s.ldq(), ldk = s.ldk(), TD = int64_t(s.T) * s.D;
  const int R = s.H / s.G, D = s.D;
  const int64_t kpanels = int64_t(Blocks(s.T, BK)) * BK * D;
  const int64_t qpanels = int64_t(Blocks(s.T, BQ)) * BQ * D;
  Parallel(s.B * s.G, [&](int bg) {
    const int b = bg / s.G, g = bg % s.G;
    // kc, vc, qc, doc: contiguous T x D; kt: D x BK panels; qt, dot, dqt:
    // D x BQ panels.
    std::vector<float> kc(TD), vc(TD), qc(TD), doc(TD), kt(kpanels),
        qt(qpanels), dot(qpanels), dqt(qpanels), delta(s.T), pt(BK * BQ),
        dst(BK * BQ), dkb(BK * D), dvb(BK * D);
    const int64_t koff = int64_t(b) * s.T * ldk + g * D;
    Compact(s.T, D, k + koff, ldk, kc.data());
    Compact(s.T, D, v + koff, ldk, vc.data());
    Panels(s.T, D, BK, k + koff, ldk, kt.data(), 1.0f);
    float *dkb_out = dk + koff, *dvb_out = dv + koff;
    for (int t = 0; t < s.T; ++t)
      for (int d = 0; d < D; ++d)
        dkb_out[t * ldk + d] = dvb_out[t * ldk + d] = 0.0f;
    const int kend = causal ? s.T : (valid + W - 1) / W * W;
    for (int r = 0; r < R; ++r) {
      const int h = g * R + r;
      const int64_t off = int64_t(b) * s.T * ldq + h * D;
      const float* lb = lse + (int64_t(b) * s.H + h) * s.T;
      Compact(s.T, D, q + off, ldq, qc.data());
      Compact(s.T, D, dout + off, ldq, doc.data());
      Panels(s.T, D, BQ, q + off, ldq, qt.data(), scale);
      Panels(s.T, D, BQ, dout + off, ldq, dot.data(), 1.0f);
      std::fill(dqt.begin(), dqt.end(), 0.0f);
      for (int t = 0; t < s.T; ++t) {
        v16 acc = splat(0.0f);
        for (int d = 0; d < D; d += W)
          acc += load(out + off + t * ldq + d) * load(doc.data() + t * D + d);
        delta[t] = hsum(acc);
      }
      for (int j0 = 0; j0 < kend; j0 += BK) {
        const int bk = std::min(BK, kend - j0);
        std::fill(dkb.begin(), dkb.end(), 0.0f);
        std::fill(dvb.begin(), dvb.end(), 0.0f);
        for (int i0 = causal ? j0 / BQ * BQ : 0; i0 < s.T; i0 += BQ) {
          const int bq = std::min(BQ, s.T - i0);
          // Causal: keys past this query block's last query are masked for
          // all of it; only the first kj keys of the block take part.
          const int kj = causal ? std::min(bk, i0 + bq - j0) : bk;
          // Panel i0 / BQ of qt and dot starts at i0 x D.
          Gemm(kj, bq, D, kc.data() + int64_t(j0) * D, D,
               qt.data() + int64_t(i0) * D, BQ, pt.data(), BQ, false);
          Gemm(kj, bq, D, vc.data() + int64_t(j0) * D, D,
               dot.data() + int64_t(i0) * D, BQ, dst.data(), BQ, false);
          for (int j = 0; j < kj; ++j) {
            float *pj = pt.data() + j * BQ, *dj = dst.data() + j * BQ;
            // Queries i >= first see key j0 + j.
            const int first = causal ? j0 + j - i0 : (j0 + j < valid ? 0 : bq);
            for (int i = 0; i < bq; i += W) {
              v16 e = vexp(load(pj + i) - load(lb + i0 + i));
              v16 ds = e * (load(dj + i) - load(delta.data() + i0 + i));
              if (i < first)
                for (int x = 0; x < W; ++x)
                  if (i + x < first) e[x] = ds[x] = 0.0f;
              store(pj + i, e);
              store(dj + i, ds);
            }
          }
          Gemm(kj, D, bq, pt.data(), BQ, doc.data() + int64_t(i0) * D, D,
               dvb.data(), D, true);
          Gemm(kj, D, bq, dst.data(), BQ, qc.data() + int64_t(i0) * D, D,
               dkb.data(), D, true);
          Gemm(D, bq, kj, kt.data() + int64_t(j0) * D, BK, dst.data(), BQ,
               dqt.data() + int64_t(i0) * D, BQ, true);
        }
        for (int j = 0; j < bk; ++j)
          for (int d = 0; d < D; ++d) {
            dkb_out[int64_t(j0 + j) * ldk + d] += dkb[j * D + d] * scale;
            dvb_out[int64_t(j0 + j) * ldk + d] += dvb[j * D + d];
          }
      }
      for (int t = 0; t < s.T; ++t)
        for (int d = 0; d < D; ++d)
          dq[off + t * ldq + d] =
              dqt[int64_t(t / BQ) * BQ * D + int64_t(d) * BQ + t % BQ] * scale;
    }
  });
}

// Causal linear attention (zoo/attention/linear.py), per (batch, kv head):
// y_t = sum_{s <= t} exp(shift_s - M_t) (phi_q_t . phi_k_s) v_s with
// M_t = max_{s <= t} shift_s, the running maximum that keeps FAVOR+'s key
// weights at most 1 (elu features have all shifts zero). Keys run in chunks
// of LC: inside a chunk the masked quadratic form, across chunks the state
// S = sum phi_k v^T of the earlier chunks, scaled to their largest shift.
// The backward pass recomputes the states forward (for d phi_q), then runs
// the chunks in reverse carrying dS = sum phi_q dy^T of the later queries
// (for d phi_k and dv). Each chunk's scores stay in cache, so time and
// memory are linear in T.
//
// Layouts (row-major float32): phi_q, d phi_q [B, T, H, F]; phi_k, d phi_k
// [B, T, G, F]; shift [B, T, G]; v, dv [B, T, G, V]; y, dy [B, T, H, V].
// T, F and V are multiples of 16 (the caller pads).
constexpr int LC = 64;  // keys per chunk

struct LinearShape {
  int B, T, H, G, F, V;
};

// One (batch, kv head)'s view of the inputs, and the chunk-level scratch.
struct LinearUnit {
  const LinearShape& s;
  int b, g;
  std::vector<float> shift, top, w, qc, kc, kt, vc, vt, dyc, p, scratch;

  LinearUnit(const LinearShape& s, int b, int g, const float* shifts)
      : s(s), b(b), g(g), shift(s.T), top(s.T), w(LC * LC),
        qc(LC * s.F), kc(LC * s.F), kt(s.F * LC), vc(LC * s.V),
        vt(s.V * LC), dyc(LC * s.V), p(LC * LC),
        scratch(LC * std::max(s.F, s.V)) {
    float m = NEG;
    for (int t = 0; t < s.T; ++t) {
      shift[t] = shifts[(int64_t(b) * s.T + t) * s.G + g];
      top[t] = m = std::max(m, shift[t]);
    }
  }
  // Offsets of row t: query head h in [B, T, H, D], kv head g in
  // [B, T, G, D].
  int64_t QRow(int t, int h, int D) const {
    return ((int64_t(b) * s.T + t) * s.H + h) * D;
  }
  int64_t KRow(int t, int D) const {
    return ((int64_t(b) * s.T + t) * s.G + g) * D;
  }
  // The maximum shift before row i0 (-inf at the start).
  float Before(int i0) const { return i0 ? top[i0 - 1] : NEG; }
  // W [n x n] (ld LC): exp(shift_j - M_i) for keys j <= i of the chunk at
  // i0, 0 above the diagonal.
  void Weights(int i0, int n) {
    for (int i = 0; i < n; ++i) {
      const v16 mi = splat(top[i0 + i]);
      for (int j = 0; j < n; j += W) {
        v16 e = vexp(load(shift.data() + i0 + j) - mi);
        for (int x = 0; x < W; ++x)
          if (j + x > i) e[x] = 0.0f;
        store(w.data() + i * LC + j, e);
      }
    }
  }
  // The chunk's keys and values: kc [n x F], kt [F x LC], vc [n x V],
  // vt [V x LC].
  void Keys(const float* phi_k, const float* v, int i0, int n) {
    const int64_t ldk = int64_t(s.G) * s.F, ldv = int64_t(s.G) * s.V;
    Compact(n, s.F, phi_k + KRow(i0, s.F), ldk, kc.data());
    Panels(n, s.F, LC, phi_k + KRow(i0, s.F), ldk, kt.data(), 1.0f);
    Compact(n, s.V, v + KRow(i0, s.V), ldv, vc.data());
    Panels(n, s.V, LC, v + KRow(i0, s.V), ldv, vt.data(), 1.0f);
  }
  // P [n x n] = (qc kt) o W: the chunk's weighted causal scores.
  void Scores(int n) {
    Gemm(n, n, s.F, qc.data(), s.F, kt.data(), LC, p.data(), LC, false);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) p[i * LC + j] *= w[i * LC + j];
  }
  // out [n x N] += exp(before - M_i) (a [n x K] b [K x N]) for the rows i
  // of the chunk at i0 > 0: the earlier chunks' state, rescaled to each
  // query's running maximum.
  void AddCarried(int i0, int n, int N, int K, const float* a,
                  const float* b, float* out) {
    const float before = Before(i0);
    float* ab = scratch.data();
    Gemm(n, N, K, a, K, b, N, ab, N, false);
    for (int i = 0; i < n; ++i) {
      const float carry = std::exp(before - top[i0 + i]);
      for (int d = 0; d < N; ++d) out[i * N + d] += carry * ab[i * N + d];
    }
  }
};

// dst [T x D] with rows ldd apart = src [T x D] contiguous (Compact's
// inverse).
void Spread(int T, int D, const float* src, float* dst, int64_t ldd) {
  for (int t = 0; t < T; ++t)
    std::copy(src + int64_t(t) * D, src + int64_t(t + 1) * D, dst + t * ldd);
}

// dst [rows x cols] (ld LC) = src [rows x cols] (ld LC) with column j
// scaled by exp(x_j - ref) (x_j <= ref).
void ScaleColumns(int rows, int cols, const float* src, const float* x,
                  float ref, float* dst) {
  float scale[LC];
  for (int j = 0; j < cols; j += W) store(scale + j, vexp(load(x + j) - ref));
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) dst[r * LC + j] = src[r * LC + j] * scale[j];
}

// dst [cols x rows] = src^T, src [rows x cols] with rows lds apart.
void Transpose(int rows, int cols, const float* src, int64_t lds,
               float* dst, int64_t ldd) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

void LinearForward(const LinearShape& s, const float* phi_q,
                   const float* phi_k, const float* shifts, const float* v,
                   float* y) {
  const int R = s.H / s.G, F = s.F, V = s.V;
  const int64_t ldq = int64_t(s.H) * F, ldy = int64_t(s.H) * V;
  Parallel(s.B * s.G, [&](int bg) {
    LinearUnit u(s, bg / s.G, bg % s.G, shifts);
    std::vector<float> state(F * V, 0.0f), yc(LC * V), kw(F * LC);
    for (int i0 = 0; i0 < s.T; i0 += LC) {
      const int n = std::min(LC, s.T - i0);
      const float before = u.Before(i0), last = u.top[i0 + n - 1];
      u.Weights(i0, n);
      u.Keys(phi_k, v, i0, n);
      for (int r = 0; r < R; ++r) {
        const int h = u.g * R + r;
        Compact(n, F, phi_q + u.QRow(i0, h, F), ldq, u.qc.data());
        u.Scores(n);
        Gemm(n, V, n, u.p.data(), LC, u.vc.data(), V, yc.data(), V, false);
        if (i0) u.AddCarried(i0, n, V, F, u.qc.data(), state.data(), yc.data());
        Spread(n, V, yc.data(), y + u.QRow(i0, h, V), ldy);
      }
      // S <- S exp(before - last) + sum_j exp(shift_j - last) phi_k_j v_j^T
      const float decay = i0 ? std::exp(before - last) : 0.0f;
      for (float& x : state) x *= decay;
      ScaleColumns(F, n, u.kt.data(), u.shift.data() + i0, last, kw.data());
      Gemm(F, V, n, kw.data(), LC, u.vc.data(), V, state.data(), V, true);
    }
  });
}

void LinearBackward(const LinearShape& s, const float* phi_q,
                    const float* phi_k, const float* shifts, const float* v,
                    const float* dy, float* dphi_q, float* dphi_k, float* dv) {
  const int R = s.H / s.G, F = s.F, V = s.V;
  const int64_t ldq = int64_t(s.H) * F, ldy = int64_t(s.H) * V,
                ldk = int64_t(s.G) * F, ldv = int64_t(s.G) * V;
  Parallel(s.B * s.G, [&](int bg) {
    LinearUnit u(s, bg / s.G, bg % s.G, shifts);
    // st: S^T [V x F] of the earlier chunks; ds [F x V], dst = ds^T: the
    // later queries' sum phi_q dy^T.
    std::vector<float> st(V * F, 0.0f), ds(F * V, 0.0f), dst(V * F),
        gm(LC * LC), tr(LC * LC), dqc(LC * F), dkc(LC * F), dvc(LC * V),
        qt(F * LC), vw(V * LC);
    float negtop[LC];
    // Forward through the chunks: d phi_q whole, the in-chunk parts of
    // d phi_k and dv.
    for (int i0 = 0; i0 < s.T; i0 += LC) {
      const int n = std::min(LC, s.T - i0);
      const float before = u.Before(i0), last = u.top[i0 + n - 1];
      u.Weights(i0, n);
      u.Keys(phi_k, v, i0, n);
      for (int r = 0; r < R; ++r) {
        const int h = u.g * R + r;
        Compact(n, F, phi_q + u.QRow(i0, h, F), ldq, u.qc.data());
        Compact(n, V, dy + u.QRow(i0, h, V), ldy, u.dyc.data());
        u.Scores(n);
        // gm = (dy v^T) o W
        Gemm(n, n, V, u.dyc.data(), V, u.vt.data(), LC, gm.data(), LC, false);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) gm[i * LC + j] *= u.w[i * LC + j];
        Gemm(n, F, n, gm.data(), LC, u.kc.data(), F, dqc.data(), F, false);
        if (i0) u.AddCarried(i0, n, F, V, u.dyc.data(), st.data(), dqc.data());
        Spread(n, F, dqc.data(), dphi_q + u.QRow(i0, h, F), ldq);
        Transpose(n, n, gm.data(), LC, tr.data(), LC);
        Gemm(n, F, n, tr.data(), LC, u.qc.data(), F, dkc.data(), F, r > 0);
        Transpose(n, n, u.p.data(), LC, tr.data(), LC);
        Gemm(n, V, n, tr.data(), LC, u.dyc.data(), V, dvc.data(), V, r > 0);
      }
      Spread(n, F, dkc.data(), dphi_k + u.KRow(i0, F), ldk);
      Spread(n, V, dvc.data(), dv + u.KRow(i0, V), ldv);
      const float decay = i0 ? std::exp(before - last) : 0.0f;
      for (float& x : st) x *= decay;
      ScaleColumns(V, n, u.vt.data(), u.shift.data() + i0, last, vw.data());
      Gemm(V, F, n, vw.data(), LC, u.kc.data(), F, st.data(), F, true);
    }
    // Backward through the chunks: the later queries' part of d phi_k, dv.
    const int last_start = (s.T - 1) / LC * LC;
    for (int i0 = last_start; i0 >= 0; i0 -= LC) {
      const int n = std::min(LC, s.T - i0);
      const float before = u.Before(i0), last = u.top[i0 + n - 1];
      if (i0 != last_start) {  // ds holds the later chunks, scaled to last
        u.Keys(phi_k, v, i0, n);
        Transpose(F, V, ds.data(), V, dst.data(), F);
        Gemm(n, F, V, u.vc.data(), V, dst.data(), F, dkc.data(), F, false);
        Gemm(n, V, F, u.kc.data(), F, ds.data(), V, dvc.data(), V, false);
        float *dkb = dphi_k + u.KRow(i0, F), *dvb = dv + u.KRow(i0, V);
        for (int j = 0; j < n; ++j) {
          const float c = std::exp(u.shift[i0 + j] - last);
          for (int d = 0; d < F; ++d) dkb[j * ldk + d] += c * dkc[j * F + d];
          for (int d = 0; d < V; ++d) dvb[j * ldv + d] += c * dvc[j * V + d];
        }
      }
      if (!i0) break;
      // ds <- ds exp(before - last) + sum_i exp(before - M_i) phi_q_i dy_i^T
      const float decay = std::exp(before - last);
      for (float& x : ds) x *= decay;
      for (int r = 0; r < R; ++r) {
        const int h = u.g * R + r;
        Panels(n, F, LC, phi_q + u.QRow(i0, h, F), ldq, qt.data(), 1.0f);
        for (int i = 0; i < n; ++i) negtop[i] = -u.top[i0 + i];
        ScaleColumns(F, n, qt.data(), negtop, -before, qt.data());
        Compact(n, V, dy + u.QRow(i0, h, V), ldy, u.dyc.data());
        Gemm(F, V, n, qt.data(), LC, u.dyc.data(), V, ds.data(), V, true);
      }
    }
  });
}

ffi::Error ShapeOf(F32& q, F32& k, Shape* s) {
  auto dq = q.dimensions(), dk = k.dimensions();
  if (dq.size() != 4 || dk.size() != 4)
    return ffi::Error::InvalidArgument("q, k must be [B, T, heads, D]");
  *s = Shape{int(dq[0]), int(dq[1]), int(dq[2]), int(dk[2]), int(dq[3])};
  if (dk[0] != s->B || dk[1] != s->T || dk[3] != s->D || s->H % s->G ||
      s->T % W || s->D % W)
    return ffi::Error::InvalidArgument(
        "need k [B, T, G, D] with G dividing H, T and D multiples of 16");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(F32 q, F32 k, F32 v, F32Result out, F32Result lse,
                       bool causal, int64_t valid, float scale) {
  Shape s;
  if (ffi::Error e = ShapeOf(q, k, &s); e.failure()) return e;
  Forward(s, q.typed_data(), k.typed_data(), v.typed_data(),
          out->typed_data(), lse->typed_data(), causal, int(valid), scale);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(F32 q, F32 k, F32 v, F32 out, F32 lse, F32 dout,
                        F32Result dq, F32Result dk, F32Result dv, bool causal,
                        int64_t valid, float scale) {
  Shape s;
  if (ffi::Error e = ShapeOf(q, k, &s); e.failure()) return e;
  Backward(s, q.typed_data(), k.typed_data(), v.typed_data(),
           out.typed_data(), lse.typed_data(), dout.typed_data(),
           dq->typed_data(), dk->typed_data(), dv->typed_data(), causal,
           int(valid), scale);
  return ffi::Error::Success();
}

ffi::Error LinearShapeOf(F32& phi_q, F32& phi_k, F32& shift, F32& v,
                         LinearShape* s) {
  auto q = phi_q.dimensions(), k = phi_k.dimensions(),
       sh = shift.dimensions(), dv = v.dimensions();
  if (q.size() != 4 || k.size() != 4 || sh.size() != 3 || dv.size() != 4)
    return ffi::Error::InvalidArgument(
        "need phi_q [B, T, H, F], phi_k [B, T, G, F], shift [B, T, G], "
        "v [B, T, G, V]");
  *s = LinearShape{int(q[0]), int(q[1]), int(q[2]), int(k[2]), int(q[3]),
                   int(dv[3])};
  if (k[0] != s->B || k[1] != s->T || k[3] != s->F || sh[0] != s->B ||
      sh[1] != s->T || sh[2] != s->G || dv[0] != s->B || dv[1] != s->T ||
      dv[2] != s->G || s->H % s->G || s->T % W || s->F % W || s->V % W)
    return ffi::Error::InvalidArgument(
        "phi_k, shift, v must match phi_q's batch and length and share G "
        "dividing H; T, F, V multiples of 16");
  return ffi::Error::Success();
}

ffi::Error LinearForwardImpl(F32 phi_q, F32 phi_k, F32 shift, F32 v,
                             F32Result y) {
  LinearShape s;
  if (ffi::Error e = LinearShapeOf(phi_q, phi_k, shift, v, &s); e.failure())
    return e;
  LinearForward(s, phi_q.typed_data(), phi_k.typed_data(),
                shift.typed_data(), v.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error LinearBackwardImpl(F32 phi_q, F32 phi_k, F32 shift, F32 v, F32 dy,
                              F32Result dphi_q, F32Result dphi_k,
                              F32Result dv) {
  LinearShape s;
  if (ffi::Error e = LinearShapeOf(phi_q, phi_k, shift, v, &s); e.failure())
    return e;
  LinearBackward(s, phi_q.typed_data(), phi_k.typed_data(),
                 shift.typed_data(), v.typed_data(), dy.typed_data(),
                 dphi_q->typed_data(), dphi_k->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("valid")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("valid")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooLinearForward, LinearForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooLinearBackward, LinearBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
