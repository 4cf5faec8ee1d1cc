// The multi-LoRA op by token on CPU, one call per module: for each token n with an adapter,
//   y[rows[n]] += scale[n] * (x[rows[n]] @ At[slots[n], :, :rank]) @ Bt[slots[n], :rank, :]
// over the pool's storage At [n_slots, d_in, r_max] and Bt [n_slots, r_max, d_out] (float32, or the
// model's dtype), read in place. The sums run in the order of the plain-torch op (`ops._apply_bags`:
// over the inputs, then over the rank dims), in float32, and a low-precision y takes base + delta
// rounded once, as PEFT does.
// Tokens arrive grouped by slot, so a thread reads each adapter's rows about once and the op is bound
// by reading the adapters' bytes; one call replaces the plain op's dozen tensor ops per module.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // rank dims summed together: one 64-byte line of a row of At

template <typename T, typename W>
void by_token(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_t, const at::Tensor& b_t,
              const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& scale, int64_t rank) {
  const int64_t n = rows.size(0);
  const int64_t d_in = a_t.size(1), r_max = a_t.size(2), d_out = b_t.size(2);
  const T* x_data = x.data_ptr<T>();
  T* y_data = y.data_ptr<T>();
  const W* a_data = a_t.data_ptr<W>();
  const W* b_data = b_t.data_ptr<W>();
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  const float* scale_of = scale.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(d_in), hidden(rank), delta(d_out);
    for (int64_t t = begin; t < end; ++t) {
      const T* x_row = x_data + row_of[t] * x_stride;
      for (int64_t i = 0; i < d_in; ++i) xs[i] = static_cast<float>(x_row[i]);
      const W* a = a_data + slot_of[t] * d_in * r_max;
      for (int64_t first = 0; first < rank; first += kChunk) {
        const int64_t width = std::min(kChunk, rank - first);
        float sums[kChunk] = {0};
        if (width == kChunk) {
          for (int64_t i = 0; i < d_in; ++i) {
            const float xi = xs[i];
            const W* a_row = a + i * r_max + first;
#pragma omp simd
            for (int64_t j = 0; j < kChunk; ++j) sums[j] += xi * static_cast<float>(a_row[j]);
          }
        } else {  // the last few dims of a rank that is not a whole number of chunks
          for (int64_t i = 0; i < d_in; ++i) {
            const float xi = xs[i];
            const W* a_row = a + i * r_max + first;
            for (int64_t j = 0; j < width; ++j) sums[j] += xi * static_cast<float>(a_row[j]);
          }
        }
        for (int64_t j = 0; j < width; ++j) hidden[first + j] = sums[j] * scale_of[t];
      }
      const W* b = b_data + slot_of[t] * r_max * d_out;
      std::fill(delta.begin(), delta.end(), 0.f);
      float* d = delta.data();
      for (int64_t j = 0; j < rank; ++j) {
        const float h = hidden[j];
        const W* b_row = b + j * d_out;
#pragma omp simd
        for (int64_t o = 0; o < d_out; ++o) d[o] += h * static_cast<float>(b_row[o]);
      }
      T* y_row = y_data + row_of[t] * y_stride;
      for (int64_t o = 0; o < d_out; ++o) y_row[o] = static_cast<T>(static_cast<float>(y_row[o]) + d[o]);
    }
  });
}

void lora_by_token(at::Tensor y, const at::Tensor& x, const at::Tensor& a_t, const at::Tensor& b_t,
                   const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& scale, int64_t rank) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a_t.dim() == 3 && b_t.dim() == 3, "y, x: 2-d; At, Bt: 3-d");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "y and x need contiguous rows");
  TORCH_CHECK(a_t.is_contiguous() && b_t.is_contiguous(), "At and Bt must be contiguous");
  TORCH_CHECK(a_t.scalar_type() == b_t.scalar_type(), "At and Bt share a dtype");
  TORCH_CHECK(a_t.scalar_type() == at::kFloat || a_t.scalar_type() == y.scalar_type(),
              "At and Bt are float32 or y's dtype");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y share a dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.is_contiguous() &&
                  slots.is_contiguous(),
              "rows, slots: contiguous int64");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale: contiguous float32");
  TORCH_CHECK(rows.numel() == slots.numel() && rows.numel() == scale.numel(), "one row, slot, scale each");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(1) == a_t.size(1) && y.size(1) == b_t.size(2) &&
                  a_t.size(0) == b_t.size(0) && a_t.size(2) == b_t.size(1),
              "shapes disagree");
  TORCH_CHECK(rank >= 0 && rank <= a_t.size(2), "rank out of range");
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  at::assert_no_internal_overlap(y);
  at::assert_no_overlap(y, x);
  for (int64_t t = 0; t < rows.numel(); ++t) {  // the kernel reads raw memory: no index may stray
    TORCH_CHECK(row_of[t] >= 0 && row_of[t] < y.size(0), "row ", row_of[t], " out of range");
    // threads write rows apart: a row listed twice would be two unsynchronised writes
    TORCH_CHECK(t == 0 || row_of[t] > row_of[t - 1], "rows must be strictly increasing");
    TORCH_CHECK(slot_of[t] >= 0 && slot_of[t] < a_t.size(0), "slot ", slot_of[t], " out of range");
  }
  if (rows.numel() == 0 || rank == 0) return;
  const bool float_slots = a_t.scalar_type() == at::kFloat;
  switch (y.scalar_type()) {
    case at::kFloat:
      by_token<float, float>(y, x, a_t, b_t, rows, slots, scale, rank);
      break;
    case at::kBFloat16:
      if (float_slots) by_token<c10::BFloat16, float>(y, x, a_t, b_t, rows, slots, scale, rank);
      else by_token<c10::BFloat16, c10::BFloat16>(y, x, a_t, b_t, rows, slots, scale, rank);
      break;
    case at::kHalf:
      if (float_slots) by_token<c10::Half, float>(y, x, a_t, b_t, rows, slots, scale, rank);
      else by_token<c10::Half, c10::Half>(y, x, a_t, b_t, rows, slots, scale, rank);
      break;
    default:
      TORCH_CHECK(false, "y must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY(openlora, m) {
  m.def(
      "lora_by_token(Tensor(a!) y, Tensor x, Tensor a_t, Tensor b_t, Tensor rows, Tensor slots, "
      "Tensor scale, int rank) -> ()");
  m.impl("lora_by_token", c10::DispatchKey::CPU, &lora_by_token);
}
