// Low-bit weight x 8-bit activation kernels on bit-plane packed weights.
//
// Packed layout (one code path for every weight width b = 1..8):
//   A weight row of K values is stored as unsigned indices q in [0, 2^b), zero-padded to Kpad = 64 * nblk.
//   planes[g][n][j][p] (uint64) holds bit p of the 64 indices q[g][n][64j .. 64j+63]; bit i of the word is
//   element 64j+i. So a row costs exactly b bits per weight (plus the padding of K to 64).
//   The integer weight is w = alpha * q - off: uniform codes (alpha 1, off 2^(b-1)-1) and binary
//   sign codes (b = 1: alpha 2, off 1, i.e. w in {-1, +1}).
// Activations arrive as uint8 codes a with a zero point zp (affine per-tensor quantization), so
//   sum_k w_k (a_k - zp) = alpha * sum_p 2^p S_p  - alpha * zp * sum_k q_k  - off * sum_k a_k  + K * off * zp
// where S_p = sum of a_k over the k whose index has bit p set. S_p is a masked byte sum: the plane word is
// the mask. AVX-512BW uses it directly as a k-mask; AVX2 expands it to a byte mask; the scalar reference
// walks the bits. All three compute the same integers, so tests compare them exactly.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using PlaneSum = int64_t (*)(const uint8_t* a, const uint64_t* planes, int64_t nblk, int64_t bits);

// sum_p 2^p * S_p over one activation row and one packed weight row.
int64_t plane_sum_scalar(const uint8_t* a, const uint64_t* planes, int64_t nblk, int64_t bits) {
  int64_t total = 0;
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

__attribute__((target("avx2"))) int64_t plane_sum_avx2(const uint8_t* a, const uint64_t* planes, int64_t nblk,
                                                       int64_t bits) {
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

std::string& active_isa() {
  static std::string isa = [] {
    __builtin_cpu_init();
    std::string best = "scalar";
    if (__builtin_cpu_supports("avx2")) best = "avx2";
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = "avx512";
    const char* forced = std::getenv("BITSEARCH_KERNEL_ISA");
    return forced && *forced ? std::string(forced) : best;
  }();
  return isa;
}

PlaneSum kernel_for(const std::string& isa) {
  if (isa == "avx512") return plane_sum_avx512;
  if (isa == "avx2") return plane_sum_avx2;
  if (isa == "scalar") return plane_sum_scalar;
  TORCH_CHECK(false, "unknown kernel ISA '", isa, "' (expected scalar, avx2 or avx512)");
}

}  // namespace

std::vector<std::string> supported_isas() {
  __builtin_cpu_init();
  std::vector<std::string> out{"scalar"};
  if (__builtin_cpu_supports("avx2")) out.push_back("avx2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) out.push_back("avx512");
  return out;
}

std::string get_isa() { return active_isa(); }

void set_isa(const std::string& isa) {
  kernel_for(isa);
  active_isa() = isa;
}

// q: uint8 [G, N, Kpad] indices (Kpad a multiple of 64) -> int64 [G, N, nblk, bits] planes.
torch::Tensor pack_planes(torch::Tensor q, int64_t bits) {
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.dim() == 3 && q.size(2) % 64 == 0, "q must be uint8 [G, N, 64*k]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8");
  q = q.contiguous();
  const int64_t rows = q.size(0) * q.size(1), nblk = q.size(2) / 64;
  auto out = torch::zeros({q.size(0), q.size(1), nblk, bits}, torch::kInt64);
  const uint8_t* src = q.data_ptr<uint8_t>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
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
  a = a.contiguous();
  planes = planes.contiguous();
  auto qs = qsum.to(torch::kInt64).contiguous();
  auto sc = scale.to(torch::kFloat).contiguous();
  auto bs = bias.to(torch::kFloat).contiguous();
  auto out = torch::empty({G, M, N}, torch::kFloat);
  // Per activation row: sum of codes (for the -off * sum a term).
  auto asum = a.sum(2, /*keepdim=*/false, torch::kInt64).contiguous();
  const PlaneSum kernel = kernel_for(active_isa());
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const uint64_t* pp = reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>());
  const int64_t* qp = qs.data_ptr<int64_t>();
  const int64_t* asp = asum.data_ptr<int64_t>();
  const float* scp = sc.data_ptr<float>();
  const float* bp = bs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, G * N, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t gn = lo; gn < hi; ++gn) {
      const int64_t g = gn / N, n = gn % N;
      const uint64_t* wp = pp + gn * nblk * bits;
      for (int64_t m = 0; m < M; ++m) {
        int64_t acc = alpha * kernel(ap + (g * M + m) * nblk * 64, wp, nblk, bits) - alpha * zp * qp[gn] -
                      off * asp[g * M + m] + k * off * zp;
        op[(g * M + m) * N + n] = static_cast<float>(acc) * scp[gn] + bp[gn];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_planes", &pack_planes);
  m.def("unpack_planes", &unpack_planes);
  m.def("lowbit_gemv", &lowbit_gemv);
  m.def("supported_isas", &supported_isas);
  m.def("get_isa", &get_isa);
  m.def("set_isa", &set_isa);
}
