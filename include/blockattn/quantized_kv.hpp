#pragma once
// int8 K/V caches: QuantizedKV (a view of the user's int8 keys and values with one float scale
// per token and kv head), quantize_kv() / dequantize_kv() to write and read one, and the
// attention() overload that reads it under float q and out.
//
// The format (per-token symmetric, as llama.cpp's and vLLM's int8 caches keep it): for batch b,
// token j and kv head h, element c of K is k_scale[b, j, h, 0] · k[b, j, h, c] and likewise for V;
// k and v are int8 [B, n_k, H_kv, d] (d_v for v) and the scales float [B, n_k, H_kv, 1], every
// view with strides of its own (BSHD, BHSD, a slice of a larger cache). The product is rounded
// once in float: dequantize_kv() writes exactly the floats the kernels compute with, so an int8
// call is bitwise the float call on dequantize_kv()'s output.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <blockattn/attention.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

/// An int8 K/V cache over the caller's memory (nothing is copied): k [B, n_k, H_kv, d] and
/// v [B, n_k, H_kv, d_v] int8, k_scale and v_scale [B, n_k, H_kv, 1] float; the value of an
/// element is its row's scale times the int8 (see the top of this header). Scales must be finite
/// with |scale|·128 finite (attention() checks).
struct QuantizedKV {
  /// Keys as int8, [B, n_k, H_kv, d].
  TensorView<const std::int8_t> k;
  /// One float scale per key row (token and kv head), [B, n_k, H_kv, 1].
  TensorView<const float> k_scale;
  /// Values as int8, [B, n_k, H_kv, d_v].
  TensorView<const std::int8_t> v;
  /// One float scale per value row (token and kv head), [B, n_k, H_kv, 1].
  TensorView<const float> v_scale;
};

namespace detail {

/// The largest |scale| whose products with every int8 (−128 too) stay finite.
inline constexpr float kMaxInt8Scale = std::numeric_limits<float>::max() / 128.0f;

/// The argument names of one scale view and its int8 view, for validate_scales' messages
/// (string literals: validation must not allocate).
struct ScaleNames {
  const char* name;
  const char* batch;
  const char* seq;
  const char* heads;
  const char* dim;
  const char* of_batch;
  const char* of_seq;
  const char* of_heads;
};
inline constexpr ScaleNames kKScaleNames{"k_scale",       "k_scale.batch", "k_scale.seq",
                                         "k_scale.heads", "k_scale.dim",   "k.batch",
                                         "k.seq",         "k.heads"};
inline constexpr ScaleNames kVScaleNames{"v_scale",       "v_scale.batch", "v_scale.seq",
                                         "v_scale.heads", "v_scale.dim",   "v.batch",
                                         "v.seq",         "v.heads"};

/// Checks a scale view against its int8 view `of`: sizes [B, n_k, H_kv, 1], data when not empty,
/// and every scale finite with |scale| <= kMaxInt8Scale.
inline void validate_scales(const char* function, const ScaleNames& n,
                            const TensorView<const float>& scale,
                            const TensorView<const std::int8_t>& of) {
  const char* const why = "one scale per token and kv head";
  require_size(function, n.batch, scale.batch, n.of_batch, of.batch, why);
  require_size(function, n.seq, scale.seq, n.of_seq, of.seq, why);
  require_size(function, n.heads, scale.heads, n.of_heads, of.heads, why);
  require_size(function, n.dim, scale.dim, "1", 1, why);
  if (scale.batch == 0 || scale.seq == 0 || scale.heads == 0) return;
  require(scale.data != nullptr, function, n.name, ".data is null for a non-empty cache [",
          scale.batch, ", ", scale.seq, ", ", scale.heads, ", 1]");
  for (Index b = 0; b < scale.batch; ++b) {
    for (Index j = 0; j < scale.seq; ++j) {
      for (Index h = 0; h < scale.heads; ++h) {
        const float s = *scale.at(b, j, h);
        require(std::isfinite(s) && std::abs(s) <= kMaxInt8Scale, function, n.name, "[", b, ", ", j,
                ", ", h, "] is ", s, " (a scale must be finite and at most ", kMaxInt8Scale,
                " in magnitude, so that every value is finite)");
      }
    }
  }
}

}  // namespace detail

/// Exact attention of float queries over an int8 K/V cache (QuantizedKV): as the TensorView
/// attention() on the dequantized cache, and bitwise equal to it (attention(q, k, v, out, …) with
/// k, v = dequantize_kv(kv.k, kv.k_scale), dequantize_kv(kv.v, kv.v_scale)), for every option,
/// mask and thread count. The cache is read in place: decode converts each int8 vector and
/// multiplies it by its row's scale in registers, prefill converts once per K/V tile.
/// q [B, n_q, H, d], out [B, n_q, H, d_v] float; lse (optional) [B, H, n_q].
/// Throws std::invalid_argument as attention() does, and also when a scale view's sizes differ
/// from [B, n_k, H_kv, 1], its data is null, or a scale is not finite or has |scale|·128 beyond
/// float; nothing is written then. Checking the scales reads every one: O(B·n_k·H_kv).
template <class QT, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const QuantizedKV& kv, TensorView<OT> out,
               const AttentionOptions& options = {}, Span<float> lse = {},
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<std::remove_const_t<QT>, float> && std::is_same_v<OT, float>,
                "blockattn: an int8 K/V cache (QuantizedKV) is read under float q and a writable "
                "float out (TensorView<float>)");
  detail::check_mods<float, MaskMod, ScoreMod>();
  const TensorView<const float> cq(q);
  detail::validate_attention<float>("attention", cq, kv.k, kv.v, out, options, lse);
  detail::validate_scales("attention", detail::kKScaleNames, kv.k_scale, kv.k);
  detail::validate_scales("attention", detail::kVScaleNames, kv.v_scale, kv.v);
  const detail::AddressRange out_range = detail::tensor_range(out);
  detail::require_disjoint("attention", "out", out_range, "k_scale",
                           detail::tensor_range(kv.k_scale));
  detail::require_disjoint("attention", "out", out_range, "v_scale",
                           detail::tensor_range(kv.v_scale));
  if (!lse.empty()) {
    const Index count = q.batch * q.heads * q.seq;
    const detail::AddressRange lse_range = detail::address_range(lse.data(), 1, count, count);
    detail::require_disjoint("attention", "lse", lse_range, "k_scale",
                             detail::tensor_range(kv.k_scale));
    detail::require_disjoint("attention", "lse", lse_range, "v_scale",
                             detail::tensor_range(kv.v_scale));
  }
  Workspace own;
  Workspace& workspace = options.workspace != nullptr ? *options.workspace : own;
  detail::attention_forward_sources(cq, detail::shapes_of(cq, kv.k, kv.v),
                                    detail::QuantizedKVHeads(kv.k, kv.v, kv.k_scale, kv.v_scale),
                                    out, options, detail::data_or_null(lse), mask_mod, score_mod,
                                    workspace);
}

/// Quantizes x [B, S, H, D] (float, Eigen::bfloat16 or Eigen::half) into q (int8, same sizes)
/// and scale ([B, S, H, 1] float), per row (token, head), symmetric: scale = max|x_row| / 127,
/// q = x / scale rounded to nearest (ties to even), so |x − scale·q| ≤ scale/2 up to float
/// rounding; a row of zeros gets scale 0 and q 0. Any strides (a one-token slice appends a token
/// to a cache in place). Throws std::invalid_argument naming the argument and both sizes when
/// sizes differ, data is null or x holds a non-finite value; nothing is written then. O(B·S·H·D).
template <class XT>
void quantize_kv(TensorView<XT> x, TensorView<std::int8_t> q, TensorView<float> scale) {
  using X = std::remove_const_t<XT>;
  static_assert(std::is_same_v<X, float> || detail::kIs16BitFloat<X>,
                "blockattn: quantize_kv reads float, Eigen::bfloat16 or Eigen::half");
  const char* const f = "quantize_kv";
  detail::require_size(f, "q.batch", q.batch, "x.batch", x.batch, "one int8 per element");
  detail::require_size(f, "q.seq", q.seq, "x.seq", x.seq, "one int8 per element");
  detail::require_size(f, "q.heads", q.heads, "x.heads", x.heads, "one int8 per element");
  detail::require_size(f, "q.dim", q.dim, "x.dim", x.dim, "one int8 per element");
  detail::require_size(f, "scale.batch", scale.batch, "x.batch", x.batch, "one scale per row");
  detail::require_size(f, "scale.seq", scale.seq, "x.seq", x.seq, "one scale per row");
  detail::require_size(f, "scale.heads", scale.heads, "x.heads", x.heads, "one scale per row");
  detail::require_size(f, "scale.dim", scale.dim, "1", 1, "one scale per row");
  detail::require(x.batch >= 0 && x.seq >= 0 && x.heads >= 0 && x.dim >= 0, f,
                  "x has a negative size");
  if (x.batch == 0 || x.seq == 0 || x.heads == 0) return;
  detail::require(scale.data != nullptr, f, "scale.data is null for a non-empty x");
  if (x.dim == 0) {
    for (Index b = 0; b < x.batch; ++b) {
      for (Index s = 0; s < x.seq; ++s) {
        for (Index h = 0; h < x.heads; ++h) *scale.at(b, s, h) = 0.0f;
      }
    }
    return;
  }
  detail::require(x.data != nullptr && q.data != nullptr, f,
                  "x.data or q.data is null for a non-empty x");
  for (Index b = 0; b < x.batch; ++b) {
    for (Index s = 0; s < x.seq; ++s) {
      for (Index h = 0; h < x.heads; ++h) {
        const X* row = x.at(b, s, h);
        for (Index c = 0; c < x.dim; ++c) {
          const float value = static_cast<float>(row[c]);
          detail::require(std::isfinite(value), f, "x[", b, ", ", s, ", ", h, ", ", c, "] is ",
                          value, " (only finite values can be quantized)");
        }
      }
    }
  }
  for (Index b = 0; b < x.batch; ++b) {
    for (Index s = 0; s < x.seq; ++s) {
      for (Index h = 0; h < x.heads; ++h) {
        const X* row = x.at(b, s, h);
        std::int8_t* out = q.at(b, s, h);
        float amax = 0.0f;
        for (Index c = 0; c < x.dim; ++c)
          amax = std::max(amax, std::abs(static_cast<float>(row[c])));
        const float sc = amax / 127.0f;
        *scale.at(b, s, h) = sc;
        for (Index c = 0; c < x.dim; ++c) {
          const float r = sc > 0.0f ? std::nearbyint(static_cast<float>(row[c]) / sc) : 0.0f;
          out[c] = static_cast<std::int8_t>(std::clamp(r, -127.0f, 127.0f));
        }
      }
    }
  }
}

/// out = the floats an int8 cache holds: out[b, s, h, c] = scale[b, s, h, 0] · q[b, s, h, c],
/// rounded once in float, exactly as attention() on a QuantizedKV computes them. Sizes as
/// quantize_kv (q and out [B, S, H, D], scale [B, S, H, 1]); throws std::invalid_argument naming
/// the argument and both sizes on a mismatch or null data, nothing written. O(B·S·H·D).
inline void dequantize_kv(TensorView<const std::int8_t> q, TensorView<const float> scale,
                          TensorView<float> out) {
  const char* const f = "dequantize_kv";
  detail::require_size(f, "out.batch", out.batch, "q.batch", q.batch, "one float per element");
  detail::require_size(f, "out.seq", out.seq, "q.seq", q.seq, "one float per element");
  detail::require_size(f, "out.heads", out.heads, "q.heads", q.heads, "one float per element");
  detail::require_size(f, "out.dim", out.dim, "q.dim", q.dim, "one float per element");
  detail::require_size(f, "scale.batch", scale.batch, "q.batch", q.batch, "one scale per row");
  detail::require_size(f, "scale.seq", scale.seq, "q.seq", q.seq, "one scale per row");
  detail::require_size(f, "scale.heads", scale.heads, "q.heads", q.heads, "one scale per row");
  detail::require_size(f, "scale.dim", scale.dim, "1", 1, "one scale per row");
  detail::require(q.batch >= 0 && q.seq >= 0 && q.heads >= 0 && q.dim >= 0, f,
                  "q has a negative size");
  if (q.batch == 0 || q.seq == 0 || q.heads == 0 || q.dim == 0) return;
  detail::require(q.data != nullptr && scale.data != nullptr && out.data != nullptr, f,
                  "q.data, scale.data or out.data is null for a non-empty q");
  for (Index b = 0; b < q.batch; ++b) {
    for (Index s = 0; s < q.seq; ++s) {
      for (Index h = 0; h < q.heads; ++h) {
        const std::int8_t* row = q.at(b, s, h);
        const float sc = *scale.at(b, s, h);
        float* dst = out.at(b, s, h);
        for (Index c = 0; c < q.dim; ++c) dst[c] = static_cast<float>(row[c]) * sc;
      }
    }
  }
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
