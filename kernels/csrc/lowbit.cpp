// Low-bit weight x 8-bit activation kernels on bit-plane packed weights.
//
// Packed layout (one layout for every weight width b = 1..7, and b = 8 as bytes in the same tensor shape):
//   A weight row of K values is stored as unsigned indices q in [0, 2^b), zero-padded to Kpad = 64 * nblk.
//   planes[g][n][j][p] (uint64) holds bit p of the 64 indices q[g][n][64j .. 64j+63]; bit i of the word is
//   element 64j+i. So a row costs exactly b bits per weight (plus the padding of K to 64).
//   The integer weight is w = alpha * q - off: uniform codes (alpha 1, off 2^(b-1)-1) and binary
//   sign codes (b = 1: alpha 2, off 1, i.e. w in {-1, +1}).
//   b = 8 is plain bytes instead: the 8 words of a block hold its 64 indices as bytes (element i in byte i, little
//   endian), each stored as q ^ 0x80 = int8(q - 128), so an int8 dot product reads them directly. Same tensor
//   shape [.., nblk, 8] and size, so every caller sees one layout.
// Activations arrive as uint8 codes a with a zero point zp (affine per-tensor quantization), so
//   sum_k w_k (a_k - zp) = alpha * sum_p 2^p S_p  - alpha * zp * sum_k q_k  - off * sum_k a_k  + K * off * zp
// where S_p = sum of a_k over the k whose index has bit p set. S_p is a masked byte sum: the plane word is
// the mask. AVX-512BW uses it directly as a k-mask; AVX2 expands it to a byte mask; the scalar reference
// walks the bits. The AVX-512 VNNI path (below, "avx512vnni") turns each block's planes back into 64 index bytes
// with one byte permute and one GF2P8AFFINEQB bit transpose, whatever b, and multiplies them with vpdpbusd.
// All paths compute the same integers, so tests compare them exactly.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <memory>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

namespace {

using PlaneSum = int64_t (*)(const uint8_t* a, const uint64_t* planes, int64_t nblk, int64_t bits);

// sum_p 2^p * S_p over one activation row and one packed weight row.
int64_t plane_sum_scalar(const uint8_t* a, const uint64_t* planes, int64_t nblk, int64_t bits) {
  int64_t total = 0;
  if (bits == 8) {  // plain bytes
    const uint8_t* q = reinterpret_cast<const uint8_t*>(planes);
    for (int64_t k = 0; k < nblk * 64; ++k) total += static_cast<int64_t>(a[k]) * (q[k] ^ 0x80);
    return total;
  }
  for (int64_t j = 0; j < nblk; ++j) {
    const uint8_t* blk = a + 64 * j;
    for (int64_t p = 0; p < bits; ++p) {
      uint64_t w = planes[j * bits + p];
      int64_t s = 0;
      for (int i = 0; i < 64; ++i)
        if ((w >> i) & 1) s += blk[i];
      total += s << p;
    }
  }
  return total;
}

__attribute__((target("avx2"))) inline __m256i expand_mask32(uint32_t m) {
  // Byte i of the result is 0xFF when bit i of m is set: broadcast the 4 mask bytes to their 8-byte lanes,
  // then test each byte against its own bit.
  const __m256i shuffle = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(m)), shuffle);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

// sum a_k * q_k over b = 8 byte-stored indices (q = byte ^ 0x80): both widened to int16, vpmaddwd into int32.
__attribute__((target("avx2"))) int64_t byte_dot_avx2(const uint8_t* a, const uint64_t* planes, int64_t nblk) {
  const uint8_t* q = reinterpret_cast<const uint8_t*>(planes);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  __m256i acc = _mm256_setzero_si256();
  for (int64_t k = 0; k < nblk * 64; k += 16) {
    const __m256i av = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k)));
    const __m256i qv = _mm256_cvtepu8_epi16(
        _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)), flip));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, qv));  // < 2^31: 2 * 255 * 255 * nblk * 4 per lane
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int64_t total = 0;
  for (int i = 0; i < 8; ++i) total += lanes[i];
  return total;
}

__attribute__((target("avx2"))) int64_t plane_sum_avx2(const uint8_t* a, const uint64_t* planes, int64_t nblk,
                                                       int64_t bits) {
  if (bits == 8) return byte_dot_avx2(a, planes, nblk);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[8];
  for (int p = 0; p < 8; ++p) acc[p] = zero;
  for (int64_t j = 0; j < nblk; ++j) {
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 64 * j));
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 64 * j + 32));
    for (int64_t p = 0; p < bits; ++p) {
      uint64_t w = planes[j * bits + p];
      __m256i s = _mm256_add_epi64(
          _mm256_sad_epu8(_mm256_and_si256(lo, expand_mask32(static_cast<uint32_t>(w))), zero),
          _mm256_sad_epu8(_mm256_and_si256(hi, expand_mask32(static_cast<uint32_t>(w >> 32))), zero));
      acc[p] = _mm256_add_epi64(acc[p], s);
    }
  }
  int64_t total = 0;
  for (int64_t p = 0; p < bits; ++p) {
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[p]);
    total += (lanes[0] + lanes[1] + lanes[2] + lanes[3]) << p;
  }
  return total;
}

__attribute__((target("avx512f,avx512bw"))) int64_t plane_sum_avx512(const uint8_t* a, const uint64_t* planes,
                                                                      int64_t nblk, int64_t bits) {
  if (bits == 8) return byte_dot_avx2(a, planes, nblk);
  const __m512i zero = _mm512_setzero_si512();
  __m512i acc[8];
  for (int p = 0; p < 8; ++p) acc[p] = zero;
  for (int64_t j = 0; j < nblk; ++j) {
    __m512i v = _mm512_loadu_si512(a + 64 * j);
    for (int64_t p = 0; p < bits; ++p)  // the plane word is the byte mask
      acc[p] = _mm512_add_epi64(acc[p], _mm512_sad_epu8(_mm512_maskz_mov_epi8(planes[j * bits + p], v), zero));
  }
  int64_t total = 0;
  for (int64_t p = 0; p < bits; ++p) total += _mm512_reduce_add_epi64(acc[p]) << p;
  return total;
}

// The ISAs this CPU can run, narrowest first; avx512vnni needs everything its kernels use.
std::vector<std::string> cpu_isas() {
  __builtin_cpu_init();
  std::vector<std::string> out{"scalar"};
  if (__builtin_cpu_supports("avx2")) out.push_back("avx2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    out.push_back("avx512");
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
        __builtin_cpu_supports("gfni"))
      out.push_back("avx512vnni");
  }
  return out;
}

bool cpu_runs(const std::string& isa) {
  const auto ok = cpu_isas();
  return std::find(ok.begin(), ok.end(), isa) != ok.end();
}

std::string& active_isa() {
  static std::string isa = [] {
    const char* forced = std::getenv("BITSEARCH_KERNEL_ISA");
    if (!forced || !*forced) return cpu_isas().back();
    const std::string want(forced);
    TORCH_CHECK(cpu_runs(want), "BITSEARCH_KERNEL_ISA=", want, ": this CPU cannot run those kernels");
    return want;
  }();
  return isa;
}

PlaneSum kernel_for(const std::string& isa) {
  if (isa == "avx512" || isa == "avx512vnni") return plane_sum_avx512;  // avx512vnni's GEMV is lowbit_gemv_vnni
  if (isa == "avx2") return plane_sum_avx2;
  if (isa == "scalar") return plane_sum_scalar;
  TORCH_CHECK(false, "unknown kernel ISA '", isa, "' (expected scalar, avx2, avx512 or avx512vnni)");
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi,gfni")))

// Bit planes -> the block's 64 indices as bytes, for b < 8, in three instructions whatever b:
//   a masked load of the block's b plane words (qword p = plane p);
//   a byte permute that puts, in each qword lane t, byte t of plane p at byte 7-p (zero for p >= b);
//   GF2P8AFFINEQB with that qword as the 8x8 bit matrix A and the unit bytes x_j = 1 << j: bit i of result
//   byte j is bit j of A.byte[7-i] = bit (8t + j) of plane i, i.e. result byte j of lane t is index 8t + j.
struct PlaneGather {
  __m512i perm;
  __mmask64 keep;
  __mmask8 words;
};

PlaneGather plane_gather(int64_t bits) {
  alignas(64) uint8_t idx[64];
  uint64_t keep = 0;
  for (int t = 0; t < 8; ++t)
    for (int p = 0; p < 8; ++p) {
      const int dst = 8 * t + 7 - p;
      idx[dst] = p < bits ? static_cast<uint8_t>(8 * p + t) : 0;
      if (p < bits) keep |= uint64_t{1} << dst;
    }
  PlaneGather g;
  std::memcpy(&g.perm, idx, 64);
  g.keep = keep;
  g.words = static_cast<__mmask8>((1u << bits) - 1);
  return g;
}

VNNI_TARGET inline __m512i block_indices(const uint64_t* words, const PlaneGather& g) {
  const __m512i unit = _mm512_set1_epi64(0x8040201008040201LL);
  const __m512i v = _mm512_maskz_loadu_epi64(g.words, words);
  return _mm512_gf2p8affine_epi64_epi8(unit, _mm512_maskz_permutexvar_epi8(g.keep, g.perm, v), 0);
}

// The four horizontal sums of a, b, c, d as one vector [sum a, sum b, sum c, sum d].
VNNI_TARGET inline __m128i hsum4_vnni(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// acc += u8 x s8 dot products, in place. GCC's _mm512_dpbusd_epi32 copies the accumulator around each use
// (and spills the copies) in a kernel this size, which halves its speed; the asm statement keeps it in one
// register.
VNNI_TARGET inline void dpbusd_inplace(__m512i& acc, __m512i a_u8, __m512i b_s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a_u8), "v"(b_s8));
}

// The 64 stored values of one block as bytes. One plane is cheapest as a masked byte move (the plane word is
// the mask; for two planes the second masked add already costs more than the permute + transpose on Zen 4);
// b = 8 is stored as bytes.
template <int BITS>
VNNI_TARGET inline __m512i block_bytes(const uint64_t* words, const PlaneGather& g) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(words);
  } else if constexpr (BITS == 1) {
    return _mm512_maskz_mov_epi8(words[0], _mm512_set1_epi8(1));
  } else {
    return block_indices(words, g);
  }
}

// dots[i][r] = sum_k a_i[k] * stored_r[k] for MR activation rows (stride kpad) and NR consecutive weight rows:
// stored = the index for b < 8, the byte int8(q - 128) for b = 8 (the caller adds 128 * sum a back).
// Each block's indices are rebuilt once and reused for the MR activation rows. BITS 0: any b in 2..7.
template <int BITS, int MR, int NR>
VNNI_TARGET void gemv_tile_vnni(const uint8_t* a, int64_t kpad, const uint64_t* w, int64_t nblk, int64_t bits,
                                const PlaneGather& g, int64_t (*dots)[4]) {
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_si512();
  const int64_t row_words = nblk * bits;
  for (int64_t j = 0; j < nblk; ++j) {
    __m512i av[MR];
    for (int i = 0; i < MR; ++i) av[i] = _mm512_loadu_si512(a + i * kpad + 64 * j);
    for (int r = 0; r < NR; ++r) {
      // Four rows are four streams: prefetch ahead in each (the hardware prefetcher alone falls behind on
      // weights that come from L3).
      _mm_prefetch(reinterpret_cast<const char*>(w + r * row_words + (j + 8) * bits), _MM_HINT_T0);
      const __m512i q = block_bytes<BITS>(w + r * row_words + j * bits, g);
      for (int i = 0; i < MR; ++i) dpbusd_inplace(acc[i][r], av[i], q);
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) int32_t sums[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(sums), hsum4_vnni(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    for (int r = 0; r < NR; ++r) dots[i][r] = sums[r];
  }
}

// One activation row against one weight row, read as one sequential stream (the prefetcher's best case when
// the weights come from L3 or DRAM); four accumulators hide vpdpbusd's latency.
template <int BITS>
VNNI_TARGET int64_t gemv_row_vnni(const uint8_t* a, const uint64_t* w, int64_t nblk, int64_t bits,
                                  const PlaneGather& g) {
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                    _mm512_setzero_si512()};
  int64_t j = 0;
  for (; j + 4 <= nblk; j += 4)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u)
      dpbusd_inplace(acc[u], _mm512_loadu_si512(a + 64 * (j + u)), block_bytes<BITS>(w + (j + u) * bits, g));
  for (; j < nblk; ++j) dpbusd_inplace(acc[0], _mm512_loadu_si512(a + 64 * j), block_bytes<BITS>(w + j * bits, g));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3])));
}

using GemvRow = int64_t (*)(const uint8_t*, const uint64_t*, int64_t, int64_t, const PlaneGather&);

GemvRow gemv_row_for(int64_t bits) {
  switch (bits) {
    case 1: return gemv_row_vnni<1>;
    case 8: return gemv_row_vnni<8>;
    default: return gemv_row_vnni<0>;
  }
}

using GemvTile = void (*)(const uint8_t*, int64_t, const uint64_t*, int64_t, int64_t, const PlaneGather&,
                          int64_t (*)[4]);

template <int BITS, int MR>
GemvTile gemv_tile_for(int64_t nr) {
  switch (nr) {
    case 1: return gemv_tile_vnni<BITS, MR, 1>;
    case 2: return gemv_tile_vnni<BITS, MR, 2>;
    case 3: return gemv_tile_vnni<BITS, MR, 3>;
    default: return gemv_tile_vnni<BITS, MR, 4>;
  }
}

template <int BITS>
GemvTile gemv_tile_for(int64_t mr, int64_t nr) {
  switch (mr) {
    case 1: return gemv_tile_for<BITS, 1>(nr);
    case 2: return gemv_tile_for<BITS, 2>(nr);
    case 3: return gemv_tile_for<BITS, 3>(nr);
    default: return gemv_tile_for<BITS, 4>(nr);
  }
}

GemvTile gemv_tile_for(int64_t bits, int64_t mr, int64_t nr) {
  switch (bits) {
    case 1: return gemv_tile_for<1>(mr, nr);
    case 8: return gemv_tile_for<8>(mr, nr);
    default: return gemv_tile_for<0>(mr, nr);
  }
}

}  // namespace

std::vector<std::string> supported_isas() { return cpu_isas(); }

std::string get_isa() { return active_isa(); }

void set_isa(const std::string& isa) {
  kernel_for(isa);
  TORCH_CHECK(cpu_runs(isa), "this CPU cannot run the '", isa, "' kernels");
  active_isa() = isa;
}

// q: uint8 [G, N, Kpad] indices (Kpad a multiple of 64) -> int64 [G, N, nblk, bits] planes.
torch::Tensor pack_planes(torch::Tensor q, int64_t bits) {
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.dim() == 3 && q.size(2) % 64 == 0, "q must be uint8 [G, N, 64*k]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8");
  q = q.contiguous();
  TORCH_CHECK(q.numel() == 0 || q.max().item<int64_t>() < (bits == 8 ? 255 : 1 << bits),
              "indices must be below 2^bits (254 at most for 8 bits)");
  const int64_t rows = q.size(0) * q.size(1), nblk = q.size(2) / 64;
  auto out = torch::zeros({q.size(0), q.size(1), nblk, bits}, torch::kInt64);
  const uint8_t* src = q.data_ptr<uint8_t>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  if (bits == 8) {  // plain bytes, int8(q - 128)
    uint8_t* bytes = reinterpret_cast<uint8_t*>(dst);
    for (int64_t i = 0; i < rows * nblk * 64; ++i) bytes[i] = src[i] ^ 0x80;
    return out;
  }
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t j = 0; j < nblk; ++j)
        for (int i = 0; i < 64; ++i) {
          uint8_t v = src[(r * nblk + j) * 64 + i];
          for (int64_t p = 0; p < bits; ++p)
            dst[(r * nblk + j) * bits + p] |= static_cast<uint64_t>((v >> p) & 1) << i;
        }
  });
  return out;
}

// The inverse: planes -> uint8 [G, N, Kpad] indices (the GEMM path unpacks tiles with it).
torch::Tensor unpack_planes(torch::Tensor planes) {
  TORCH_CHECK(planes.dtype() == torch::kInt64 && planes.dim() == 4, "planes must be int64 [G, N, nblk, bits]");
  planes = planes.contiguous();
  const int64_t rows = planes.size(0) * planes.size(1), nblk = planes.size(2), bits = planes.size(3);
  auto out = torch::empty({planes.size(0), planes.size(1), nblk * 64}, torch::kUInt8);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  if (bits == 8) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(src);
    for (int64_t i = 0; i < rows * nblk * 64; ++i) dst[i] = bytes[i] ^ 0x80;
    return out;
  }
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t j = 0; j < nblk; ++j)
        for (int i = 0; i < 64; ++i) {
          uint8_t v = 0;
          for (int64_t p = 0; p < bits; ++p) v |= ((src[(r * nblk + j) * bits + p] >> i) & 1) << p;
          dst[(r * nblk + j) * 64 + i] = v;
        }
  });
  return out;
}

// Small-batch path. a: uint8 [G, M, Kpad] activation codes; planes: int64 [G, N, nblk, bits];
// qsum: int64 [G, N] (sum of each row's indices); scale: float [G, N] (weight scale x activation scale);
// bias: float [G, N]. Returns float [G, M, N] = dequantized sum_k w (a - zp) + bias.
torch::Tensor lowbit_gemv(torch::Tensor a, torch::Tensor planes, torch::Tensor qsum, torch::Tensor scale,
                          torch::Tensor bias, int64_t k, int64_t alpha, int64_t off, int64_t zp) {
  TORCH_CHECK(a.dtype() == torch::kUInt8 && a.dim() == 3, "activations must be uint8 [G, M, Kpad]");
  TORCH_CHECK(planes.dtype() == torch::kInt64 && planes.dim() == 4, "planes must be int64 [G, N, nblk, bits]");
  const int64_t G = a.size(0), M = a.size(1), N = planes.size(1), nblk = planes.size(2), bits = planes.size(3);
  TORCH_CHECK(planes.size(0) == G && a.size(2) == nblk * 64, "activation and weight shapes do not match");
  TORCH_CHECK(a.size(2) <= 65536, "rows longer than 65536 are not supported");  // int32 lanes stay exact
  a = a.contiguous();
  planes = planes.contiguous();
  auto qs = qsum.to(torch::kInt64).contiguous();
  auto sc = scale.to(torch::kFloat).contiguous();
  auto bs = bias.to(torch::kFloat).contiguous();
  auto out = torch::empty({G, M, N}, torch::kFloat);
  // Per activation row: sum of codes (for the -off * sum a term).
  auto asum = a.sum(2, /*keepdim=*/false, torch::kInt64).contiguous();
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const uint64_t* pp = reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>());
  const int64_t* qp = qs.data_ptr<int64_t>();
  const int64_t* asp = asum.data_ptr<int64_t>();
  const float* scp = sc.data_ptr<float>();
  const float* bp = bs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // sum_k a_k q_k -> the dequantized output (identical formula on every path).
  auto finish = [&](int64_t g, int64_t m, int64_t n, int64_t dot) {
    const int64_t gn = g * N + n;
    const int64_t acc = alpha * dot - alpha * zp * qp[gn] - off * asp[g * M + m] + k * off * zp;
    op[(g * M + m) * N + n] = static_cast<float>(acc) * scp[gn] + bp[gn];
  };
  if (active_isa() == "avx512vnni") {
    const PlaneGather gather = plane_gather(bits);
    // The VNNI kernels return sum a * stored; b = 8 stores q - 128, so add 128 * sum a back.
    auto finish_stored = [&](int64_t g, int64_t m, int64_t n, int64_t dot) {
      finish(g, m, n, dot + (bits == 8 ? 128 * asp[g * M + m] : 0));
    };
    // One activation row and weights larger than the L2 caches: stream each weight row on its own (one
    // sequential stream per thread keeps the prefetchers ahead; four rows at once are four streams).
    if (M == 1 && G * N * nblk * bits * 8 > (int64_t{2} << 20)) {
      const GemvRow row = gemv_row_for(bits);
      at::parallel_for(0, G * N, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t gn = lo; gn < hi; ++gn) {
          const int64_t g = gn / N, n = gn % N;
          const int64_t dot = row(ap + g * nblk * 64, pp + gn * nblk * bits, nblk, bits, gather);
          finish_stored(g, 0, n, dot);
        }
      });
      return out;
    }
    const int64_t quads = (N + 3) / 4;
    at::parallel_for(0, G * quads, 1, [&](int64_t lo, int64_t hi) {
      int64_t dots[4][4];
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t g = t / quads, n0 = (t % quads) * 4, nr = std::min<int64_t>(4, N - n0);
        const uint64_t* wp = pp + (g * N + n0) * nblk * bits;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const int64_t mr = std::min<int64_t>(4, M - m0);
          gemv_tile_for(bits, mr, nr)(ap + (g * M + m0) * nblk * 64, nblk * 64, wp, nblk, bits, gather, dots);
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t r = 0; r < nr; ++r)
              finish_stored(g, m0 + i, n0 + r, dots[i][r]);
        }
      }
    });
    return out;
  }
  const PlaneSum kernel = kernel_for(active_isa());
  at::parallel_for(0, G * N, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t gn = lo; gn < hi; ++gn) {
      const int64_t g = gn / N, n = gn % N;
      const uint64_t* wp = pp + gn * nblk * bits;
      for (int64_t m = 0; m < M; ++m) finish(g, m, n, kernel(ap + (g * M + m) * nblk * 64, wp, nblk, bits));
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Large-batch path: tiled unpack GEMM.
//
// With many activation rows, reading every plane once per row (the kernel above) costs bits x more than
// unpacking a tile of weight rows once and reusing it for all rows. Each task unpacks NT weight rows of one
// group to integer weights w = alpha*q - off, then multiplies them with a chunk of activation rows.
//
// Activations: uint8 codes [G, M, lda] (lda = Kpad = nblk * 64, the planes' padded row length; the VNNI GEMM
// also takes K rounded up to 4); conv padding holds the zero point (the code of 0.0), the K padding holds 0.
// With wsum[n] = sum_{k<K} w = alpha*qsum - off*K:
//   sum_k w_k (a_k - zp) = sum_{k<Kpad} w_k a_k - zp * wsum[n]
// (the K padding has a = 0, so it adds nothing whatever the unpacked padding weights are).
// Integer products, summed exactly in int32 (|w| <= 127, a <= 255: lanes stay below 2^31 for K <= MAX_GEMM_K):
//   scalar     int16 weights, plain loops (the reference);
//   avx2       int16 weights, vpmaddwd on zero-extended codes (vpmaddubsw would saturate at 255 x 127 x 2);
//   avx512     the avx2 GEMM;
//   avx512vnni int8 weight tiles in the layout of int8 GEMM libraries, vpdpbusd (u8 x s8, four products per
//              int32 lane, no saturation) against broadcast activation dwords (below).
// Output: out[m, g*N + n] = float(acc) * scale[g,n] + bias[g,n], [M, G*N]: for a conv (m = b*Ho*Wo + position)
// that is channels-last [B, Ho, Wo, G*N], which the next layer's im2col reads without a transpose.
namespace {

constexpr int64_t NT = 64;             // weight rows unpacked per task
constexpr int64_t MC = 96;             // activation rows per task
constexpr int64_t MAX_GEMM_K = 65536;  // keeps int32 sums exact

struct GemmArgs {
  const uint8_t* a;
  const uint64_t* planes;
  const int64_t* wsum;
  const float* scale;
  const float* bias;
  float* out;
  int64_t G, M, N, nblk, bits, alpha, off, zp, k;
  int64_t lda;  // activation row stride: kpad, or K rounded up to 4 for the VNNI GEMM
  // Implicit conv (VNNI GEMM only): a points at channels-last codes padded with the zero point, [B, Hp, Wp, C];
  // output position m = (b*Ho + oh)*Wo + ow reads dword k4 at a + b*img + oh*hrow + ow*lda + koff[k4].
  const int32_t* koff = nullptr;
  int64_t Ho = 0, Wo = 0, img = 0, hrow = 0;
  int64_t kpad() const { return nblk * 64; }
};

inline float* row_out(const GemmArgs& p, int64_t m) { return p.out + m * p.G * p.N; }

inline void store_result(const GemmArgs& p, float* row, int64_t g, int64_t n, int64_t dot) {
  const int64_t gn = g * p.N + n;
  const int64_t acc = dot - p.zp * p.wsum[gn];
  row[gn] = static_cast<float>(acc) * p.scale[gn] + p.bias[gn];
}

inline const uint64_t* row_planes(const GemmArgs& p, int64_t g, int64_t n) {
  return p.planes + (g * p.N + n) * p.nblk * p.bits;
}

void gemm_task_scalar(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows, int64_t m0, int64_t m1, void* buf) {
  int16_t* w = static_cast<int16_t*>(buf);
  const int64_t kpad = p.kpad();
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* src = row_planes(p, g, n0 + r);
    for (int64_t j = 0; j < p.nblk; ++j)
      for (int i = 0; i < 64; ++i) {
        int64_t q = 0;
        if (p.bits == 8)
          q = reinterpret_cast<const uint8_t*>(src + j * 8)[i] ^ 0x80;
        else
          for (int64_t b = 0; b < p.bits; ++b) q |= ((src[j * p.bits + b] >> i) & 1) << b;
        w[r * kpad + 64 * j + i] = static_cast<int16_t>(p.alpha * q - p.off);
      }
  }
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = p.a + (g * p.M + m) * kpad;
    float* out = row_out(p, m);
    for (int64_t r = 0; r < rows; ++r) {
      int64_t dot = 0;
      for (int64_t k = 0; k < kpad; ++k) dot += static_cast<int64_t>(a[k]) * w[r * kpad + k];
      store_result(p, out, g, n0 + r, dot);
    }
  }
}

__attribute__((target("avx2"))) void unpack_rows_avx2(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows,
                                                      int16_t* w) {
  const int64_t kpad = p.kpad();
  const __m256i alpha = _mm256_set1_epi16(static_cast<int16_t>(p.alpha));
  const __m256i off = _mm256_set1_epi16(static_cast<int16_t>(p.off));
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* src = row_planes(p, g, n0 + r);
    int16_t* dst = w + r * kpad;
    for (int64_t j = 0; j < p.nblk; ++j) {
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      if (p.bits == 8) {
        const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
        lo = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j * 8)), flip);
        hi = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j * 8 + 4)), flip);
      }
      for (int64_t b = 0; b < (p.bits == 8 ? 0 : p.bits); ++b) {
        const uint64_t word = src[j * p.bits + b];
        const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << b));
        lo = _mm256_or_si256(lo, _mm256_and_si256(expand_mask32(static_cast<uint32_t>(word)), bit));
        hi = _mm256_or_si256(hi, _mm256_and_si256(expand_mask32(static_cast<uint32_t>(word >> 32)), bit));
      }
      const __m256i q[4] = {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo)),
                            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1)),
                            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi)),
                            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1))};
      for (int c = 0; c < 4; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * j + 16 * c),
                            _mm256_sub_epi16(_mm256_mullo_epi16(q[c], alpha), off));
    }
  }
}

__attribute__((target("avx2"))) inline int64_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// MR activation rows x NR weight rows over the whole row: MR*NR int32 accumulators stay in registers.
template <int MR, int NR>
__attribute__((target("avx2"))) void micro_avx2(const GemmArgs& p, int64_t g, int64_t m, int64_t n,
                                                const int16_t* w) {
  const int64_t kpad = p.kpad();
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const uint8_t* a = p.a + (g * p.M + m) * kpad;
  for (int64_t k = 0; k < kpad; k += 16) {
    __m256i av[MR];
    for (int i = 0; i < MR; ++i)
      av[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i * kpad + k)));
    for (int j = 0; j < NR; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * kpad + k));
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av[i], wv));
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* out = row_out(p, m + i);
    for (int j = 0; j < NR; ++j) store_result(p, out, g, n + j, hsum_epi32(acc[i][j]));
  }
}

// Runs the MR x NR micro-kernel over a task's rows, with the smaller kernels for the edges.
template <int MR, int NR, template <int, int> class Micro, typename W>
inline void tile_loop(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows, int64_t m0, int64_t m1,
                      const W* w) {
  const int64_t kpad = p.kpad();
  for (int64_t m = m0; m < m1; m += MR) {
    const int64_t mr = std::min<int64_t>(MR, m1 - m);
    for (int64_t r = 0; r < rows; r += NR) {
      const int64_t nr = std::min<int64_t>(NR, rows - r);
      const W* wr = w + r * kpad;
      if (mr == MR && nr == NR) { Micro<MR, NR>::run(p, g, m, n0 + r, wr); continue; }
      for (int64_t i = 0; i < mr; ++i)  // edges: one activation row at a time
        for (int64_t j = 0; j < nr; ++j) Micro<1, 1>::run(p, g, m + i, n0 + r + j, wr + j * kpad);
    }
  }
}

template <int MR, int NR>
struct MicroAvx2 {
  static void run(const GemmArgs& p, int64_t g, int64_t m, int64_t n, const int16_t* w) {
    micro_avx2<MR, NR>(p, g, m, n, w);
  }
};

__attribute__((target("avx2"))) void gemm_task_avx2(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows,
                                                    int64_t m0, int64_t m1, void* buf) {
  int16_t* w = static_cast<int16_t*>(buf);
  unpack_rows_avx2(p, g, n0, rows, w);
  tile_loop<3, 4, MicroAvx2>(p, g, n0, rows, m0, m1, w);
}

// AVX-512 VNNI GEMM, in the layout of int8 GEMM libraries: a weight tile of 16*NZ rows is unpacked as
// [K/4][16*NZ][4] int8 (four consecutive k of one row per int32 lane), and each activation dword (four k of one
// row) is broadcast, so one vpdpbusd adds 4 products for 16 output channels; no horizontal sums, and K is walked
// in steps of 4, not 64. MR activation rows x NZ vectors of 16 channels stay in registers.
// int32 lanes wrap exactly, so only the final sum must fit: |sum w (a - zp)| <= 127 * 255 * K < 2^31.
constexpr int64_t VNNI_MAX_K = MAX_GEMM_K;

// r[i] = 16 dwords of row i -> r[j] = dword j of every row (a 16 x 16 transpose of 32-bit elements).
VNNI_TARGET inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// Unpacks weight rows n0 .. n0+rows-1 (rows <= 16*nz; missing rows are zero) into tile [k4n][16*NZ][4] int8,
// w = alpha*q - off, and the tile's epilogue constants (wsum as int32, scale, bias; zero past the last row).
struct VnniTile {
  int8_t* w;
  int32_t wsum[64];
  float scale[64], bias[64];
};

template <int BITS>
VNNI_TARGET void unpack_tile_vnni(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows, int nz, int64_t k4n,
                                  const PlaneGather& gather, VnniTile& tile) {
  const __m512i off = _mm512_set1_epi8(static_cast<char>(p.off));
  const int64_t width = 16 * nz;
  for (int h = 0; h < nz; ++h) {
    for (int64_t j = 0; j < p.nblk; ++j) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 16 * h + i;
        if (row >= rows) { r[i] = _mm512_setzero_si512(); continue; }
        __m512i q = block_bytes<BITS>(row_planes(p, g, n0 + row) + j * p.bits, gather);
        if constexpr (BITS == 8) q = _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
        if (p.alpha == 2) q = _mm512_add_epi8(q, q);
        r[i] = _mm512_sub_epi8(q, off);  // |w| <= 127: no wrap
      }
      transpose16x16_epi32(r);  // r[t] = k4 = 16j + t for the 16 rows
      for (int t = 0; t < 16 && 16 * j + t < k4n; ++t)
        _mm512_storeu_si512(tile.w + ((16 * j + t) * width + 16 * h) * 4, r[t]);
    }
  }
  for (int64_t i = 0; i < width; ++i) {
    const bool live = i < rows;
    const int64_t gn = g * p.N + n0 + i;
    tile.wsum[i] = live ? static_cast<int32_t>(p.wsum[gn]) : 0;
    tile.scale[i] = live ? p.scale[gn] : 0.0f;
    tile.bias[i] = live ? p.bias[gn] : 0.0f;
  }
}

// The loops over MR and NZ are fully unrolled so the accumulators are registers. IMPLICIT: the rows are MR
// consecutive output positions of one conv output row, read straight from the padded codes (no im2col).
template <int MR, int NZ, bool IMPLICIT>
VNNI_TARGET void micro_vnni(const GemmArgs& p, const uint8_t* a, int64_t k4n, const VnniTile& tile, float* out,
                            int64_t rows) {
  const int64_t lda = p.lda, ldo = p.G * p.N;
  __m512i acc[MR][NZ];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int h = 0; h < NZ; ++h) acc[i][h] = _mm512_setzero_si512();
  const int8_t* w = tile.w;
  for (int64_t k4 = 0; k4 < k4n; ++k4, w += 64 * NZ) {
    __m512i wv[NZ];
#pragma GCC unroll 4
    for (int h = 0; h < NZ; ++h) wv[h] = _mm512_loadu_si512(w + 64 * h);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t quad;
      std::memcpy(&quad, a + i * lda + (IMPLICIT ? p.koff[k4] : 4 * k4), 4);
      const __m512i av = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
      for (int h = 0; h < NZ; ++h) dpbusd_inplace(acc[i][h], av, wv[h]);
    }
  }
  const __m512i zp = _mm512_set1_epi32(static_cast<int32_t>(p.zp));
#pragma GCC unroll 4
  for (int h = 0; h < NZ; ++h) {
    const int64_t live = std::min<int64_t>(16, std::max<int64_t>(0, rows - 16 * h));
    const __mmask16 keep = static_cast<__mmask16>((1u << live) - 1);
    const __m512i wsum = _mm512_loadu_si512(tile.wsum + 16 * h);
    const __m512 scale = _mm512_loadu_ps(tile.scale + 16 * h), bias = _mm512_loadu_ps(tile.bias + 16 * h);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i v = _mm512_sub_epi32(acc[i][h], _mm512_mullo_epi32(zp, wsum));
      const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), scale), bias);
      _mm512_mask_storeu_ps(out + i * ldo + 16 * h, keep, y);
    }
  }
}

using MicroVnniFn = void (*)(const GemmArgs&, const uint8_t*, int64_t, const VnniTile&, float*, int64_t);

template <int NZ, int MR, bool IMPLICIT>
constexpr MicroVnniFn micro_vnni_for_mr(int64_t mr) {
  if constexpr (MR == 1) {
    return micro_vnni<1, NZ, IMPLICIT>;
  } else {
    return mr == MR ? micro_vnni<MR, NZ, IMPLICIT> : micro_vnni_for_mr<NZ, MR - 1, IMPLICIT>(mr);
  }
}

// Activation rows per micro-kernel for 16 / 32 / 64 channels: MR x NZ accumulators + NZ weight vectors fit the
// 32 registers, and the wider the tile the fewer broadcasts per vpdpbusd.
constexpr int VNNI_MR1 = 16, VNNI_MR2 = 12, VNNI_MR4 = 6;

template <bool IMPLICIT>
MicroVnniFn micro_vnni_for(int nz, int64_t mr) {
  return nz == 4   ? micro_vnni_for_mr<4, VNNI_MR4, IMPLICIT>(mr)
         : nz == 2 ? micro_vnni_for_mr<2, VNNI_MR2, IMPLICIT>(mr)
                   : micro_vnni_for_mr<1, VNNI_MR1, IMPLICIT>(mr);
}

template <int BITS>
VNNI_TARGET void gemm_task_vnni_bits(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows, int64_t m0,
                                     int64_t m1, void* buf) {
  const int nz = rows > 32 ? 4 : rows > 16 ? 2 : 1;
  const int64_t k4n = (p.k + 3) / 4;  // past K the activations are 0
  VnniTile tile;
  tile.w = static_cast<int8_t*>(buf);
  unpack_tile_vnni<BITS>(p, g, n0, rows, nz, k4n, plane_gather(p.bits), tile);
  const int64_t step = nz == 4 ? VNNI_MR4 : nz == 2 ? VNNI_MR2 : VNNI_MR1;
  for (int64_t m = m0; m < m1;) {
    float* out = row_out(p, m) + g * p.N + n0;
    if (p.koff) {  // a micro-kernel's rows stay within one output row
      const int64_t r = m / p.Wo, ow = m % p.Wo, mr = std::min({step, m1 - m, p.Wo - ow});
      const uint8_t* a = p.a + (r / p.Ho) * p.img + (r % p.Ho) * p.hrow + ow * p.lda;
      micro_vnni_for<true>(nz, mr)(p, a, k4n, tile, out, rows);
      m += mr;
    } else {
      const int64_t mr = std::min<int64_t>(step, m1 - m);
      micro_vnni_for<false>(nz, mr)(p, p.a + (g * p.M + m) * p.lda, k4n, tile, out, rows);
      m += mr;
    }
  }
}

void gemm_task_vnni(const GemmArgs& p, int64_t g, int64_t n0, int64_t rows, int64_t m0, int64_t m1, void* buf) {
  switch (p.bits) {
    case 1: return gemm_task_vnni_bits<1>(p, g, n0, rows, m0, m1, buf);
    case 8: return gemm_task_vnni_bits<8>(p, g, n0, rows, m0, m1, buf);
    default: return gemm_task_vnni_bits<0>(p, g, n0, rows, m0, m1, buf);
  }
}

using GemmTask = void (*)(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, int64_t, void*);

GemmTask gemm_for(const std::string& isa, int64_t kpad) {
  kernel_for(isa);
  if (isa == "scalar") return gemm_task_scalar;
  if (isa == "avx512vnni" && kpad <= VNNI_MAX_K) return gemm_task_vnni;
  return gemm_task_avx2;
}

}  // namespace

std::string gemm_kernel_name() {
  const std::string& isa = active_isa();
  if (isa == "scalar") return "scalar";
  return isa == "avx512vnni" ? "avx512-vnni" : "avx2";
}

namespace {

// Per output channel: wsum = sum_k w = alpha * qsum - off * K (int64), scale and bias (float).
struct GemmConstants {
  torch::Tensor wsum, scale, bias;
  GemmConstants(const torch::Tensor& qsum, const torch::Tensor& sc, const torch::Tensor& bs, int64_t k,
                int64_t alpha, int64_t off)
      : wsum((qsum.to(torch::kInt64) * alpha - off * k).contiguous()),
        scale(sc.to(torch::kFloat).contiguous()),
        bias(bs.to(torch::kFloat).contiguous()) {}
};

void run_gemm(const GemmArgs& p, GemmTask task) {
  const int64_t ntiles = (p.N + NT - 1) / NT, mchunks = (p.M + MC - 1) / MC;
  at::parallel_for(0, p.G * ntiles * mchunks, 1, [&](int64_t lo, int64_t hi) {
    // int16 or int8 weights, whichever the task unpacks; every task writes what it reads, so no zero fill
    std::unique_ptr<int16_t[]> w(new int16_t[NT * p.nblk * 64]);
    for (int64_t t = lo; t < hi; ++t) {
      // Consecutive tasks share a weight tile, so a thread's range reuses it from cache.
      const int64_t mc = t % mchunks, tile = (t / mchunks) % ntiles, g = t / (mchunks * ntiles);
      const int64_t n0 = tile * NT, m0 = mc * MC;
      task(p, g, n0, std::min(NT, p.N - n0), m0, std::min(p.M, m0 + MC), w.get());
    }
  });
}

}  // namespace

// a: uint8 codes [G, M, Kpad]; planes: int64 [G, N, nblk, bits]; qsum: int64 [G, N]; scale, bias: float [G, N].
// Returns float [M, G*N].
torch::Tensor lowbit_gemm(torch::Tensor a, torch::Tensor planes, torch::Tensor qsum, torch::Tensor scale,
                          torch::Tensor bias, int64_t k, int64_t alpha, int64_t off, int64_t zp) {
  TORCH_CHECK(a.dtype() == torch::kUInt8 && a.dim() == 3, "activations must be uint8 [G, M, Kpad]");
  TORCH_CHECK(planes.dtype() == torch::kInt64 && planes.dim() == 4, "planes must be int64 [G, N, nblk, bits]");
  const int64_t G = a.size(0), M = a.size(1), N = planes.size(1), nblk = planes.size(2);
  TORCH_CHECK(planes.size(0) == G && a.size(2) >= k && a.size(2) % 4 == 0 && a.size(2) <= nblk * 64,
              "activation and weight shapes do not match");
  TORCH_CHECK(nblk * 64 <= MAX_GEMM_K, "rows longer than ", MAX_GEMM_K, " are not supported");
  const GemmTask task = gemm_for(active_isa(), nblk * 64);
  if (task != gemm_task_vnni && a.size(2) != nblk * 64)  // only the VNNI GEMM reads rows shorter than the planes
    a = at::constant_pad_nd(a, {0, nblk * 64 - a.size(2)}, 0);
  a = a.contiguous();
  planes = planes.contiguous();
  const GemmConstants c(qsum, scale, bias, k, alpha, off);
  auto out = torch::empty({M, G * N}, torch::kFloat);
  GemmArgs p{a.data_ptr<uint8_t>(), reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>()),
             c.wsum.data_ptr<int64_t>(), c.scale.data_ptr<float>(), c.bias.data_ptr<float>(), out.data_ptr<float>(),
             G, M, N, nblk, planes.size(3), alpha, off, zp, k, a.size(2)};
  run_gemm(p, task);
  return out;
}

// Implicit-GEMM conv on the VNNI GEMM (one group, C a multiple of 4, so each dword of a GEMM row is four channels
// of one kernel tap): padded: channels-last codes [B, Hp, Wp, C] with the zero point in the border. Returns
// float [B*Ho*Wo, N]. No im2col: the micro-kernel reads each row's dwords at a per-k4 offset from its position.
torch::Tensor lowbit_conv_implicit(torch::Tensor padded, torch::Tensor planes, torch::Tensor qsum,
                                   torch::Tensor scale, torch::Tensor bias, int64_t k, int64_t alpha, int64_t off,
                                   int64_t zp, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                                   std::vector<int64_t> dilation, int64_t Ho, int64_t Wo) {
  TORCH_CHECK(padded.dtype() == torch::kUInt8 && padded.dim() == 4 && padded.is_contiguous(),
              "padded codes must be contiguous uint8 [B, Hp, Wp, C]");
  const int64_t B = padded.size(0), Wp = padded.size(2), C = padded.size(3), nblk = planes.size(2);
  const int64_t kh = kernel[0], kw = kernel[1];
  TORCH_CHECK(C % 4 == 0 && k == kh * kw * C && planes.size(0) == 1, "implicit conv needs one group, C % 4 == 0");
  TORCH_CHECK(active_isa() == "avx512vnni" && nblk * 64 <= VNNI_MAX_K, "implicit conv runs on the VNNI GEMM");
  std::vector<int32_t> koff(k / 4);
  for (int64_t k4 = 0; k4 < k / 4; ++k4) {
    const int64_t tap = 4 * k4 / C, c = 4 * k4 % C, i = tap / kw, j = tap % kw;
    koff[k4] = static_cast<int32_t>((i * dilation[0] * Wp + j * dilation[1]) * C + c);
  }
  const int64_t N = planes.size(1), M = B * Ho * Wo;
  planes = planes.contiguous();
  const GemmConstants c(qsum, scale, bias, k, alpha, off);
  auto out = torch::empty({M, N}, torch::kFloat);
  GemmArgs p{padded.data_ptr<uint8_t>(), reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>()),
             c.wsum.data_ptr<int64_t>(), c.scale.data_ptr<float>(), c.bias.data_ptr<float>(), out.data_ptr<float>(),
             1, M, N, nblk, planes.size(3), alpha, off, zp, k, stride[1] * C};
  p.koff = koff.data();
  p.Ho = Ho;
  p.Wo = Wo;
  p.img = padded.size(1) * Wp * C;
  p.hrow = stride[0] * Wp * C;
  run_gemm(p, gemm_task_vnni);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Activation quantization, fused: code = clamp(nearbyint(x * inv) + zp, 0, qmax), the float32 arithmetic of
// torch.fake_quantize_per_tensor_affine (inv = 1.0f / scale, product rounded half to even). The AVX2 loop rounds
// with vroundps in the same mode, so both give the same codes (the tests compare them with the simulation).
namespace {

void quantize_span_scalar(const float* x, uint8_t* out, int64_t n, float inv, float zp, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * inv) + zp;
    const float low = v > 0.0f ? v : 0.0f;  // NaN -> 0, as vmaxps(v, 0) in the AVX2 loop
    out[i] = static_cast<uint8_t>(low < qmax ? low : qmax);
  }
}

__attribute__((target("avx2"))) void quantize_span_avx2(const float* x, uint8_t* out, int64_t n, float inv,
                                                        float zp, float qmax) {
  const __m256 vinv = _mm256_set1_ps(inv), vzp = _mm256_set1_ps(zp), vmax = _mm256_set1_ps(qmax);
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vzp), zero), vmax);
    const __m256i c = _mm256_cvttps_epi32(v);  // exact: v is an integer in [0, 255]
    const __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(c16, c16));
  }
  quantize_span_scalar(x + i, out + i, n - i, inv, zp, qmax);
}

void quantize_span(const float* x, uint8_t* out, int64_t n, float inv, float zp, float qmax) {
  if (active_isa() == "scalar")
    quantize_span_scalar(x, out, n, inv, zp, qmax);
  else
    quantize_span_avx2(x, out, n, inv, zp, qmax);
}

}  // namespace

// x float (any shape) -> uint8 codes of the same shape.
torch::Tensor quantize_codes(const torch::Tensor& x, double inv_scale, int64_t zp, int64_t qmax) {
  auto xf = x.to(torch::kFloat).contiguous();  // float32 inputs, as the models' (a float64 one is rounded first)
  auto out = torch::empty(xf.sizes(), torch::kUInt8);
  const float* src = xf.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float inv = static_cast<float>(inv_scale);
  at::parallel_for(0, xf.numel(), 16384, [&](int64_t lo, int64_t hi) {
    quantize_span(src + lo, dst + lo, hi - lo, inv, static_cast<float>(zp), static_cast<float>(qmax));
  });
  return out;
}

// x [B, C, H, W] float -> channels-last codes [B, H, W, C]: quantized straight from a channels-last input (what
// the previous layer's op returns), else quantized and then transposed as bytes.
torch::Tensor nhwc_codes(const torch::Tensor& x, double inv_scale, int64_t zp, int64_t qmax) {
  TORCH_CHECK(x.dim() == 4, "conv input must be [B, C, H, W]");
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return quantize_codes(x.permute({0, 2, 3, 1}), inv_scale, zp, qmax);
  return quantize_codes(x, inv_scale, zp, qmax).permute({0, 2, 3, 1}).contiguous();
}

// Output length of a conv along one dimension.
inline int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// Quantizes float activations to uint8 codes exactly as torch.fake_quantize_per_tensor_affine does (x * inv,
// round half to even, + zp, clamp) and lays them out for lowbit_gemm, Kpad = K rounded up to 64:
//   linear (kernel empty): x [M, K] -> [1, M, Kpad];
//   conv: x [B, C, H, W] -> im2col rows [G, B*Ho*Wo, Kpad], K = kh*kw*C/G in (ki, kj, channel) order; the conv
//   padding reads as code zp, the code of 0.0, which is what a float conv on fake-quantized input sees.
namespace {

// n bytes, n >= 16, in 16-byte pieces (the last one overlapping): inlined moves where a memcpy call of a
// short, variable length would cost more than the copy.
inline void copy_run(uint8_t* dst, const uint8_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) std::memcpy(dst + i, src + i, 16);
  if (i < n) std::memcpy(dst + n - 16, src + n - 16, 16);
}

inline void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 16)
    copy_run(dst, src, n);
  else
    std::memcpy(dst, src, n);
}

}  // namespace

// row_multiple: rows padded to a multiple of 64 (the GEMV and the unpacking GEMMs read whole plane blocks) or
// of 4 (the VNNI GEMM reads dwords up to K).
torch::Tensor quantize_columns(torch::Tensor x, double inv_scale, int64_t zp, int64_t qmax, int64_t groups,
                               std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t row_multiple) {
  TORCH_CHECK(row_multiple == 4 || row_multiple == 64, "row_multiple must be 4 or 64");
  if (kernel.empty()) {  // linear: quantize each row straight into its padded place
    TORCH_CHECK(x.dim() == 2, "linear input must be [M, K]");
    auto xf = x.to(torch::kFloat).contiguous();
    const int64_t M = x.size(0), K = x.size(1), Kpad = (K + row_multiple - 1) / row_multiple * row_multiple;
    auto out = torch::empty({1, M, Kpad}, torch::kUInt8);
    const float* src = xf.data_ptr<float>();
    uint8_t* op = out.data_ptr<uint8_t>();
    const float inv = static_cast<float>(inv_scale);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t a, int64_t b) {
      for (int64_t m = a; m < b; ++m) {
        quantize_span(src + m * K, op + m * Kpad, K, inv, static_cast<float>(zp), static_cast<float>(qmax));
        std::memset(op + m * Kpad + K, 0, Kpad - K);
      }
    });
    return out;
  }
  TORCH_CHECK(x.dim() == 4 && kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2, "conv input must be [B, C, H, W] with 2-d kernel/stride/padding/dilation");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(groups >= 1 && C % groups == 0, "channels do not divide into groups");
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t Ho = conv_out(H, kh, sh, ph, dh), Wo = conv_out(W, kw, sw, pw, dw);
  TORCH_CHECK(Ho > 0 && Wo > 0, "the input is smaller than the kernel");
  const int64_t Cg = C / groups, K = Cg * kh * kw, L = Ho * Wo;
  const int64_t Kpad = (K + row_multiple - 1) / row_multiple * row_multiple;
  // With one group and no horizontal dilation, the kw taps of a kernel row are kw adjacent pixels: one run.
  const bool row_runs = groups == 1 && dw == 1;
  auto nhwc = nhwc_codes(x, inv_scale, zp, qmax);
  const uint8_t* np = nhwc.data_ptr<uint8_t>();  // a kernel tap's channels are one contiguous run
  auto out = torch::empty({groups, B * L, Kpad}, torch::kUInt8);
  uint8_t* op = out.data_ptr<uint8_t>();
  const int pad_code = static_cast<int>(zp);
  at::parallel_for(0, groups * B * Ho, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t oh = t % Ho, bi = (t / Ho) % B, g = t / (Ho * B);
      for (int64_t ow = 0; ow < Wo; ++ow) {
        uint8_t* row = op + (g * B * L + bi * L + oh * Wo + ow) * Kpad;
        const int64_t iw0 = ow * sw - pw;
        const bool inside_w = iw0 >= 0 && iw0 + kw - 1 < W;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t ih = oh * sh - ph + i * dh;
          if (row_runs && inside_w && ih >= 0 && ih < H) {
            copy_bytes(row + i * kw * Cg, np + ((bi * H + ih) * W + iw0) * C, kw * Cg);
            continue;
          }
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t iw = ow * sw - pw + j * dw;
            uint8_t* dst = row + (i * kw + j) * Cg;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W)
              copy_bytes(dst, np + ((bi * H + ih) * W + iw) * C + g * Cg, Cg);
            else
              std::memset(dst, pad_code, Cg);
          }
        }
        std::memset(row + K, 0, Kpad - K);
      }
    }
  });
  return out;
}

namespace {

struct DepthwiseArgs {
  const uint8_t* codes;  // channels-last [B, H, W, C]
  const int32_t* w;      // [taps, C]
  const float* scale;
  const float* bias;
  float* out;  // channels-last [B, Ho, Wo, C]
  int64_t B, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int32_t zp;
};

// One output row (all Wo positions, all channels). Plain loops over channels, compiled once per ISA below so
// the compiler vectorizes them with that ISA's 32-bit multiplies (baseline x86-64 has none); exact integers,
// so every ISA gives the same result.
// Calls tap(codes at the input position, its weights) for every kernel tap of output (bi, oh, ow) that falls
// inside the input; padding taps are skipped, as their code is zp and a - zp = 0.
template <typename Tap>
__attribute__((always_inline)) inline void for_each_tap(const DepthwiseArgs& p, int64_t bi, int64_t oh, int64_t ow,
                                                        Tap&& tap) {
  for (int64_t i = 0; i < p.kh; ++i) {
    const int64_t ih = oh * p.sh - p.ph + i * p.dh;
    if (ih < 0 || ih >= p.H) continue;
    for (int64_t j = 0; j < p.kw; ++j) {
      const int64_t iw = ow * p.sw - p.pw + j * p.dw;
      if (iw < 0 || iw >= p.W) continue;
      tap(p.codes + ((bi * p.H + ih) * p.W + iw) * p.C, p.w + (i * p.kw + j) * p.C);
    }
  }
}

__attribute__((always_inline)) inline void depthwise_row_impl(const DepthwiseArgs& p, int64_t bi, int64_t oh,
                                                              int32_t* __restrict acc) {
  const int64_t C = p.C;
  for (int64_t ow = 0; ow < p.Wo; ++ow) {
    for (int64_t c = 0; c < C; ++c) acc[c] = 0;
    for_each_tap(p, bi, oh, ow, [&](const uint8_t* __restrict a, const int32_t* __restrict wt)
                                    __attribute__((always_inline)) {
      for (int64_t c = 0; c < C; ++c) acc[c] += (static_cast<int32_t>(a[c]) - p.zp) * wt[c];
    });
    float* __restrict dst = p.out + ((bi * p.Ho + oh) * p.Wo + ow) * C;
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(acc[c]) * p.scale[c] + p.bias[c];
  }
}

void depthwise_row_scalar(const DepthwiseArgs& p, int64_t bi, int64_t oh, int32_t* acc) {
  depthwise_row_impl(p, bi, oh, acc);
}
__attribute__((target("avx2"))) void depthwise_row_avx2(const DepthwiseArgs& p, int64_t bi, int64_t oh,
                                                        int32_t* acc) {
  depthwise_row_impl(p, bi, oh, acc);
}
// AVX-512: 64 channels at a time with their int32 sums in four registers across all taps (the plain loop
// above reloads and stores the sums at every tap); the last block masked.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void depthwise_row_avx512(const DepthwiseArgs& p, int64_t bi,
                                                                               int64_t oh, int32_t*) {
  const int64_t C = p.C;
  const __m512i zp = _mm512_set1_epi32(p.zp);
  for (int64_t ow = 0; ow < p.Wo; ++ow) {
    float* dst = p.out + ((bi * p.Ho + oh) * p.Wo + ow) * C;
    for (int64_t c0 = 0; c0 < C; c0 += 64) {
      __mmask16 keep[4];
      for (int u = 0; u < 4; ++u) {
        const int64_t live = std::min<int64_t>(16, std::max<int64_t>(0, C - c0 - 16 * u));
        keep[u] = static_cast<__mmask16>((1u << live) - 1);
      }
      __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
      for_each_tap(p, bi, oh, ow, [&](const uint8_t* codes, const int32_t* weights)
                                      __attribute__((target("avx512f,avx512bw,avx512vl"))) {
        const uint8_t* a = codes + c0;
        const int32_t* wt = weights + c0;
        for (int u = 0; u < 4; ++u) {
          if (!keep[u]) break;
          const __m512i av = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(keep[u], a + 16 * u)), zp);
          acc[u] = _mm512_add_epi32(acc[u], _mm512_mullo_epi32(av, _mm512_maskz_loadu_epi32(keep[u], wt + 16 * u)));
        }
      });
      for (int u = 0; u < 4; ++u) {
        if (!keep[u]) break;
        const int64_t c = c0 + 16 * u;
        const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[u]), _mm512_maskz_loadu_ps(keep[u], p.scale + c)),
                                       _mm512_maskz_loadu_ps(keep[u], p.bias + c));
        _mm512_mask_storeu_ps(dst + c, keep[u], y);
      }
    }
  }
}

using DepthwiseRow = void (*)(const DepthwiseArgs&, int64_t, int64_t, int32_t*);

DepthwiseRow depthwise_row_for(const std::string& isa) {
  if (isa == "scalar") return depthwise_row_scalar;
  if (isa == "avx2") return depthwise_row_avx2;
  return depthwise_row_avx512;
}

}  // namespace

// Depthwise conv (one input and one output channel per group). A GEMM row here would be kh*kw long, padded to
// 64, so this runs directly on the channels-last codes instead: per output position, every channel's taps,
// summed in int32 over channels in the inner loop (contiguous, vectorized by the compiler per ISA). Exact integers, so
// the same result on every ISA. x: float [B, C, H, W]; planes: int64 [C, 1, nblk, bits]; scale, bias: [C].
torch::Tensor lowbit_depthwise(torch::Tensor x, torch::Tensor planes, torch::Tensor scale, torch::Tensor bias,
                               double inv_scale, int64_t zp, int64_t qmax, int64_t alpha, int64_t off,
                               std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  TORCH_CHECK(x.dim() == 4 && planes.dim() == 4 && planes.size(0) == x.size(1) && planes.size(1) == 1,
              "depthwise needs planes [C, 1, nblk, bits] for input [B, C, H, W]");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], taps = kh * kw;
  TORCH_CHECK(planes.size(2) * 64 >= taps, "planes are shorter than the kernel");
  const int64_t Ho = conv_out(H, kh, stride[0], padding[0], dilation[0]);
  const int64_t Wo = conv_out(W, kw, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(Ho > 0 && Wo > 0, "the input is smaller than the kernel");
  auto nhwc = nhwc_codes(x, inv_scale, zp, qmax);
  // [taps, C] int32 weights, so the inner loop over channels reads contiguously.
  auto w = (unpack_planes(planes).slice(2, 0, taps).reshape({C, taps}).to(torch::kInt32) * alpha - off)
               .t().contiguous();
  auto sc = scale.to(torch::kFloat).reshape({C}).contiguous();
  auto bs = bias.to(torch::kFloat).reshape({C}).contiguous();
  auto out = torch::empty({B, Ho, Wo, C}, torch::kFloat);  // channels-last, returned as NCHW strides
  const uint8_t* np = nhwc.data_ptr<uint8_t>();
  const int32_t* wp = w.data_ptr<int32_t>();
  const float* scp = sc.data_ptr<float>();
  const float* bp = bs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const DepthwiseArgs args{np, wp, scp, bp, op, B, C, H, W, Ho, Wo, kh, kw, stride[0], stride[1], padding[0],
                           padding[1], dilation[0], dilation[1], static_cast<int32_t>(zp)};
  const DepthwiseRow row = depthwise_row_for(active_isa());
  at::parallel_for(0, B * Ho, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int32_t> acc(C);
    for (int64_t t = lo; t < hi; ++t) row(args, t / Ho, t % Ho, acc.data());
  });
  return out.permute({0, 3, 1, 2});
}

// ---------------------------------------------------------------------------------------------------------
// The torch ops (registered here, in C++, so a call from a graph costs a dispatcher hop rather than a Python
// custom-op call; the fake implementations for export/compile are in kernels/ops.py).
namespace {

constexpr int64_t SMALL_BATCH = 16;  // rows up to which the bit-plane GEMV beats unpacking a tile

std::pair<int64_t, int64_t> affine_for(int64_t bits) {
  return bits == 1 ? std::make_pair<int64_t, int64_t>(2, 1) : std::make_pair<int64_t, int64_t>(1, (1 << (bits - 1)) - 1);
}

double inverse_scale(double a_scale) { return 1.0f / static_cast<float>(a_scale); }  // float32, as fake_quantize

// Weight scale x activation scale: the float32 product, as the simulation's.
torch::Tensor dequant_scale(const torch::Tensor& scale, double a_scale) { return scale.to(torch::kFloat).mul(a_scale); }

// Argument checks at the op entry. The kernels index every tensor through raw pointers with sizes taken from
// the planes, and a packed model loaded from a file (kernels.lower.load_packed) reaches the ops with whatever
// tensors and constants the file holds. So every argument is checked here, before any pointer is read: a
// malformed one is a RuntimeError that names it, never a read out of bounds.

void check_activation(double a_scale, int64_t zp, int64_t qmax) {
  TORCH_CHECK(qmax >= 1 && qmax <= 255 && zp >= 0 && zp <= qmax, "activation codes must satisfy 0 <= a_zp <= a_qmax "
              "<= 255, got a_zp ", zp, ", a_qmax ", qmax);
  // Checked as a double first: converting one beyond the float range is undefined.
  TORCH_CHECK(std::isfinite(a_scale) && a_scale > 0 && a_scale <= std::numeric_limits<float>::max() &&
                  std::isfinite(1.0f / static_cast<float>(a_scale)),
              "a_scale must be a positive float32 with a finite reciprocal, got ", a_scale);
}

// A tensor the kernels read as a flat array of `dtype`. Contiguity is required rather than made: a stored
// buffer is contiguous, and copying a broadcast (stride 0) one would allocate whatever its shape claims.
void check_dense(const torch::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().is_cpu() && t.layout() == torch::kStrided, name, " must be a dense CPU tensor, got ",
              t.device(), " ", t.layout());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
}

// x is only converted and copied (any float dtype, any strides: a conv input may be channels-last).
void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.defined(), "x is undefined");
  TORCH_CHECK(x.device().is_cpu() && x.layout() == torch::kStrided, "x must be a dense CPU tensor, got ",
              x.device(), " ", x.layout());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
}

void check_row_length(int64_t k, int64_t nblk) {
  TORCH_CHECK(k >= 1 && k <= MAX_GEMM_K, "k = ", k, " is outside 1..", MAX_GEMM_K,
              " (the row lengths every path sums exactly in int32)");
  TORCH_CHECK(nblk == (k + 63) / 64, "k = ", k, " does not match the packed rows (", nblk, " blocks of 64, expected ",
              (k + 63) / 64, ")");
}

struct PackedShape {
  int64_t G, N, nblk, bits;
};

// qsum, scale and bias are read at g * N + n for every group and output channel of the planes.
void check_per_channel(const torch::Tensor& t, const char* name, at::ScalarType dtype, const PackedShape& w) {
  check_dense(t, name, dtype);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == w.G && t.size(1) == w.N, name, " must be [G, N] = [", w.G, ", ", w.N,
              "] like the planes, got shape ", t.sizes());
}

// planes: int64 [G, N, nblk, bits] (b = 8: 8 words of bytes per block, so the last dimension is b for every b).
PackedShape check_weights(const torch::Tensor& planes, const torch::Tensor& qsum, const torch::Tensor& scale,
                          const torch::Tensor& bias, int64_t k) {
  check_dense(planes, "planes", torch::kInt64);
  TORCH_CHECK(planes.dim() == 4, "planes must be [G, N, nblk, bits], got shape ", planes.sizes());
  const PackedShape w{planes.size(0), planes.size(1), planes.size(2), planes.size(3)};
  TORCH_CHECK(w.G >= 1 && w.N >= 1, "planes must hold at least one group and one output channel, got shape ",
              planes.sizes());
  TORCH_CHECK(w.bits >= 1 && w.bits <= 8, "planes' last dimension is the weight bit count, 1..8, got ", w.bits);
  check_row_length(k, w.nblk);
  check_per_channel(qsum, "qsum", torch::kInt64, w);
  check_per_channel(scale, "scale", torch::kFloat, w);
  check_per_channel(bias, "bias", torch::kFloat, w);
  return w;
}

bool product_fits(std::initializer_list<int64_t> factors, int64_t& out) {
  out = 1;
  for (const int64_t f : factors)
    if (__builtin_mul_overflow(out, f, &out)) return false;
  return true;
}

int64_t checked_product(std::initializer_list<int64_t> factors, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(product_fits(factors, out), what, " overflows int64");
  return out;
}

// Output length along one dimension. The input must cover the dilated kernel (as for torch's conv2d): the C++
// division truncates towards zero, so conv_out alone gives 1 for an input one short of it, and the implicit GEMM
// would read that row past the image. `padded` (the input plus both paddings) is returned for the buffer sizes.
int64_t checked_conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation,
                         const char* dim, int64_t& padded) {
  int64_t span = 0;
  TORCH_CHECK(!__builtin_mul_overflow(dilation, kernel - 1, &span) && !__builtin_add_overflow(span, 1, &span) &&
                  !__builtin_mul_overflow(padding, 2, &padded) && !__builtin_add_overflow(padded, size, &padded),
              "conv ", dim, " ", size, " with kernel ", kernel, ", padding ", padding, " and dilation ", dilation,
              " overflows int64");
  TORCH_CHECK(padded >= span, "the input is smaller than the kernel: ", dim, " ", size, " + 2 x padding ", padding,
              " < dilation ", dilation, " x (kernel ", kernel, " - 1) + 1");
  return conv_out(size, kernel, stride, padding, dilation);
}

// Rows for the VNNI GEMM need only K rounded up to 4; everything else reads whole 64-code plane blocks.
int64_t row_multiple_for(int64_t rows, const torch::Tensor& planes) {
  return rows > SMALL_BATCH && active_isa() == "avx512vnni" && planes.size(2) * 64 <= VNNI_MAX_K ? 4 : 64;
}

// columns: uint8 codes [G, M, Kpad] -> float [M, G*N].
torch::Tensor run_columns(const torch::Tensor& columns, const torch::Tensor& planes, const torch::Tensor& qsum,
                          const torch::Tensor& scale, const torch::Tensor& bias, int64_t k, double a_scale,
                          int64_t zp) {
  const auto [alpha, off] = affine_for(planes.size(3));
  const auto dq = dequant_scale(scale, a_scale);
  const int64_t G = columns.size(0), M = columns.size(1), N = planes.size(1);
  if (M > SMALL_BATCH) return lowbit_gemm(columns, planes, qsum, dq, bias, k, alpha, off, zp);
  auto out = lowbit_gemv(columns, planes, qsum, dq, bias, k, alpha, off, zp);  // [G, M, N]
  return G == 1 ? out[0] : out.permute({1, 0, 2}).reshape({M, G * N});
}

}  // namespace

torch::Tensor lowbit_linear_op(const torch::Tensor& x, const torch::Tensor& planes, const torch::Tensor& qsum,
                               const torch::Tensor& scale, const torch::Tensor& bias, int64_t k, double a_scale,
                               int64_t a_zp, int64_t a_qmax) {
  check_input(x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "linear input's last dimension must be ", k, ", got shape ", x.sizes());
  check_activation(a_scale, a_zp, a_qmax);
  const PackedShape w = check_weights(planes, qsum, scale, bias, k);
  TORCH_CHECK(w.G == 1, "linear weights must be planes [1, N, nblk, bits], got shape ", planes.sizes());
  const int64_t M = x.numel() / k;
  checked_product({M, w.N}, "the output size");
  checked_product({M, w.nblk, 64}, "the activation codes' size");
  auto rows = x.reshape({-1, k});
  auto columns = quantize_columns(rows, inverse_scale(a_scale), a_zp, a_qmax, 1, {}, {}, {}, {},
                                  row_multiple_for(rows.size(0), planes));
  auto out = run_columns(columns, planes, qsum, scale, bias, k, a_scale, a_zp);
  auto shape = x.sizes().vec();
  shape.back() = planes.size(1);
  return out.reshape(shape);
}

torch::Tensor lowbit_conv2d_op(const torch::Tensor& x, const torch::Tensor& planes, const torch::Tensor& qsum,
                               const torch::Tensor& scale, const torch::Tensor& bias, int64_t k, double a_scale,
                               int64_t a_zp, int64_t a_qmax, at::IntArrayRef kernel, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_input(x);
  TORCH_CHECK(x.dim() == 4, "conv input x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "kernel, stride, padding and dilation must have two values, got ", kernel, ", ", stride, ", ", padding,
              ", ", dilation);
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0,
                "kernel, stride and dilation must be >= 1 and padding >= 0, got kernel ", kernel, ", stride ", stride,
                ", padding ", padding, ", dilation ", dilation);
  check_activation(a_scale, a_zp, a_qmax);
  const PackedShape w = check_weights(planes, qsum, scale, bias, k);
  const int64_t B = x.size(0), C = x.size(1), G = w.G, Ng = w.N;
  TORCH_CHECK(C >= 1 && x.size(2) >= 1 && x.size(3) >= 1, "conv input x needs C, H and W >= 1, got shape ", x.sizes());
  TORCH_CHECK(C % G == 0, "x's ", C, " channels do not divide into the planes' ", G, " groups");
  const int64_t row = checked_product({C / G, kernel[0], kernel[1]}, "C/groups * kh * kw");
  TORCH_CHECK(k == row, "k must be C/groups * kh * kw = ", row, " for this input, got ", k);
  int64_t Hp = 0, Wp = 0;
  const int64_t Ho = checked_conv_out(x.size(2), kernel[0], stride[0], padding[0], dilation[0], "height", Hp);
  const int64_t Wo = checked_conv_out(x.size(3), kernel[1], stride[1], padding[1], dilation[1], "width", Wp);
  // The sizes every path allocates, and indexes with int64 products: the output and the im2col rows.
  const int64_t positions = checked_product({B, Ho, Wo}, "the output positions B * Ho * Wo");
  checked_product({positions, G, Ng}, "the output size");
  checked_product({G, positions, w.nblk, 64}, "the im2col size");
  std::vector<int64_t> kv(kernel.begin(), kernel.end()), sv(stride.begin(), stride.end()),
      pv(padding.begin(), padding.end()), dv(dilation.begin(), dilation.end());
  if (G == C && Ng == 1) {  // depthwise: a GEMM row would be only kh*kw long
    const auto [alpha, off] = affine_for(planes.size(3));
    return lowbit_depthwise(x, planes, dequant_scale(scale, a_scale), bias, inverse_scale(a_scale), a_zp,
                            a_qmax, alpha, off, kv, sv, pv, dv);
  }
  // The implicit GEMM reads each row at int32 offsets within one padded image; larger images take the im2col.
  int64_t image = 0, padded_codes = 0;
  const bool implicit_fits = product_fits({Hp, Wp, C}, image) && image <= std::numeric_limits<int32_t>::max() &&
                             product_fits({B, image}, padded_codes);
  if (G == 1 && C % 4 == 0 && implicit_fits && row_multiple_for(positions, planes) == 4) {  // implicit GEMM: no im2col
    auto codes = nhwc_codes(x, inverse_scale(a_scale), a_zp, a_qmax);
    if (pv[0] || pv[1]) codes = at::constant_pad_nd(codes, {0, 0, pv[1], pv[1], pv[0], pv[0]}, a_zp);
    const auto [alpha, off] = affine_for(planes.size(3));
    return lowbit_conv_implicit(codes.contiguous(), planes, qsum, dequant_scale(scale, a_scale), bias, k,
                                alpha, off, a_zp, kv, sv, dv, Ho, Wo)
        .view({B, Ho, Wo, Ng})
        .permute({0, 3, 1, 2});
  }
  auto columns = quantize_columns(x, inverse_scale(a_scale), a_zp, a_qmax, G, kv, sv, pv, dv,
                                  row_multiple_for(B * Ho * Wo, planes));
  // [B*Ho*Wo, G*Ng] is channels-last memory: returned as an NCHW tensor with channels-last strides.
  return run_columns(columns, planes, qsum, scale, bias, k, a_scale, a_zp).view({B, Ho, Wo, G * Ng})
      .permute({0, 3, 1, 2});
}

TORCH_LIBRARY(bitsearch, m) {
  m.def("lowbit_linear(Tensor x, Tensor planes, Tensor qsum, Tensor scale, Tensor bias, int k, float a_scale, "
        "int a_zp, int a_qmax) -> Tensor");
  m.def("lowbit_conv2d(Tensor x, Tensor planes, Tensor qsum, Tensor scale, Tensor bias, int k, float a_scale, "
        "int a_zp, int a_qmax, int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitsearch, CPU, m) {
  m.impl("lowbit_linear", &lowbit_linear_op);
  m.impl("lowbit_conv2d", &lowbit_conv2d_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_planes", &pack_planes);
  m.def("unpack_planes", &unpack_planes);
  m.def("lowbit_gemv", &lowbit_gemv);
  m.def("lowbit_gemm", &lowbit_gemm);
  m.def("quantize_columns", &quantize_columns);
  m.def("quantize_codes", &quantize_codes);
  m.def("gemm_kernel_name", &gemm_kernel_name);
  m.def("lowbit_depthwise", &lowbit_depthwise);
  m.def("supported_isas", &supported_isas);
  m.attr("SMALL_BATCH") = SMALL_BATCH;
  m.def("get_isa", &get_isa);
  m.def("set_isa", &set_isa);
}
