// The error a quantized K/V cache adds to attention's output, measured: the input of issue 18's
// choice of K scales (one per token, as blockattn's QuantizedKV keeps them, or one per channel, as
// KIVI and OpenVINO keep keys) and of the README's error table.
//
// For each input family and each cache format, the output computed on the format's values is
// compared with the output on the unquantized float cache. Both outputs are computed in double
// (attention<double> on the values widened exactly), so the figures are the format's error alone,
// not the kernels' float rounding. The int8 per-token row is also run through the library's own
// QuantizedKV call in float, whose distance to the double result is printed beside it.
//
// Formats (s is a scale, z a zero point; a group is the set of values sharing them):
//   bf16, half              rounding to nearest even, no scale
//   int8 token              symmetric, one scale per (token, kv head) row: QuantizedKV
//   int8 channel/32         symmetric, one scale per (channel, kv head) over each 32-token block
//   int8 channel/32 asym    as above with a zero point (min/max), KIVI's key format
//   int4 group32            symmetric, one scale per 32 consecutive values of a row (q4_0's idea)
//   int4 channel/32 asym    per channel over each 32-token block, with a zero point
//   int8 ChannelQuantizedKV, int4 Int4QuantizedKV: the library's formats as quantize_kv writes
//                           them (keys per channel/32 with a zero point; values per token for
//                           int8, per token in groups of 32 (q4_0's -8 trick) for int4)
// K and V are quantized with the format named, except the "K only" rows, which keep V float to
// show how much of the error K's format alone causes.
//
// Inputs (H = H_kv = 4, d = 128, n_k = 4096, 64 queries after the cache, no mask, scale 1/sqrt(d)):
//   random       q, k, v ~ N(0, 1)
//   outliers     keys as LLMs show them: each channel has its own mean (N(0, 2)) and 4 channels
//                per head 15x the spread of the rest; queries weigh those channels alike
//   sharp        random, with q scaled 4x: a peaked softmax, where a key's error moves the weights
//
// Usage: kv_quant_error [n_k]   (prints a Markdown table; a few seconds at the default size)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <blockattn/blockattn.hpp>

namespace {

using blockattn::Index;

constexpr Index kHeads = 4;
constexpr Index kDim = 128;
constexpr Index kQueries = 64;
constexpr Index kBlock = 32;  // the token block of the per-channel formats, the group of int4's

struct Inputs {
  std::vector<float> q, k, v;  // BSHD, batch 1
};

Inputs make_inputs(const std::string& family, Index n_k, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Inputs in;
  in.q.resize(static_cast<std::size_t>(kQueries * kHeads * kDim));
  in.k.resize(static_cast<std::size_t>(n_k * kHeads * kDim));
  in.v.resize(in.k.size());
  for (float& x : in.q) x = normal(rng);
  for (float& x : in.k) x = normal(rng);
  for (float& x : in.v) x = normal(rng);
  if (family == "sharp") {
    for (float& x : in.q) x *= 4.0f;
  } else if (family == "outliers") {
    std::vector<float> mean(static_cast<std::size_t>(kHeads * kDim));
    std::vector<float> spread(mean.size(), 1.0f);
    for (float& m : mean) m = 2.0f * normal(rng);
    std::uniform_int_distribution<Index> channel(0, kDim - 1);
    for (Index h = 0; h < kHeads; ++h) {
      for (int i = 0; i < 4; ++i) spread[static_cast<std::size_t>(h * kDim + channel(rng))] = 15.0f;
    }
    for (Index j = 0; j < n_k; ++j) {
      for (std::size_t c = 0; c < mean.size(); ++c) {
        float& x = in.k[static_cast<std::size_t>(j) * mean.size() + c];
        x = mean[c] + spread[c] * x;
      }
    }
    // Queries that look at the outlier channels as much as at the rest (dot products of order 1
    // per channel), so that the outliers' quantization error reaches the logits.
    for (Index i = 0; i < kQueries; ++i) {
      for (std::size_t c = 0; c < mean.size(); ++c) {
        in.q[static_cast<std::size_t>(i) * mean.size() + c] /= spread[c];
      }
    }
  }
  return in;
}

// Rounds through a 16-bit format and back.
template <class T>
std::vector<float> through(const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = static_cast<float>(T(x[i]));
  return y;
}

// Symmetric quantization of the values x[first + stride·i], i < count, to [-levels, levels] with
// one scale, written back dequantized (scale·round(x/scale), rounded once in float).
void symmetric_group(std::vector<float>& x, std::size_t first, std::size_t stride, Index count,
                     float levels) {
  float amax = 0.0f;
  for (Index i = 0; i < count; ++i)
    amax = std::max(amax, std::abs(x[first + stride * static_cast<std::size_t>(i)]));
  const float scale = amax / levels;
  for (Index i = 0; i < count; ++i) {
    float& e = x[first + stride * static_cast<std::size_t>(i)];
    e = scale == 0.0f ? 0.0f : scale * std::nearbyint(e / scale);
  }
}

// Asymmetric (min/max with a zero point) quantization to 0..levels of the same kind of group.
void asymmetric_group(std::vector<float>& x, std::size_t first, std::size_t stride, Index count,
                      float levels) {
  float lo = x[first], hi = x[first];
  for (Index i = 0; i < count; ++i) {
    const float e = x[first + stride * static_cast<std::size_t>(i)];
    lo = std::min(lo, e);
    hi = std::max(hi, e);
  }
  const float scale = (hi - lo) / levels;
  for (Index i = 0; i < count; ++i) {
    float& e = x[first + stride * static_cast<std::size_t>(i)];
    e = scale == 0.0f ? lo : lo + scale * std::nearbyint((e - lo) / scale);
  }
}

enum class Grouping { kTokenRow, kRowGroup32, kChannelBlock };

// x is [n_k, kHeads, kDim]: quantizes every group of the grouping, in place, dequantized.
std::vector<float> quantized(std::vector<float> x, Index n_k, Grouping grouping, float levels,
                             bool asymmetric) {
  const std::size_t row = static_cast<std::size_t>(kHeads * kDim);
  auto group = [&](std::size_t first, std::size_t stride, Index count) {
    if (asymmetric) {
      asymmetric_group(x, first, stride, count, levels);
    } else {
      symmetric_group(x, first, stride, count, levels);
    }
  };
  for (Index h = 0; h < kHeads; ++h) {
    const std::size_t head = static_cast<std::size_t>(h * kDim);
    if (grouping == Grouping::kChannelBlock) {
      for (Index j0 = 0; j0 < n_k; j0 += kBlock) {
        for (Index c = 0; c < kDim; ++c) {
          group(static_cast<std::size_t>(j0) * row + head + static_cast<std::size_t>(c), row,
                std::min(kBlock, n_k - j0));
        }
      }
      continue;
    }
    const Index width = grouping == Grouping::kTokenRow ? kDim : kBlock;
    for (Index j = 0; j < n_k; ++j) {
      for (Index c0 = 0; c0 < kDim; c0 += width) {
        group(static_cast<std::size_t>(j) * row + head + static_cast<std::size_t>(c0), 1,
              std::min(width, kDim - c0));
      }
    }
  }
  return x;
}

std::vector<double> widened(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// Attention in double over float values (widened exactly): out [kQueries, kHeads, kDim].
std::vector<double> attention_double(const std::vector<float>& q, const std::vector<float>& k,
                                     const std::vector<float>& v, Index n_k) {
  const std::vector<double> qd = widened(q), kd = widened(k), vd = widened(v);
  std::vector<double> out(qd.size());
  blockattn::attention(blockattn::make_tensor_view(qd.data(), 1, kQueries, kHeads, kDim),
                       blockattn::make_tensor_view(kd.data(), 1, n_k, kHeads, kDim),
                       blockattn::make_tensor_view(vd.data(), 1, n_k, kHeads, kDim),
                       blockattn::make_tensor_view(out.data(), 1, kQueries, kHeads, kDim));
  return out;
}

struct Error {
  double max_abs = 0, rms = 0, rms_ref = 0;
};

template <class T>
Error error_of(const std::vector<T>& got, const std::vector<double>& want) {
  Error e;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double diff = static_cast<double>(got[i]) - want[i];
    e.max_abs = std::max(e.max_abs, std::abs(diff));
    e.rms += diff * diff;
    e.rms_ref += want[i] * want[i];
  }
  e.rms = std::sqrt(e.rms / static_cast<double>(want.size()));
  e.rms_ref = std::sqrt(e.rms_ref / static_cast<double>(want.size()));
  return e;
}

void print_row(const std::string& family, const std::string& format, const Error& e,
               const std::string& note = "") {
  std::printf("| %s | %s | %.2e | %.2e | %.2e |%s\n", family.c_str(), format.c_str(), e.max_abs,
              e.rms, e.rms / e.rms_ref, note.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const Index n_k = argc > 1 ? std::atol(argv[1]) : 4096;
  if (n_k < 1) {
    std::fprintf(stderr, "usage: kv_quant_error [n_k >= 1]\n");
    return 2;
  }
  std::printf(
      "Attention output error of each K/V format against the unquantized float cache "
      "(H = %ld, d = %ld, n_k = %ld, %ld queries; errors in double)\n\n",
      static_cast<long>(kHeads), static_cast<long>(kDim), static_cast<long>(n_k),
      static_cast<long>(kQueries));
  std::printf(
      "| input | K/V format | max abs | RMS | RMS / RMS(out) |\n| --- | --- | --- | --- | --- |\n");
  std::mt19937 rng(2026);
  for (const std::string family : {"random", "outliers", "sharp"}) {
    const Inputs in = make_inputs(family, n_k, rng);
    const std::vector<double> want = attention_double(in.q, in.k, in.v, n_k);
    auto row = [&](const std::string& format, const std::vector<float>& k,
                   const std::vector<float>& v) {
      print_row(family, format, error_of(attention_double(in.q, k, v, n_k), want));
    };
    row("bf16", through<Eigen::bfloat16>(in.k), through<Eigen::bfloat16>(in.v));
    row("half", through<Eigen::half>(in.k), through<Eigen::half>(in.v));
    const std::vector<float> v8 = quantized(in.v, n_k, Grouping::kTokenRow, 127, false);
    row("int8 token", quantized(in.k, n_k, Grouping::kTokenRow, 127, false), v8);
    row("int8 token, K only", quantized(in.k, n_k, Grouping::kTokenRow, 127, false), in.v);
    row("int8 channel/32, K only", quantized(in.k, n_k, Grouping::kChannelBlock, 127, false), in.v);
    row("int8 channel/32 asym, K only", quantized(in.k, n_k, Grouping::kChannelBlock, 255, true),
        in.v);
    row("int4 group32, K only", quantized(in.k, n_k, Grouping::kRowGroup32, 7, false), in.v);
    row("int4 channel/32 asym, K only", quantized(in.k, n_k, Grouping::kChannelBlock, 15, true),
        in.v);
    row("int4 group32, V only", in.k, quantized(in.v, n_k, Grouping::kRowGroup32, 7, false));

    // The library's own int8 call, in float: its distance to the double figure above is the
    // kernels' float rounding, which the format's error should dwarf.
    std::vector<std::int8_t> k8(in.k.size()), v8q(in.v.size());
    std::vector<float> ks(static_cast<std::size_t>(n_k * kHeads)), vs(ks.size());
    std::vector<float> out(in.q.size());
    blockattn::quantize_kv(blockattn::make_tensor_view(in.k.data(), 1, n_k, kHeads, kDim),
                           blockattn::make_tensor_view(k8.data(), 1, n_k, kHeads, kDim),
                           blockattn::make_tensor_view(ks.data(), 1, n_k, kHeads, 1));
    blockattn::quantize_kv(blockattn::make_tensor_view(in.v.data(), 1, n_k, kHeads, kDim),
                           blockattn::make_tensor_view(v8q.data(), 1, n_k, kHeads, kDim),
                           blockattn::make_tensor_view(vs.data(), 1, n_k, kHeads, 1));
    const blockattn::QuantizedKV cache{
        blockattn::make_tensor_view<const std::int8_t>(k8.data(), 1, n_k, kHeads, kDim),
        blockattn::make_tensor_view<const float>(ks.data(), 1, n_k, kHeads, 1),
        blockattn::make_tensor_view<const std::int8_t>(v8q.data(), 1, n_k, kHeads, kDim),
        blockattn::make_tensor_view<const float>(vs.data(), 1, n_k, kHeads, 1)};
    blockattn::attention(blockattn::make_tensor_view(in.q.data(), 1, kQueries, kHeads, kDim), cache,
                         blockattn::make_tensor_view(out.data(), 1, kQueries, kHeads, kDim));
    print_row(family, "int8 token, QuantizedKV call in float", error_of(out, want));

    // The library's per-channel formats as written by quantize_kv and read by dequantize_kv:
    // ChannelQuantizedKV (int8 keys per channel with a zero point, values per token) and
    // Int4QuantizedKV (int4 keys likewise, values in per-token groups of 32, q4_0), in double;
    // then the int4 call itself in float.
    const Index blocks = (n_k + kBlock - 1) / kBlock;
    const Index groups = (kDim + kBlock - 1) / kBlock;
    const auto view = [&](auto* data, Index seq, Index dim) {
      return blockattn::make_tensor_view(data, 1, seq, kHeads, dim);
    };
    std::vector<float> k_scale(static_cast<std::size_t>(blocks * kHeads * kDim));
    std::vector<float> k_zero(k_scale.size()), kf(in.k.size()), vf(in.v.size());
    blockattn::quantize_kv(view(in.k.data(), n_k, kDim), 0, view(k8.data(), n_k, kDim),
                           view(k_scale.data(), blocks, kDim), view(k_zero.data(), blocks, kDim));
    blockattn::dequantize_kv(view(static_cast<const std::int8_t*>(k8.data()), n_k, kDim),
                             view(static_cast<const float*>(k_scale.data()), blocks, kDim),
                             view(static_cast<const float*>(k_zero.data()), blocks, kDim),
                             view(kf.data(), n_k, kDim));
    blockattn::dequantize_kv(view(static_cast<const std::int8_t*>(v8q.data()), n_k, kDim),
                             view(static_cast<const float*>(vs.data()), n_k, 1),
                             view(vf.data(), n_k, kDim));
    row("int8 ChannelQuantizedKV (K channel/32 asym, V token)", kf, vf);
    const auto view4 = [&](auto* data, Index seq) {
      return blockattn::make_int4_tensor_view(data, 1, seq, kHeads, kDim);
    };
    std::vector<std::uint8_t> k4(static_cast<std::size_t>(n_k * kHeads * ((kDim + 1) / 2)));
    std::vector<std::uint8_t> v4(k4.size());
    std::vector<float> v_scale(static_cast<std::size_t>(n_k * kHeads * groups));
    blockattn::quantize_kv(view(in.k.data(), n_k, kDim), 0, view4(k4.data(), n_k),
                           view(k_scale.data(), blocks, kDim), view(k_zero.data(), blocks, kDim));
    blockattn::quantize_kv(view(in.v.data(), n_k, kDim), view4(v4.data(), n_k),
                           view(v_scale.data(), n_k, groups));
    const blockattn::Int4QuantizedKV cache4{
        view4(static_cast<const std::uint8_t*>(k4.data()), n_k),
        view(static_cast<const float*>(k_scale.data()), blocks, kDim),
        view(static_cast<const float*>(k_zero.data()), blocks, kDim),
        view4(static_cast<const std::uint8_t*>(v4.data()), n_k),
        view(static_cast<const float*>(v_scale.data()), n_k, groups)};
    blockattn::dequantize_kv(cache4.k, cache4.k_scale, cache4.k_zero, view(kf.data(), n_k, kDim));
    blockattn::dequantize_kv(cache4.v, cache4.v_scale, view(vf.data(), n_k, kDim));
    row("int4 Int4QuantizedKV (K channel/32 asym, V group32 q4_0)", kf, vf);
    row("int4 Int4QuantizedKV, K only", kf, in.v);
    row("int4 group32 K and V (q4_0 along d for both)",
        quantized(in.k, n_k, Grouping::kRowGroup32, 7, false),
        quantized(in.v, n_k, Grouping::kRowGroup32, 7, false));
    blockattn::attention(blockattn::make_tensor_view(in.q.data(), 1, kQueries, kHeads, kDim),
                         cache4,
                         blockattn::make_tensor_view(out.data(), 1, kQueries, kHeads, kDim));
    print_row(family, "int4 Int4QuantizedKV call in float", error_of(out, want));
  }
  return 0;
}
