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
//
// ChannelQuantizedKV: the same values, with keys quantized per channel over blocks of
// kKeyBlockTokens tokens with a zero point (KIVI's key format, chosen by the error measured in
// docs/quantized_kv.md): element c of key j is k_scale[b, j/32, h, c]·(k[b, j, h, c] −
// k_zero[b, j/32, h, c]), the difference and the product each rounded once in float. Prefill
// dequantizes once per K tile and is bitwise the float call on dequantize_kv()'s cache; decode
// scales the query by each block's channel scales instead of the keys, so it matches that call
// within a stated tolerance (see its attention() overload).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

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

/// Every element of x [B, S, H, D] finite, else std::invalid_argument naming the first one.
template <class X>
void require_finite_input(const char* function, const TensorView<const X>& x) {
  for (Index b = 0; b < x.batch; ++b) {
    for (Index s = 0; s < x.seq; ++s) {
      for (Index h = 0; h < x.heads; ++h) {
        const X* row = x.at(b, s, h);
        for (Index c = 0; c < x.dim; ++c) {
          const float value = static_cast<float>(row[c]);
          require(std::isfinite(value), function, "x[", b, ", ", s, ", ", h, ", ", c, "] is ",
                  value, " (only finite values can be quantized)");
        }
      }
    }
  }
}

/// Checks that out and lse (optional: [B, H, n_q], count = B·H·n_q floats) overlap none of a
/// quantized cache's scale views `inputs` (name, address range), which validate_attention does
/// not see.
template <std::size_t N>
void require_outputs_disjoint(const char* function, const AddressRange& out_range, Span<float> lse,
                              Index count,
                              const std::pair<const char*, AddressRange> (&inputs)[N]) {
  const AddressRange lse_range =
      lse.empty() ? AddressRange{} : address_range(lse.data(), 1, count, count);
  for (const auto& [name, range] : inputs) {
    require_disjoint(function, "out", out_range, name, range);
    require_disjoint(function, "lse", lse_range, name, range);
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
  const std::pair<const char*, detail::AddressRange> scales[] = {
      {"k_scale", detail::tensor_range(kv.k_scale)}, {"v_scale", detail::tensor_range(kv.v_scale)}};
  detail::require_outputs_disjoint("attention", detail::tensor_range(out), lse,
                                   q.batch * q.heads * q.seq, scales);
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
  detail::require_finite_input(f, TensorView<const X>(x));
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

/// Tokens per block of a ChannelQuantizedKV's keys: each block of 32 tokens (from token 0) has
/// one scale and one zero point per kv head and channel.
inline constexpr Index kKeyBlockTokens = 32;

/// An int8 K/V cache over the caller's memory whose keys are quantized per channel over blocks
/// of kKeyBlockTokens tokens with a zero point, values per token as QuantizedKV's: k [B, n_k,
/// H_kv, d] int8, k_scale and k_zero [B, ceil(n_k / 32), H_kv, d] float (block, then channel),
/// v [B, n_k, H_kv, d_v] int8, v_scale [B, n_k, H_kv, 1] float, every view with strides of its
/// own. Key element value: k_scale·(float(k) − k_zero) in float (see the top of this header).
struct ChannelQuantizedKV {
  /// Keys as int8, [B, n_k, H_kv, d].
  TensorView<const std::int8_t> k;
  /// One scale per key block, kv head and channel, [B, ceil(n_k / 32), H_kv, d].
  TensorView<const float> k_scale;
  /// One zero point per key block, kv head and channel (in int8 steps), same sizes as k_scale.
  TensorView<const float> k_zero;
  /// Values as int8, [B, n_k, H_kv, d_v].
  TensorView<const std::int8_t> v;
  /// One float scale per value row (token and kv head), [B, n_k, H_kv, 1].
  TensorView<const float> v_scale;
};

namespace detail {

/// ceil(n / kKeyBlockTokens): the key blocks that n tokens reach.
constexpr Index key_blocks(Index n) { return (n + kKeyBlockTokens - 1) / kKeyBlockTokens; }

/// The argument names of a per-channel key parameter view (k_scale or k_zero), for
/// validate_key_block_sizes' messages (string literals: validation must not allocate).
struct KeyBlockNames {
  const char* name;
  const char* batch;
  const char* seq;
  const char* heads;
  const char* dim;
};
inline constexpr KeyBlockNames kKScaleBlockNames{"k_scale", "k_scale.batch", "k_scale.seq",
                                                 "k_scale.heads", "k_scale.dim"};
inline constexpr KeyBlockNames kKZeroBlockNames{"k_zero", "k_zero.batch", "k_zero.seq",
                                                "k_zero.heads", "k_zero.dim"};

/// Checks one per-channel key parameter view x (k_scale or k_zero) against the keys k (int8, or
/// 4-bit values in bytes for Int4QuantizedKV): sizes [B, ceil(n_k / 32), H_kv, d] and data when
/// not empty.
template <class K>
void validate_key_block_sizes(const char* function, const KeyBlockNames& n,
                              const TensorView<const float>& x, const TensorView<const K>& k) {
  const char* const why = "one per key block of 32 tokens, kv head and channel";
  require_size(function, n.batch, x.batch, "k.batch", k.batch, why);
  require_size(function, n.seq, x.seq, "ceil(k.seq / 32)", key_blocks(k.seq), why);
  require_size(function, n.heads, x.heads, "k.heads", k.heads, why);
  require_size(function, n.dim, x.dim, "k.dim", k.dim, why);
  if (x.batch == 0 || x.seq == 0 || x.heads == 0 || x.dim == 0) return;
  require(x.data != nullptr, function, n.name, ".data is null for a non-empty cache");
}

/// Checks the key block parameters [b, blk, h, ·] of the blocks for_each_block(f) names (calls
/// f(b, blk) for each): every scale and zero point finite, and the extreme values
/// scale·(q_min − zero) and scale·(q_max − zero) finite in float (then every key is:
/// |scale·(q − zero)| is largest at an end of the integer range, int8's [−128, 127] or int4's
/// [−8, 7]). scale_name, zero_name: the views' argument names in the message.
template <class ForEachBlock>
void validate_key_blocks(const char* function, const char* scale_name, const char* zero_name,
                         const TensorView<const float>& scale, const TensorView<const float>& zero,
                         const ForEachBlock& for_each_block, float q_min, float q_max) {
  // A branch-free scan first (NaN and ±inf fail the comparisons), since this reads 2·d floats
  // per 32 keys on every call; the loop below names the first bad pair only when there is one.
  constexpr float kMax = std::numeric_limits<float>::max();
  bool all_ok = true;
  for_each_block([&](Index b, Index blk) {
    for (Index h = 0; h < scale.heads; ++h) {
      const float* sc = scale.at(b, blk, h);
      const float* zp = zero.at(b, blk, h);
      for (Index c = 0; c < scale.dim; ++c) {
        // Named first: clang's -Wbitwise-instead-of-logical flags `&` between calls.
        const bool scale_ok = std::abs(sc[c]) <= kMax;
        const bool zero_ok = std::abs(zp[c]) <= kMax;
        const bool low_ok = std::abs(sc[c] * (q_min - zp[c])) <= kMax;
        const bool high_ok = std::abs(sc[c] * (q_max - zp[c])) <= kMax;
        all_ok &= scale_ok & zero_ok & low_ok & high_ok;
      }
    }
  });
  if (all_ok) return;
  for_each_block([&](Index b, Index blk) {
    for (Index h = 0; h < scale.heads; ++h) {
      const float* sc = scale.at(b, blk, h);
      const float* zp = zero.at(b, blk, h);
      for (Index c = 0; c < scale.dim; ++c) {
        const bool ok = std::isfinite(sc[c]) && std::isfinite(zp[c]) &&
                        std::isfinite(sc[c] * (q_min - zp[c])) &&
                        std::isfinite(sc[c] * (q_max - zp[c]));
        require(ok, function, scale_name, "[", b, ", ", blk, ", ", h, ", ", c, "] is ", sc[c],
                " and ", zero_name, "[", b, ", ", blk, ", ", h, ", ", c, "] is ", zp[c],
                " (both must be finite, and k_scale·(q − k_zero) finite for every q in [", q_min,
                ", ", q_max, "])");
      }
    }
  });
}

/// validate_key_blocks for blocks [block0, block1) of every batch entry of k_scale and k_zero.
inline void validate_key_block_values(const char* function, const TensorView<const float>& scale,
                                      const TensorView<const float>& zero, Index block0,
                                      Index block1, float q_min = -128.0f, float q_max = 127.0f) {
  validate_key_blocks(
      function, "k_scale", "k_zero", scale, zero,
      [&](auto&& f) {
        for (Index b = 0; b < scale.batch; ++b) {
          for (Index blk = block0; blk < block1; ++blk) f(b, blk);
        }
      },
      q_min, q_max);
}

/// Checks a cache's per-channel key parameters against its keys k (int8, or 4-bit values in
/// bytes): k_scale and k_zero sizes and data (validate_key_block_sizes) and every block's values
/// for integers in [q_min, q_max] (validate_key_block_values).
template <class K>
void validate_channel_keys(const char* function, const TensorView<const K>& k,
                           const TensorView<const float>& k_scale,
                           const TensorView<const float>& k_zero, float q_min, float q_max) {
  validate_key_block_sizes(function, kKScaleBlockNames, k_scale, k);
  validate_key_block_sizes(function, kKZeroBlockNames, k_zero, k);
  if (k.dim > 0) validate_key_block_values(function, k_scale, k_zero, 0, k_scale.seq, q_min, q_max);
}

/// One channel's parameters for values in [lo, hi]: scale (hi − lo)/254 and an integral zero
/// point so that every x in [lo, hi] maps to x/scale + zero in [−128, 127] up to float rounding
/// (lo to −127.5 + e, hi to 126.5 + e with |e| <= 1/2 from rounding the zero point: 254 steps
/// and that shift fit in int8's 255, so nothing clamps and the error is <= scale/2); a constant
/// channel is symmetric (|x|/127, zero 0); all zero: scale 0, zero 0.
inline void key_channel_params(float lo, float hi, float* scale, float* zero) {
  float s = static_cast<float>((static_cast<double>(hi) - static_cast<double>(lo)) / 254.0);
  float z = 0.0f;
  if (s > 0.0f) {
    z = static_cast<float>(
        std::nearbyint(-127.5 - static_cast<double>(lo) / static_cast<double>(s)));
  } else {
    s = std::max(std::abs(lo), std::abs(hi)) / 127.0f;  // constant (or subnormal) channel
  }
  *scale = s;
  *zero = z;
}

/// The int8 of x under (scale, zero): x/scale + zero rounded to nearest (ties to even) in double,
/// clamped to [−128, 127]; 0 when scale is 0.
inline std::int8_t quantize_key(float x, float scale, float zero) {
  if (!(scale > 0.0f)) return 0;
  const double r = std::nearbyint(static_cast<double>(x) / static_cast<double>(scale) +
                                  static_cast<double>(zero));
  return static_cast<std::int8_t>(std::clamp(r, -128.0, 127.0));
}

}  // namespace detail

namespace detail {

/// ChannelQuantizedKV's key codec for append_channel_keys: one int8 per element, integral zero
/// points (key_channel_params, quantize_key).
struct Int8KeyCodec {
  using Byte = std::int8_t;
  static constexpr float kMin = -128.0f;
  static constexpr float kMax = 127.0f;
  static constexpr const char* kPerElement = "one int8 per element";
  /// Prepares a new row before its elements are set (nothing: every byte is set).
  static void clear_row(Byte*, Index) {}
  static float get(const Byte* row, Index c, Index) { return static_cast<float>(row[c]); }
  static void set(Byte* row, Index c, Index, float x, float scale, float zero) {
    row[c] = quantize_key(x, scale, zero);
  }
  static void params(float lo, float hi, float* scale, float* zero) {
    key_channel_params(lo, hi, scale, zero);
  }
};

/// quantize_kv() for per-channel keys, over a key codec (Int8KeyCodec; Int4KeyCodec of
/// int4_kv.hpp): appends x as tokens [position, position + x.seq) of k, k_scale and k_zero (see
/// the ChannelQuantizedKV overload of quantize_kv for the contract). Codec: Byte (k's element),
/// kMin / kMax (the integer range), kPerElement (the size message), clear_row(row, dim), get(row,
/// c, dim), set(row, c, dim, x, scale, zero) and params(lo, hi, &scale, &zero).
template <class Codec, class XT>
void append_channel_keys(TensorView<XT> x, Index position, TensorView<typename Codec::Byte> k,
                         TensorView<float> k_scale, TensorView<float> k_zero) {
  using X = std::remove_const_t<XT>;
  static_assert(std::is_same_v<X, float> || kIs16BitFloat<X>,
                "blockattn: quantize_kv reads float, Eigen::bfloat16 or Eigen::half");
  const char* const f = "quantize_kv";
  require(x.batch >= 0 && x.seq >= 0 && x.heads >= 0 && x.dim >= 0, f, "x has a negative size");
  require(position >= 0, f, "position is ", position, " (must be >= 0)");
  const Index end = position + x.seq;
  const char* const why = Codec::kPerElement;
  require_size(f, "k.batch", k.batch, "x.batch", x.batch, why);
  require_size(f, "k.heads", k.heads, "x.heads", x.heads, why);
  require_size(f, "k.dim", k.dim, "x.dim", x.dim, why);
  require(k.seq >= end, f, "k.seq is ", k.seq, " but position + x.seq is ", end,
          " (the cache must hold the appended tokens)");
  const char* const names[][4] = {{"k_scale.batch", "k_scale.seq", "k_scale.heads", "k_scale.dim"},
                                  {"k_zero.batch", "k_zero.seq", "k_zero.heads", "k_zero.dim"}};
  const TensorView<float>* params[] = {&k_scale, &k_zero};
  for (int i = 0; i < 2; ++i) {
    const TensorView<float>& p = *params[i];
    const char* const per = "one per key block of 32 tokens, head and channel";
    require_size(f, names[i][0], p.batch, "x.batch", x.batch, per);
    require_size(f, names[i][2], p.heads, "x.heads", x.heads, per);
    require_size(f, names[i][3], p.dim, "x.dim", x.dim, per);
    require(p.seq >= key_blocks(end), f, names[i][1], " is ", p.seq,
            " but ceil((position + x.seq) / 32) is ", key_blocks(end), " (", per, ")");
  }
  if (x.batch == 0 || x.seq == 0 || x.heads == 0 || x.dim == 0) return;
  require(
      x.data != nullptr && k.data != nullptr && k_scale.data != nullptr && k_zero.data != nullptr,
      f, "x.data, k.data, k_scale.data or k_zero.data is null for a non-empty x");
  require_finite_input(f, TensorView<const X>(x));
  const Index open = position % kKeyBlockTokens;  // tokens already in the first block
  if (open > 0) {
    const Index blk = position / kKeyBlockTokens;
    validate_key_block_values(f, TensorView<const float>(k_scale), TensorView<const float>(k_zero),
                              blk, blk + 1, Codec::kMin, Codec::kMax);
  }
  const Index dim = x.dim;
  for (Index b = 0; b < x.batch; ++b) {
    for (Index h = 0; h < x.heads; ++h) {
      for (Index t = position; t < end; ++t) Codec::clear_row(k.at(b, t, h), dim);
      for (Index t0 = position - open; t0 < end; t0 += kKeyBlockTokens) {
        const Index blk = t0 / kKeyBlockTokens;
        const Index first_new = std::max(t0, position);  // earlier tokens of the block are old
        const Index last = std::min(t0 + kKeyBlockTokens, end);
        float* scale = k_scale.at(b, blk, h);
        float* zero = k_zero.at(b, blk, h);
        for (Index c = 0; c < dim; ++c) {
          float lo = std::numeric_limits<float>::infinity();
          float hi = -lo;
          for (Index t = first_new; t < last; ++t) {
            const float value = static_cast<float>(x.at(b, t - position, h)[c]);
            lo = std::min(lo, value);
            hi = std::max(hi, value);
          }
          const float old_scale = scale[c];
          const float old_zero = zero[c];
          const auto old_value = [&](Index t) {
            return old_scale * (Codec::get(k.at(b, t, h), c, dim) - old_zero);
          };
          bool requantize = false;
          if (first_new > t0) {
            const float a = old_scale * (Codec::kMin - old_zero);
            const float z = old_scale * (Codec::kMax - old_zero);
            requantize = !(old_scale > 0.0f && lo >= std::min(a, z) && hi <= std::max(a, z));
            if (requantize) {
              for (Index t = t0; t < first_new; ++t) {
                lo = std::min(lo, old_value(t));
                hi = std::max(hi, old_value(t));
              }
            }
          }
          if (first_new == t0 || requantize) Codec::params(lo, hi, scale + c, zero + c);
          if (requantize) {
            for (Index t = t0; t < first_new; ++t) {
              Codec::set(k.at(b, t, h), c, dim, old_value(t), scale[c], zero[c]);
            }
          }
          for (Index t = first_new; t < last; ++t) {
            Codec::set(k.at(b, t, h), c, dim, static_cast<float>(x.at(b, t - position, h)[c]),
                       scale[c], zero[c]);
          }
        }
      }
    }
  }
}

}  // namespace detail

/// Exact attention of float queries over an int8 cache with per-channel keys
/// (ChannelQuantizedKV). Prefill (more than 8 query rows per kv head) dequantizes each K tile
/// once into the packed panel and is bitwise the TensorView attention() on
/// dequantize_kv(kv.k, kv.k_scale, kv.k_zero) and dequantize_kv(kv.v, kv.v_scale). Decode (at
/// most 8 rows per kv head) reads the int8 keys raw: per 32-key block the scaled query is
/// multiplied by the block's channel scales and the zero points become one dot product per row,
/// score = (q∘scale)·k8 − q·(scale∘zero); that is the same real number rounded in another order,
/// so decode matches the float call within attention_tolerance with A taken over
/// Σ_c |q_c·scale_c|·(|k8_c| + |zero_c|) (the terms actually summed), not bitwise. Sizes and
/// the rest as the QuantizedKV overload. Throws std::invalid_argument as that overload does, and
/// when k_scale or k_zero is not [B, ceil(n_k / 32), H_kv, d], null, not finite, or makes a key
/// non-finite; nothing is written then. Checking reads every scale: O(B·n_k·H_kv·(1 + d/32)).
template <class QT, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const ChannelQuantizedKV& kv, TensorView<OT> out,
               const AttentionOptions& options = {}, Span<float> lse = {},
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<std::remove_const_t<QT>, float> && std::is_same_v<OT, float>,
                "blockattn: an int8 K/V cache (ChannelQuantizedKV) is read under float q and a "
                "writable float out (TensorView<float>)");
  detail::check_mods<float, MaskMod, ScoreMod>();
  const TensorView<const float> cq(q);
  detail::validate_attention<float>("attention", cq, kv.k, kv.v, out, options, lse);
  detail::validate_channel_keys("attention", kv.k, kv.k_scale, kv.k_zero, -128.0f, 127.0f);
  detail::validate_scales("attention", detail::kVScaleNames, kv.v_scale, kv.v);
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
      detail::ChannelQuantizedKVHeads(kv.k, kv.k_scale, kv.k_zero, kKeyBlockTokens, kv.v,
                                      kv.v_scale),
      out, options, detail::data_or_null(lse), mask_mod, score_mod, workspace);
}

/// Appends keys x [B, S, H, D] (float, Eigen::bfloat16 or Eigen::half) as tokens [position,
/// position + S) of a per-channel key cache: k [B, ≥ position + S, H, D] int8, k_scale and k_zero
/// [B, ≥ ceil((position + S) / 32), H, D] float (capacity views; tokens before `position` must
/// have been written by this function). Each 32-token block gets, per head and channel, scale =
/// (max − min)/254 and an integral zero point (|x − scale·(q − zero)| <= scale/2 plus float
/// roundings; a constant channel |x|/127 and zero 0). A block that already holds tokens (position
/// not a multiple of 32, the open block of a growing cache) keeps its scale and zero point when
/// the new tokens fit its range, leaving its tokens' bits alone; otherwise the block is
/// re-quantized over the union of its dequantized tokens and the new ones, which adds at most
/// the new scale/2 to each earlier token (docs/quantized_kv.md measures the effect). Throws
/// std::invalid_argument naming the argument and the sizes when sizes do not fit, data is null,
/// position < 0, x is not finite, or the open block's parameters are not finite; nothing is
/// written then. O(B·H·D·(S + 32)), no allocation.
template <class XT>
void quantize_kv(TensorView<XT> x, Index position, TensorView<std::int8_t> k,
                 TensorView<float> k_scale, TensorView<float> k_zero) {
  detail::append_channel_keys<detail::Int8KeyCodec>(x, position, k, k_scale, k_zero);
}

/// out = the floats a per-channel int8 key cache holds: out[b, j, h, c] = k_scale[b, j/32, h, c]·
/// (float(k[b, j, h, c]) − k_zero[b, j/32, h, c]), the difference and the product each rounded
/// once in float, exactly as attention() on a ChannelQuantizedKV packs them for prefill. k and
/// out [B, S, H, D], k_scale and k_zero [B, ceil(S / 32), H, D]; throws std::invalid_argument
/// naming the argument and both sizes on a mismatch or null data, nothing written. O(B·S·H·D).
inline void dequantize_kv(TensorView<const std::int8_t> k, TensorView<const float> k_scale,
                          TensorView<const float> k_zero, TensorView<float> out) {
  const char* const f = "dequantize_kv";
  detail::require_size(f, "out.batch", out.batch, "k.batch", k.batch, "one float per element");
  detail::require_size(f, "out.seq", out.seq, "k.seq", k.seq, "one float per element");
  detail::require_size(f, "out.heads", out.heads, "k.heads", k.heads, "one float per element");
  detail::require_size(f, "out.dim", out.dim, "k.dim", k.dim, "one float per element");
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
        const std::int8_t* row = k.at(b, j, h);
        const float* scale = k_scale.at(b, j / kKeyBlockTokens, h);
        const float* zero = k_zero.at(b, j / kKeyBlockTokens, h);
        float* dst = out.at(b, j, h);
        for (Index c = 0; c < k.dim; ++c) {
          dst[c] = scale[c] * (static_cast<float>(row[c]) - zero[c]);
        }
      }
    }
  }
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
