// dist_gc fused CPU kernels: channel sums and mean subtraction for every tensor of a
// step in one call (see dist_gc/kernels/__init__.py for the contract, table.py for the
// canonical (k0, a1, k2, a3) view). Plain C ABI, no torch headers: the build takes
// seconds, and the library is loaded with ctypes.
//
// Numerics: elements are read in their dtype and converted to fp32; each contiguous
// run is summed in fp32 SIMD lanes over blocks of at most BLOCK elements, block totals
// in fp64; means are rounded once to fp32; x - mean is computed in fp32 and rounded once
// to the dtype (bf16: round-to-nearest-even, NaN -> 0x7FC0, as c10::BFloat16; fp16:
// the compiler's _Float16 conversion, also round-to-nearest-even).
//
// Determinism: every sum is computed by one thread in a fixed order, or from fixed-size
// chunks combined in index order, so the result does not depend on the thread count
// (DDP replicas centralize identical gradients and must stay bit-identical).
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <type_traits>
#include <omp.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 2048;       // fp32 lanes per block before an fp64 add
constexpr int64_t SMALL = 1 << 16;    // items up to this many elements: one thread each
constexpr int64_t CHUNK = 1 << 16;    // fixed chunk of a long run summed by one task
constexpr int64_t MANY_LINES = 64;    // a1 == 1 items with this many lines: one task per line
constexpr int64_t MANY_CHANNELS = 64; // a1 > 1 items with this many channels: tasks own channel blocks

enum : int64_t { F32 = 0, BF16 = 1, F16 = 2 };
enum : int64_t { FINAL = 1, EXCLUSIVE = 2 };
constexpr int COLS = 9;  // ptr, dtype, k0, a1, k2, a3, sum_start, flags, count

inline float ld(const float* p) { return *p; }
inline float ld(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
#if defined(__F16C__)
// x86: the F16C conversions (vcvtph2ps / vcvtps2ph, round-to-nearest-even), 8 lanes
// at a time in the runs below; GCC does not vectorize _Float16 conversions by itself.
struct Half { uint16_t bits; };
inline float ld(const Half* p) { return _cvtsh_ss(p->bits); }
inline void st(Half* p, float v) { p->bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
#else
using Half = _Float16;
inline float ld(const Half* p) { return float(*p); }
inline void st(Half* p, float v) { *p = Half(v); }
#endif
inline void st(float* p, float v) { *p = v; }
inline void st(uint16_t* p, float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *p = 0x7FC0; return; }
  *p = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <class T> double sum_run(const T* x, int64_t n) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t e = std::min(n, b + BLOCK);
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) acc += ld(x + i);
    total += acc;
  }
  return total;
}

template <class T> void sub_run(T* x, int64_t n, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) st(x + i, ld(x + i) - m);
}

#if defined(__F16C__)
template <> double sum_run<Half>(const Half* x, int64_t n) {
  const uint16_t* h = &x->bits;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t e = std::min(n, b + BLOCK);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = b;
    for (; i + 8 <= e; i += 8) acc = _mm256_add_ps(acc, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float a = 0.f;
    for (float l : lanes) a += l;
    for (; i < e; ++i) a += _cvtsh_ss(h[i]);
    total += a;
  }
  return total;
}

template <> void sub_run<Half>(Half* x, int64_t n, float m) {
  uint16_t* h = &x->bits;
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))), mv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) h[i] = _cvtss_sh(_cvtsh_ss(h[i]) - m, _MM_FROUND_TO_NEAREST_INT);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// x86 with AVX512-BF16: 16 lanes per instruction; vcvtneps2bf16 rounds to nearest even
// like c10::BFloat16 (a NaN stays a quiet NaN).
inline __m512 ld16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Four independent accumulators: one add chain would be bound by the add latency
// (4 cycles), not by the cache's bandwidth.
template <class L, class S> double sum_run4(int64_t n, L load16, S scalar) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t e = std::min(n, b + BLOCK);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = b;
    for (; i + 64 <= e; i += 64) {
      a0 = _mm512_add_ps(a0, load16(i));
      a1 = _mm512_add_ps(a1, load16(i + 16));
      a2 = _mm512_add_ps(a2, load16(i + 32));
      a3 = _mm512_add_ps(a3, load16(i + 48));
    }
    for (; i + 16 <= e; i += 16) a0 = _mm512_add_ps(a0, load16(i));
    float a = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < e; ++i) a += scalar(i);
    total += a;
  }
  return total;
}

template <> double sum_run<uint16_t>(const uint16_t* x, int64_t n) {
  return sum_run4(n, [x](int64_t i) { return ld16(x + i); }, [x](int64_t i) { return ld(x + i); });
}

template <> double sum_run<float>(const float* x, int64_t n) {
  return sum_run4(n, [x](int64_t i) { return _mm512_loadu_ps(x + i); }, [x](int64_t i) { return x[i]; });
}

template <> void sub_run<uint16_t>(uint16_t* x, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_sub_ps(ld16(x + i), mv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), reinterpret_cast<const __m256i&>(r));
  }
  for (; i < n; ++i) st(x + i, ld(x + i) - m);
}
#endif

struct Item {
  void* ptr; int64_t dtype, k0, a1, k2, a3, sum_start, flags, count;
  int64_t numel() const { return k0 * a1 * k2 * a3; }
  int64_t slots() const { return k0 * k2; }
};

inline Item row(const int64_t* t) {
  return Item{reinterpret_cast<void*>(t[0]), t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]};
}

// acc[c - c_lo] += sum of channel (i0, c)'s elements in rows j1 in [j_lo, j_hi), for
// the channels c in [c_lo, c_hi) of block i0.
template <class T> void sum_part(const T* x, const Item& it, int64_t i0, int64_t j_lo, int64_t j_hi, int64_t c_lo, int64_t c_hi, double* acc) {
  for (int64_t j = j_lo; j < j_hi; ++j) {
    const T* rowp = x + (i0 * it.a1 + j) * it.k2 * it.a3;
    if (it.a3 == 1) {
      const T* p = rowp + c_lo;
      const int64_t n = c_hi - c_lo;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] += ld(p + c);
    } else {
      for (int64_t c = c_lo; c < c_hi; ++c) acc[c - c_lo] += sum_run(rowp + c * it.a3, it.a3);
    }
  }
}

// x -= m over rows j1 in [j_lo, j_hi) of block i0 (all channels).
template <class T> void sub_rows(T* x, const Item& it, int64_t i0, int64_t j_lo, int64_t j_hi, const float* m) {
  const float* mi = m + i0 * it.k2;
  for (int64_t j = j_lo; j < j_hi; ++j) {
    T* rowp = x + (i0 * it.a1 + j) * it.k2 * it.a3;
    if (it.a3 == 1) {
#pragma omp simd
      for (int64_t c = 0; c < it.k2; ++c) st(rowp + c, ld(rowp + c) - mi[c]);
    } else {
      for (int64_t c = 0; c < it.k2; ++c) sub_run(rowp + c * it.a3, it.a3, mi[c]);
    }
  }
}

// Sums of a whole item by this thread. With fused (a final item) the means are written
// to out and subtracted; otherwise the sums are added to out. Lines of a1 == 1 items are
// subtracted right after they are summed, while still in cache.
template <class T> void item_serial(const Item& it, float* out, bool fused, std::vector<double>& acc) {
  T* x = static_cast<T*>(it.ptr);
  const int64_t S = it.slots();
  if (fused && it.a1 == 1) {
    for (int64_t s = 0; s < S; ++s) {
      T* line = x + s * it.a3;
      const float m = float(sum_run(line, it.a3) / double(it.count));
      out[s] = m;
      sub_run(line, it.a3, m);
    }
    return;
  }
  acc.assign(S, 0.0);
  for (int64_t i0 = 0; i0 < it.k0; ++i0) sum_part(x, it, i0, 0, it.a1, 0, it.k2, acc.data() + i0 * it.k2);
  if (!fused) {
    for (int64_t s = 0; s < S; ++s) out[s] += float(acc[s]);
    return;
  }
  for (int64_t s = 0; s < S; ++s) out[s] = float(acc[s] / double(it.count));
  for (int64_t i0 = 0; i0 < it.k0; ++i0) sub_rows(x, it, i0, 0, it.a1, out);
}

// The same with the threads of the enclosing parallel region sharing one large item.
// Called by every thread of the region (contains worksharing loops and barriers).
template <class T> void item_parallel(const Item& it, float* out, bool fused, std::vector<double>& shared, int nthreads) {
  T* x = static_cast<T*>(it.ptr);
  const int64_t S = it.slots();
  // (Which path sums an item depends on its shape only, never on the thread count: the
  // paths add in different orders, and replicas with different thread counts must agree.)
  if (it.a1 == 1 && S >= MANY_LINES) {
    // many lines: each line summed (and, fused, subtracted) by one thread
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s) {
      T* line = x + s * it.a3;
      const double total = sum_run(line, it.a3);
      if (fused) {
        const float m = float(total / double(it.count));
        out[s] = m;
        sub_run(line, it.a3, m);
      } else {
        out[s] += float(total);
      }
    }
    return;
  }
  if (it.a1 == 1) {
    // few long lines (mode="tensor"): fixed chunks summed in parallel, combined in order.
    // Each thread takes one contiguous range of chunks for both passes and subtracts it
    // backwards, so the chunks it summed last are still in its cache.
    const int64_t per = (it.a3 + CHUNK - 1) / CHUNK, total_chunks = S * per;
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t lo = total_chunks * tid / nt, hi = total_chunks * (tid + 1) / nt;
#pragma omp single
    shared.assign(total_chunks, 0.0);
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t s = k / per, b = (k % per) * CHUNK;
      shared[k] = sum_run(x + s * it.a3 + b, std::min(CHUNK, it.a3 - b));
    }
#pragma omp barrier
#pragma omp single
    for (int64_t s = 0; s < S; ++s) {
      double total = 0.0;
      for (int64_t k = 0; k < per; ++k) total += shared[s * per + k];
      if (fused) out[s] = float(total / double(it.count)); else out[s] += float(total);
    }
    if (fused) {
      for (int64_t k = hi - 1; k >= lo; --k) {
        const int64_t s = k / per, b = (k % per) * CHUNK;
        sub_run(x + s * it.a3 + b, std::min(CHUNK, it.a3 - b), out[s]);
      }
#pragma omp barrier
    }
    return;
  }
  // a1 > 1: a channel's elements recur every k2*a3 (strided output dim, blocked
  // geometries).
  if (S >= MANY_CHANNELS) {
    // Many channels: tasks own blocks of channels (disjoint slots) and sum them over
    // every row; a block's run in a row is >= 64 elements where the row allows.
    int64_t nb = std::min(it.k2, std::max<int64_t>(1, (4 * nthreads + it.k0 - 1) / it.k0));
    int64_t width = (it.k2 + nb - 1) / nb;
    width = std::max(width, std::min(it.k2, (64 + it.a3 - 1) / it.a3));
    nb = (it.k2 + width - 1) / width;
    std::vector<double> acc;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < it.k0 * nb; ++k) {
      const int64_t i0 = k / nb, c_lo = (k % nb) * width, c_hi = std::min(it.k2, c_lo + width);
      acc.assign(c_hi - c_lo, 0.0);
      sum_part(x, it, i0, 0, it.a1, c_lo, c_hi, acc.data());
      float* o = out + i0 * it.k2 + c_lo;
      for (int64_t c = 0; c < c_hi - c_lo; ++c) {
        if (fused) o[c] = float(acc[c] / double(it.count)); else o[c] += float(acc[c]);
      }
    }
  } else {
    // Few channels: rows are cut into fixed chunks, each summed by one task into its
    // own partial vector; the partials are combined in chunk order.
    const int64_t rows_per = std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, it.k2 * it.a3));
    const int64_t per = (it.a1 + rows_per - 1) / rows_per;
#pragma omp single
    shared.assign(it.k0 * per * it.k2, 0.0);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < it.k0 * per; ++k) {
      const int64_t i0 = k / per, j_lo = (k % per) * rows_per, j_hi = std::min(it.a1, j_lo + rows_per);
      sum_part(x, it, i0, j_lo, j_hi, 0, it.k2, shared.data() + k * it.k2);
    }
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i0 = s / it.k2, c = s % it.k2;
      double total = 0.0;
      for (int64_t p = 0; p < per; ++p) total += shared[(i0 * per + p) * it.k2 + c];
      if (fused) out[s] = float(total / double(it.count)); else out[s] += float(total);
    }
  }
  if (fused) {
    const int64_t rows_per = std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, it.k2 * it.a3));
    const int64_t per = (it.a1 + rows_per - 1) / rows_per;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < it.k0 * per; ++k) {
      const int64_t i0 = k / per, j_lo = (k % per) * rows_per, j_hi = std::min(it.a1, j_lo + rows_per);
      sub_rows(x, it, i0, j_lo, j_hi, out);
    }
  }
}

template <class F> void dispatch(int64_t dtype, F&& f) {
  if (dtype == F32) f(static_cast<float*>(nullptr));
  else if (dtype == BF16) f(static_cast<uint16_t*>(nullptr));
  else f(static_cast<Half*>(nullptr));
}

// x -= means over elements [lo, hi) of one item's flattening.
template <class T> void sub_range(const Item& it, const float* m, int64_t lo, int64_t hi) {
  T* x = static_cast<T*>(it.ptr);
  int64_t pos = lo;
  if (it.a3 == 1) {  // rows of k2 channels, one mean per element of a row
    while (pos < hi) {
      const int64_t r = pos / it.k2, c = pos % it.k2, n = std::min(it.k2 - c, hi - pos);
      const float* mi = m + (r / it.a1) * it.k2 + c;
      T* p = x + pos;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) st(p + j, ld(p + j) - mi[j]);
      pos += n;
    }
    return;
  }
  while (pos < hi) {  // lines of a3 elements sharing one mean
    const int64_t line = pos / it.a3, n = std::min(it.a3 - pos % it.a3, hi - pos);
    sub_run(x + pos, n, m[(line / (it.a1 * it.k2)) * it.k2 + line % it.k2]);
    pos += n;
  }
}

}  // namespace

extern "C" {

// Channel sums (fuse: and the whole GC of final items) for n table rows; see
// dist_gc/kernels/__init__.py. Returns 0.
int dist_gc_accumulate(const int64_t* table, int64_t n, float* sums, int fuse, int nthreads) {
  std::vector<Item> small, large;
  for (int64_t i = 0; i < n; ++i) {
    Item it = row(table + i * COLS);
    if (it.numel() == 0) continue;
    ((it.flags & EXCLUSIVE) && it.numel() <= SMALL ? small : large).push_back(it);
  }
  std::vector<double> shared;
  nthreads = std::max(1, nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<double> acc;
    // small exclusive items: disjoint slots, one thread each
#pragma omp for schedule(dynamic, 4)
    for (size_t i = 0; i < small.size(); ++i) {
      const Item& it = small[i];
      dispatch(it.dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        item_serial<T>(it, sums + it.sum_start, fuse && (it.flags & FINAL), acc);
      });
    }
    // the rest one after another (non-exclusive ones share slots), threads sharing each
    for (const Item& it : large) {
      dispatch(it.dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        item_parallel<T>(it, sums + it.sum_start, fuse && (it.flags & FINAL), shared, nthreads);
      });
#pragma omp barrier
    }
  }
  return 0;
}

// x -= means[sum_start + i0*k2 + i2] for n table rows. Returns 0.
int dist_gc_subtract(const int64_t* table, int64_t n, const float* means, int nthreads) {
  // work units of at most CHUNK elements: (item, [lo, hi) of its flattening)
  struct Unit { int64_t item, lo, hi; };
  std::vector<Item> items;
  std::vector<Unit> units;
  for (int64_t i = 0; i < n; ++i) {
    Item it = row(table + i * COLS);
    const int64_t numel = it.numel();
    for (int64_t lo = 0; lo < numel; lo += CHUNK) units.push_back(Unit{int64_t(items.size()), lo, std::min(numel, lo + CHUNK)});
    items.push_back(it);
  }
  nthreads = std::max(1, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (size_t u = 0; u < units.size(); ++u) {
    const Item& it = items[units[u].item];
    dispatch(it.dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      sub_range<T>(it, means + it.sum_start, units[u].lo, units[u].hi);
    });
  }
  return 0;
}

}  // extern "C"
