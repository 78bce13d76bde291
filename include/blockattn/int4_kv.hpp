#pragma once
// int4 K/V caches: Int4QuantizedKV (a view of the user's 4-bit keys and values with their float
// scales), quantize_kv() / dequantize_kv() to write and read one, and the attention() overload
// that reads it under float q and out.
//
// The format (docs/quantized_kv.md measures why): signed 4-bit values q in [−8, 7], two per byte
// (detail/int4.hpp: groups of 32 values, byte i of a group holds value i low and value i + 16
// high, as ggml's q4_0; a row of dim values is ceil(dim / 2) bytes).
//  - Keys per channel over blocks of kKeyBlockTokens = 32 tokens with a zero point, as
//    ChannelQuantizedKV's int8 keys: element c of key j is k_scale[b, j/32, h, c]·(float(q) −
//    k_zero[b, j/32, h, c]), the difference and the product each rounded once in float.
//  - Values per token in groups of 32 consecutive channels, symmetric (q4_0): element c of value
//    j is v_scale[b, j, h, c/32]·float(q), rounded once. When 32 does not divide d_v, the last
//    group of a row is shorter (d_v mod 32 values) and has a scale of its own.
// The 4-bit views are TensorView<const std::uint8_t> whose dim counts 4-bit values and whose
// strides count bytes (make_int4_tensor_view for a contiguous one). Prefill dequantizes once per
// K/V tile and decode a run of 32 rows at a time into a buffer that stays in L1, both into
// exactly dequantize_kv()'s floats, so an int4 call is bitwise the float call on the dequantized
// cache.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include <blockattn/attention.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/detail/int4.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/quantized_kv.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

/// Values per group of an int4 value row: one float scale per 32 consecutive channels.
inline constexpr Index kInt4Group = detail::kInt4Group;

/// A view of a contiguous [batch, seq, heads, dim] buffer of 4-bit values (Int4QuantizedKV's k
/// and v): dim counts values, each (b, s, h) row is ceil(dim / 2) bytes and the strides count
/// bytes. T: std::uint8_t or const std::uint8_t. O(1), no copy.
template <class T>
TensorView<T> make_int4_tensor_view(T* data, Index batch, Index seq, Index heads, Index dim) {
  static_assert(std::is_same_v<std::remove_const_t<T>, std::uint8_t>,
                "blockattn: 4-bit values are stored in std::uint8_t bytes");
  const Index row = detail::int4_row_bytes(dim);
  return TensorView<T>(data, batch, seq, heads, dim, /*batch_stride=*/seq * heads * row,
                       /*seq_stride=*/heads * row, /*head_stride=*/row);
}

/// An int4 K/V cache over the caller's memory (nothing is copied): k [B, n_k, H_kv, d] and
/// v [B, n_k, H_kv, d_v] of 4-bit values (dim counts values, strides count bytes, rows of
/// ceil(dim / 2) bytes), k_scale and k_zero [B, ceil(n_k / 32), H_kv, d] float (key block, then
/// channel), v_scale [B, n_k, H_kv, ceil(d_v / 32)] float (token, then channel group); every view
/// with strides of its own. Element values: see the top of this header. Scales and zero points
/// must give finite values for every q in [−8, 7] (attention() checks).
struct Int4QuantizedKV {
  /// Keys as 4-bit values, [B, n_k, H_kv, d].
  TensorView<const std::uint8_t> k;
  /// One scale per key block of 32 tokens, kv head and channel, [B, ceil(n_k / 32), H_kv, d].
  TensorView<const float> k_scale;
  /// One zero point per key block, kv head and channel (in 4-bit steps), as k_scale.
  TensorView<const float> k_zero;
  /// Values as 4-bit values, [B, n_k, H_kv, d_v].
  TensorView<const std::uint8_t> v;
  /// One scale per value row and group of 32 channels, [B, n_k, H_kv, ceil(d_v / 32)].
  TensorView<const float> v_scale;
};

namespace detail {

/// The largest |scale| of an int4 value group whose products with every q in [−8, 7] are finite.
inline constexpr float kMaxInt4Scale = std::numeric_limits<float>::max() / 8.0f;

/// Checks the values' group scales against the 4-bit values v: sizes [B, n_k, H_kv,
/// ceil(d_v / 32)], data when not empty, every scale finite with |scale| <= kMaxInt4Scale.
inline void validate_int4_value_scales(const char* function, const TensorView<const float>& scale,
                                       const TensorView<const std::uint8_t>& v) {
  const char* const why = "one scale per value row and group of 32 channels";
  require_size(function, "v_scale.batch", scale.batch, "v.batch", v.batch, why);
  require_size(function, "v_scale.seq", scale.seq, "v.seq", v.seq, why);
  require_size(function, "v_scale.heads", scale.heads, "v.heads", v.heads, why);
  require_size(function, "v_scale.dim", scale.dim, "ceil(v.dim / 32)", int4_groups(v.dim), why);
  if (scale.batch == 0 || scale.seq == 0 || scale.heads == 0 || scale.dim == 0) return;
  require(scale.data != nullptr, function, "v_scale.data is null for a non-empty cache [",
          scale.batch, ", ", scale.seq, ", ", scale.heads, ", ", scale.dim, "]");
  // A branch-free scan first (NaN fails the comparison): decode reads d_v/32 scales per token,
  // so a per-scale branch would cost a visible part of the call; the loop below names the first
  // bad scale only when there is one.
  bool ok = true;
  for (Index b = 0; b < scale.batch; ++b) {
    for (Index j = 0; j < scale.seq; ++j) {
      for (Index h = 0; h < scale.heads; ++h) {
        const float* s = scale.at(b, j, h);
        for (Index g = 0; g < scale.dim; ++g) ok &= std::abs(s[g]) <= kMaxInt4Scale;
      }
    }
  }
  if (ok) return;
  for (Index b = 0; b < scale.batch; ++b) {
    for (Index j = 0; j < scale.seq; ++j) {
      for (Index h = 0; h < scale.heads; ++h) {
        const float* s = scale.at(b, j, h);
        for (Index g = 0; g < scale.dim; ++g) {
          require(std::isfinite(s[g]) && std::abs(s[g]) <= kMaxInt4Scale, function, "v_scale[", b,
                  ", ", j, ", ", h, ", ", g, "] is ", s[g], " (a scale must be finite and at most ",
                  kMaxInt4Scale, " in magnitude, so that every value is finite)");
        }
      }
    }
  }
}

/// One int4 key channel's parameters for values in [lo, hi]: scale (hi − lo)/15 and zero point
/// −8 − lo/scale (a float: all 16 levels are used, lo maps to −8 and hi to 7 up to float
/// rounding, so |x − scale·(q − zero)| <= scale/2 plus roundings); a constant channel is
/// symmetric (|x|/7, zero 0); all zero: scale 0, zero 0.
inline void int4_key_channel_params(float lo, float hi, float* scale, float* zero) {
  float s = static_cast<float>((static_cast<double>(hi) - static_cast<double>(lo)) / 15.0);
  float z = 0.0f;
  if (s > 0.0f) {
    z = static_cast<float>(-8.0 - static_cast<double>(lo) / static_cast<double>(s));
  } else {
    s = std::max(std::abs(lo), std::abs(hi)) / 7.0f;  // constant (or subnormal) channel
  }
  *scale = s;
  *zero = z;
}

/// The 4-bit q of x under (scale, zero): x/scale + zero rounded to nearest (ties to even) in
/// double, clamped to [−8, 7]; 0 when scale is 0.
inline int quantize_int4_key(float x, float scale, float zero) {
  if (!(scale > 0.0f)) return 0;
  const double r = std::nearbyint(static_cast<double>(x) / static_cast<double>(scale) +
                                  static_cast<double>(zero));
  return static_cast<int>(std::clamp(r, -8.0, 7.0));
}

/// Int4QuantizedKV's key codec for append_channel_keys (quantized_kv.hpp): 4-bit values two per
/// byte, float zero points (int4_key_channel_params, quantize_int4_key).
struct Int4KeyCodec {
  using Byte = std::uint8_t;
  static constexpr float kMin = -8.0f;
  static constexpr float kMax = 7.0f;
  static constexpr const char* kPerElement = "one 4-bit value per element";
  /// Zeroes a new row before its values are set, so that an unused nibble reads 0.
  static void clear_row(Byte* row, Index dim) {
    std::memset(row, 0, static_cast<std::size_t>(int4_row_bytes(dim)));
  }
  static float get(const Byte* row, Index c, Index dim) {
    return static_cast<float>(int4_get(row, c, dim));
  }
  static void set(Byte* row, Index c, Index dim, float x, float scale, float zero) {
    int4_set(row, c, dim, quantize_int4_key(x, scale, zero));
  }
  static void params(float lo, float hi, float* scale, float* zero) {
    int4_key_channel_params(lo, hi, scale, zero);
  }
};

}  // namespace detail

/// Exact attention of float queries over an int4 K/V cache (Int4QuantizedKV): as the TensorView
/// attention() on the dequantized cache and bitwise equal to it (attention(q, k, v, out, …) with
/// k = dequantize_kv(kv.k, kv.k_scale, kv.k_zero), v = dequantize_kv(kv.v, kv.v_scale)), for
/// every option, mask, thread count, prefill and decode. Prefill dequantizes once per K/V tile
/// into the packed panels; decode (at most 8 query rows per kv head) 32 rows at a time into an L1
/// buffer read by the float kernels. q [B, n_q, H, d], out [B, n_q, H, d_v] float; lse (optional)
/// [B, H, n_q]. Throws std::invalid_argument as attention() does (k's and v's rows are the
/// ceil(dim / 2) bytes they hold when checked against out and lse), and also when a scale
/// or zero point view's sizes differ from those of Int4QuantizedKV, its data is null, or a scale
/// or zero point is not finite or makes a value non-finite; nothing is written then. Checking
/// reads every scale: O(B·n_k·H_kv·(d/32 + d_v/32)); one extra buffer, none per call beyond the
/// float call's workspace.
template <class QT, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const Int4QuantizedKV& kv, TensorView<OT> out,
               const AttentionOptions& options = {}, Span<float> lse = {},
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<std::remove_const_t<QT>, float> && std::is_same_v<OT, float>,
                "blockattn: an int4 K/V cache (Int4QuantizedKV) is read under float q and a "
                "writable float out (TensorView<float>)");
  detail::check_mods<float, MaskMod, ScoreMod>();
  const TensorView<const float> cq(q);
  detail::validate_attention<float>("attention", cq, kv.k, kv.v, out, options, lse,
                                    /*lse_required=*/false, /*kv_values_per_element=*/2);
  detail::validate_channel_keys("attention", kv.k, kv.k_scale, kv.k_zero, -8.0f, 7.0f);
  detail::validate_int4_value_scales("attention", kv.v_scale, kv.v);
  const std::pair<const char*, detail::AddressRange> scales[] = {
      {"k_scale", detail::tensor_range(kv.k_scale)},
      {"k_zero", detail::tensor_range(kv.k_zero)},
      {"v_scale", detail::tensor_range(kv.v_scale)}};
  detail::require_outputs_disjoint("attention", detail::tensor_range(out), lse,
                                   q.batch * q.heads * q.seq, scales);
  Workspace own;
  Workspace& workspace = options.workspace != nullptr ? *options.workspace : own;
  detail::attention_forward_sources(
      cq, detail::shapes_of(cq, kv.k, kv.v),
      detail::Int4KVHeads(kv.k, kv.k_scale, kv.k_zero, kKeyBlockTokens, kv.v, kv.v_scale), out,
      options, detail::data_or_null(lse), mask_mod, score_mod, workspace);
}

/// Quantizes values x [B, S, H, D] (float, Eigen::bfloat16 or Eigen::half) into v (4-bit values,
/// [B, S, H, D], make_int4_tensor_view) and v_scale ([B, S, H, ceil(D / 32)] float), per row and
/// group of 32 channels (the last one shorter when 32 does not divide D), symmetric as ggml's
/// q4_0: the group's value m of largest magnitude sets scale = −m/8, q = x/scale rounded to
/// nearest (ties to even) and clamped to [−8, 7], so m maps to −8 and |x − scale·q| <=
/// |scale|/2 except at +|m|'s side (<= |scale|) up to float rounding; a group of zeros gets scale
/// 0. Rows are independent: a one-token slice appends a token in place. Throws
/// std::invalid_argument naming the argument and both sizes when sizes differ, data is null or x
/// holds a non-finite value; nothing is written then. O(B·S·H·D), no allocation.
template <class XT>
void quantize_kv(TensorView<XT> x, TensorView<std::uint8_t> v, TensorView<float> v_scale) {
  using X = std::remove_const_t<XT>;
  static_assert(std::is_same_v<X, float> || detail::kIs16BitFloat<X>,
                "blockattn: quantize_kv reads float, Eigen::bfloat16 or Eigen::half");
  const char* const f = "quantize_kv";
  const char* const why = "one 4-bit value per element";
  detail::require(x.batch >= 0 && x.seq >= 0 && x.heads >= 0 && x.dim >= 0, f,
                  "x has a negative size");
  detail::require_size(f, "v.batch", v.batch, "x.batch", x.batch, why);
  detail::require_size(f, "v.seq", v.seq, "x.seq", x.seq, why);
  detail::require_size(f, "v.heads", v.heads, "x.heads", x.heads, why);
  detail::require_size(f, "v.dim", v.dim, "x.dim", x.dim, why);
  const char* const per = "one scale per row and group of 32 channels";
  detail::require_size(f, "v_scale.batch", v_scale.batch, "x.batch", x.batch, per);
  detail::require_size(f, "v_scale.seq", v_scale.seq, "x.seq", x.seq, per);
  detail::require_size(f, "v_scale.heads", v_scale.heads, "x.heads", x.heads, per);
  detail::require_size(f, "v_scale.dim", v_scale.dim, "ceil(x.dim / 32)",
                       detail::int4_groups(x.dim), per);
  if (x.batch == 0 || x.seq == 0 || x.heads == 0 || x.dim == 0) return;
  detail::require(x.data != nullptr && v.data != nullptr && v_scale.data != nullptr, f,
                  "x.data, v.data or v_scale.data is null for a non-empty x");
  detail::require_finite_input(f, TensorView<const X>(x));
  for (Index b = 0; b < x.batch; ++b) {
    for (Index s = 0; s < x.seq; ++s) {
      for (Index h = 0; h < x.heads; ++h) {
        const X* row = x.at(b, s, h);
        std::uint8_t* out = v.at(b, s, h);
        float* scale = v_scale.at(b, s, h);
        std::memset(out, 0, static_cast<std::size_t>(detail::int4_row_bytes(x.dim)));
        for (Index g0 = 0; g0 < x.dim; g0 += kInt4Group) {
          const Index end = std::min(g0 + kInt4Group, x.dim);
          float m = 0.0f;
          for (Index c = g0; c < end; ++c) {
            const float value = static_cast<float>(row[c]);
            if (std::abs(value) > std::abs(m)) m = value;
          }
          const float sc = m / -8.0f;
          scale[g0 / kInt4Group] = sc;
          for (Index c = g0; c < end; ++c) {
            const float r = sc != 0.0f ? std::nearbyint(static_cast<float>(row[c]) / sc) : 0.0f;
            detail::int4_set(out, c, x.dim, static_cast<int>(std::clamp(r, -8.0f, 7.0f)));
          }
        }
      }
    }
  }
}

/// Appends keys x [B, S, H, D] (float, Eigen::bfloat16 or Eigen::half) as tokens [position,
/// position + S) of an int4 per-channel key cache: k [B, ≥ position + S, H, D] 4-bit values
/// (make_int4_tensor_view), k_scale and k_zero [B, ≥ ceil((position + S) / 32), H, D] float
/// (capacity views; tokens before `position` must have been written by this function). Each
/// 32-token block gets, per head and channel, scale = (max − min)/15 and zero point −8 − min/scale
/// (|x − scale·(q − zero)| <= scale/2 plus float roundings; a constant channel |x|/7 and zero 0).
/// The open block of a growing cache (position not a multiple of 32) keeps its scale and zero
/// point when the new tokens fit its range, leaving its tokens' bits alone; otherwise it is
/// re-quantized over its dequantized tokens and the new ones (as ChannelQuantizedKV's
/// quantize_kv; docs/quantized_kv.md). Throws std::invalid_argument naming the argument and the
/// sizes when sizes do not fit, data is null, position < 0, x is not finite, or the open block's
/// parameters are not finite; nothing is written then. O(B·H·D·(S + 32)), no allocation.
template <class XT>
void quantize_kv(TensorView<XT> x, Index position, TensorView<std::uint8_t> k,
                 TensorView<float> k_scale, TensorView<float> k_zero) {
  detail::append_channel_keys<detail::Int4KeyCodec>(x, position, k, k_scale, k_zero);
}

/// out = the floats an int4 value cache holds: out[b, s, h, c] = v_scale[b, s, h, c/32]·float(q),
/// rounded once in float, exactly as attention() on an Int4QuantizedKV computes them. v and out
/// [B, S, H, D], v_scale [B, S, H, ceil(D / 32)]; throws std::invalid_argument naming the argument
/// and both sizes on a mismatch or null data, nothing written. O(B·S·H·D).
inline void dequantize_kv(TensorView<const std::uint8_t> v, TensorView<const float> v_scale,
                          TensorView<float> out) {
  const char* const f = "dequantize_kv";
  const char* const why = "one float per element";
  detail::require_size(f, "out.batch", out.batch, "v.batch", v.batch, why);
  detail::require_size(f, "out.seq", out.seq, "v.seq", v.seq, why);
  detail::require_size(f, "out.heads", out.heads, "v.heads", v.heads, why);
  detail::require_size(f, "out.dim", out.dim, "v.dim", v.dim, why);
  detail::require(v.batch >= 0 && v.seq >= 0 && v.heads >= 0 && v.dim >= 0, f,
                  "v has a negative size");
  const char* const per = "one scale per row and group of 32 channels";
  detail::require_size(f, "v_scale.batch", v_scale.batch, "v.batch", v.batch, per);
  detail::require_size(f, "v_scale.seq", v_scale.seq, "v.seq", v.seq, per);
  detail::require_size(f, "v_scale.heads", v_scale.heads, "v.heads", v.heads, per);
  detail::require_size(f, "v_scale.dim", v_scale.dim, "ceil(v.dim / 32)",
                       detail::int4_groups(v.dim), per);
  if (v.batch == 0 || v.seq == 0 || v.heads == 0 || v.dim == 0) return;
  detail::require(v.data != nullptr && v_scale.data != nullptr && out.data != nullptr, f,
                  "v.data, v_scale.data or out.data is null for a non-empty v");
  for (Index b = 0; b < v.batch; ++b) {
    for (Index s = 0; s < v.seq; ++s) {
      for (Index h = 0; h < v.heads; ++h) {
        detail::int4_row_groups(v.at(b, s, h), v.dim, v_scale.at(b, s, h), out.at(b, s, h));
      }
    }
  }
}

/// out = the floats an int4 per-channel key cache holds: out[b, j, h, c] = k_scale[b, j/32, h,
/// c]·(float(q) − k_zero[b, j/32, h, c]), the difference and the product each rounded once in
/// float, exactly as attention() on an Int4QuantizedKV computes them. k and out [B, S, H, D],
/// k_scale and k_zero [B, ceil(S / 32), H, D]; throws std::invalid_argument naming the argument
/// and both sizes on a mismatch or null data, nothing written. O(B·S·H·D).
inline void dequantize_kv(TensorView<const std::uint8_t> k, TensorView<const float> k_scale,
                          TensorView<const float> k_zero, TensorView<float> out) {
  const char* const f = "dequantize_kv";
  const char* const why = "one float per element";
  detail::require_size(f, "out.batch", out.batch, "k.batch", k.batch, why);
  detail::require_size(f, "out.seq", out.seq, "k.seq", k.seq, why);
  detail::require_size(f, "out.heads", out.heads, "k.heads", k.heads, why);
  detail::require_size(f, "out.dim", out.dim, "k.dim", k.dim, why);
  detail::require(k.batch >= 0 && k.seq >= 0 && k.heads >= 0 && k.dim >= 0, f,
                  "k has a negative size");
  detail::validate_key_block_sizes(f, detail::kKScaleBlockNames, k_scale, k);
  detail::validate_key_block_sizes(f, detail::kKZeroBlockNames, k_zero, k);
  if (k.batch == 0 || k.seq == 0 || k.heads == 0 || k.dim == 0) return;
  detail::require(k.data != nullptr && out.data != nullptr, f,
                  "k.data or out.data is null for a non-empty k");
  for (Index b = 0; b < k.batch; ++b) {
    for (Index j = 0; j < k.seq; ++j) {
      for (Index h = 0; h < k.heads; ++h) {
        detail::int4_row_channels(k.at(b, j, h), k.dim, k_scale.at(b, j / kKeyBlockTokens, h),
                                  k_zero.at(b, j / kKeyBlockTokens, h), out.at(b, j, h));
      }
    }
  }
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
