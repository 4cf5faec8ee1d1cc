// Paged attention of decoding sequences (one new query row each) on CPU, reading K/V in place from the
// block-major cache instead of gathering padded blocks for SDPA. For sequence b and query head h
// (KV head h / group, transformers' repeat_kv order), over the last `window` of its len[b] positions:
//   out[b, h] = softmax(scale · q[b, h] · K[slot(b, j), h / group]ᵀ) · V[slot(b, j), h / group]
// with slot(b, j) = table[b, j / block_size] · block_size + j % block_size. Scores, softmax and sums
// run in float32 and out is rounded once to q's dtype. A K or V row is converted to float32 once and
// serves every query head of its group.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// A row of K or V as float32. bfloat16 is the top half of a float32: a shift the compiler vectorizes,
// where c10::BFloat16's own conversion (through memcpy) stays one value at a time.
template <typename T>
inline void to_float(const T* in, float* out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<float>(in[d]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* in, float* out, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  uint32_t* wide = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) wide[d] = static_cast<uint32_t>(bits[d]) << 16;
}

// e^x for x <= 0 (a score minus its row's maximum), in a form the compiler vectorizes (libm's expf is
// a call per value, two thirds of the op's time): x = n·ln2 + r, |r| <= ln2/2, e^r by Cephes' expf
// polynomial (about an ulp), times 2^n built in the exponent bits. Below -87 it returns e^-87 (~1e-38),
// nothing next to the row's maximum, whose term is 1.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

template <typename T>
void decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& table, const at::Tensor& lens, int64_t block_size, double scale,
            int64_t window) {
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads, max_blocks = table.size(1);
  const T* q_data = q.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const T* k_data = k_cache.data_ptr<T>();
  const T* v_data = v_cache.data_ptr<T>();
  const int32_t* blocks_of = table.data_ptr<int32_t>();
  const int64_t* len_of = lens.data_ptr<int64_t>();
  const int64_t q_stride = q.stride(0), q_head = q.stride(1), out_stride = out.stride(0),
                out_head = out.stride(1), slot_stride = kv_heads * dim;
  const float fscale = static_cast<float>(scale);
  // One work item per sequence: its K and V slots are read whole (every KV head, one contiguous row
  // of a block-major block), once each, rather than a head's slice of them per item.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(heads * dim), acc(heads * dim), row(slot_stride), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = len_of[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, count = len - first;
      const int32_t* blocks = blocks_of + b * max_blocks;
      scores.resize(heads * count);
      for (int64_t h = 0; h < heads; ++h) {
        const T* q_row = q_data + b * q_stride + h * q_head;
        for (int64_t d = 0; d < dim; ++d) qs[h * dim + d] = static_cast<float>(q_row[d]) * fscale;
      }
      float* r = row.data();
      for (int64_t j = first; j < len; ++j) {
        const int64_t slot = static_cast<int64_t>(blocks[j / block_size]) * block_size + j % block_size;
        to_float(k_data + slot * slot_stride, r, slot_stride);
        for (int64_t h = 0; h < heads; ++h) {
          const float* qh = qs.data() + h * dim;
          const float* kh = r + (h / group) * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qh[d] * kh[d];
          scores[h * count + j - first] = s;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* sh = scores.data() + h * count;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < count; ++j) top = std::max(top, sh[j]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < count; ++j) total += (sh[j] = exp_nonpositive(sh[j] - top));
        const float inverse = 1.f / total;
        for (int64_t j = 0; j < count; ++j) sh[j] *= inverse;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = first; j < len; ++j) {
        const int64_t slot = static_cast<int64_t>(blocks[j / block_size]) * block_size + j % block_size;
        to_float(v_data + slot * slot_stride, r, slot_stride);
        for (int64_t h = 0; h < heads; ++h) {
          const float p = scores[h * count + j - first];
          const float* vh = r + (h / group) * dim;
          float* a = acc.data() + h * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * vh[d];
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* o = out_data + b * out_stride + h * out_head;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[h * dim + d]);
      }
    }
  });
}

void paged_decode(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& table, const at::Tensor& lens, int64_t block_size, double scale,
                  int64_t window) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q, out: [N, H, D]; caches: [slots, Hkv, D]");
  TORCH_CHECK(out.sizes() == q.sizes(), "out and q share a shape");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out need contiguous head rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "K and V caches share a shape");
  TORCH_CHECK(q.scalar_type() == out.scalar_type() && q.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type(),
              "q, out and the caches share a dtype");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dim, "head sizes disagree");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "the caches hold whole blocks");
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.is_contiguous() &&
                  table.size(0) == n,
              "table: contiguous int32 [N, max blocks]");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.is_contiguous() && lens.size(0) == n,
              "lens: contiguous int64 [N]");
  // the kernel reads raw memory: no length or block id may stray
  const int64_t num_blocks = k_cache.size(0) / block_size, max_blocks = table.size(1);
  const int32_t* blocks_of = table.data_ptr<int32_t>();
  const int64_t* len_of = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK(len_of[b] >= 1 && len_of[b] <= max_blocks * block_size, "length ", len_of[b], " out of range");
    const int64_t first = window > 0 ? std::max<int64_t>(0, len_of[b] - window) : 0;
    for (int64_t i = first / block_size; i <= (len_of[b] - 1) / block_size; ++i) {
      const int32_t block = blocks_of[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block ", block, " out of range");
    }
  }
  if (n == 0) return;
  switch (q.scalar_type()) {
    case at::kFloat:
      decode<float>(out, q, k_cache, v_cache, table, lens, block_size, scale, window);
      break;
    case at::kBFloat16:
      decode<c10::BFloat16>(out, q, k_cache, v_cache, table, lens, block_size, scale, window);
      break;
    case at::kHalf:
      decode<c10::Half>(out, q, k_cache, v_cache, table, lens, block_size, scale, window);
      break;
    default:
      TORCH_CHECK(false, "q must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openlora, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, Tensor lens, "
      "int block_size, float scale, int window) -> ()");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
}
