#pragma once
// The differential check shared by the libFuzzer target (fuzz_attention.cpp, clang only) and the
// corpus replay test (fuzz_replay.cpp, every compiler): bytes -> a small attention problem
// (shapes, strides, options, masks, values including special ones) -> blockattn::attention()
// compared with reference::attention<long double> on the same rounded inputs; or, when the bytes
// ask for it, one invalid argument, which must throw std::invalid_argument and leave out as it was.
// Any other outcome prints the problem and aborts (a crash is what a fuzzer reports).
// The same valid problem may also run (bytes after the values pick it) as one attention_varlen()
// call over the batch packed into one sequence axis, and as attention() over a paged copy of K/V
// in a vLLM, FlashInfer or OpenVINO page table with the pages in a shuffled order; each result
// is checked against the same reference.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <blockattn/attention.hpp>
#include <blockattn/attention_varlen.hpp>
#include <blockattn/paged_kv.hpp>
#include <blockattn/reference.hpp>

#include "support/tolerance.hpp"

namespace blockattn::fuzz {

/// Reads the fuzzer's bytes front to back; past the end every read is 0.
class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  std::uint8_t byte() { return position_ < size_ ? data_[position_++] : std::uint8_t{0}; }
  /// A value in [lo, hi] from one byte.
  Index range(Index lo, Index hi) { return lo + static_cast<Index>(byte()) % (hi - lo + 1); }
  bool flag() { return (byte() & 1) != 0; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t position_ = 0;
};

[[noreturn]] inline void fail(const std::string& what, const std::string& problem) {
  std::fprintf(stderr, "blockattn fuzz: %s\n  problem: %s\n", what.c_str(), problem.c_str());
  std::fflush(stderr);
  std::abort();
}

/// One input value: a multiple of 1/16 in [-8, 8) (exact products and sums in float), or, when
/// `specials` is on, sometimes NaN, ±inf, a denormal or -0.
template <class T>
T decode_value(ByteReader& in, bool specials) {
  const std::uint8_t b = in.byte();
  if (specials && b >= 250) {
    switch (b) {
      case 250:
        return std::numeric_limits<T>::quiet_NaN();
      case 251:
        return std::numeric_limits<T>::infinity();
      case 252:
        return -std::numeric_limits<T>::infinity();
      case 253:
        return std::numeric_limits<T>::denorm_min() * T(3);
      case 254:
        return -std::numeric_limits<T>::denorm_min();
      default:
        return T(-0.0);
    }
  }
  return static_cast<T>(static_cast<int>(b) - 128) / T(16);
}

/// Whether the two results agree: equal NaN-ness and equal infinities where the reference is not
/// finite (huge logits can overflow), within tol where it is finite.
inline bool close(long double got, long double want, double tol) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::abs(static_cast<double>(got - want)) <= tol;
}

/// Decodes one problem from the bytes and checks it; aborts on any divergence.
template <class T>
void check_one(ByteReader& in) {
  // Shapes: [batch, n, heads, dim] with GQA groups; small so that one run takes microseconds.
  const Index batch = in.range(1, 2);
  const Index kv_heads = in.range(1, 2);
  const Index heads = kv_heads * in.range(1, 2);
  const Index n_q = in.range(1, 9);
  const Index n_k = in.range(0, 12);
  const Index d = in.range(1, 8);
  const Index d_v = in.range(1, 8);
  const Index pad = in.range(0, 2);  // extra elements per head row: strided views
  const bool single_head_form = batch == 1 && heads == 1 && in.flag();

  AttentionOptions o;
  std::vector<Index> key_lengths(static_cast<std::size_t>(batch));
  std::vector<double> slopes(static_cast<std::size_t>(heads));
  BlockSparseLayout layout;
  const std::uint8_t option_bits = in.byte();
  o.causal = (option_bits & 1) != 0;
  if (option_bits & 2) o.window_left = in.range(0, n_k);
  if (option_bits & 4) o.window_right = in.range(0, n_k);
  if (option_bits & 8) {
    for (auto& length : key_lengths) length = in.range(0, n_k);
    o.key_lengths = key_lengths;
  }
  if (option_bits & 16) {
    const Index qbs = in.range(1, 4);
    const Index kbs = in.range(1, 4);
    const Index layout_heads = in.flag() ? heads : 1;
    const Index qb = (n_q + qbs - 1) / qbs;
    const Index kb = std::max<Index>(1, (n_k + kbs - 1) / kbs);
    layout = BlockSparseLayout(layout_heads, qb, kb, qbs, kbs);
    for (Index h = 0; h < layout_heads; ++h) {
      for (Index i = 0; i < qb; ++i) {
        const std::uint8_t bits = in.byte();
        for (Index j = 0; j < kb; ++j) layout.set(h, i, j, ((bits >> (j % 8)) & 1) != 0);
      }
    }
    o.block_sparse = &layout;
  }
  if (option_bits & 32) o.softcap = static_cast<double>(in.range(1, 64)) / 4;
  if (option_bits & 64) {
    for (auto& slope : slopes) slope = static_cast<double>(in.range(0, 16)) / 16;
    o.alibi_slopes = slopes;
  }
  const bool specials = (option_bits & 128) != 0;
  o.query_chunk = in.range(0, n_q + 1);
  o.key_chunk = in.range(0, n_k + 1);
  o.threads = static_cast<int>(in.range(1, 2));
  if (in.flag()) o.scale = static_cast<double>(in.range(1, 16)) / 8;
  const bool want_lse = in.flag();
  const std::uint8_t invalid = in.byte();  // < 24: one invalid argument (about 1 input in 10)

  // BSHD buffers with `pad` unused elements after each head row.
  const auto make = [&](Index seq, Index h, Index dim) {
    return TensorView<T>(nullptr, batch, seq, h, dim, seq * h * (dim + pad), h * (dim + pad),
                         dim + pad);
  };
  TensorView<T> q = make(n_q, heads, d);
  TensorView<T> k = make(n_k, kv_heads, d);
  TensorView<T> v = make(n_k, kv_heads, d_v);
  TensorView<T> out = make(n_q, heads, d_v);
  const auto size_of = [](const TensorView<T>& t) {
    return static_cast<std::size_t>(std::max<Index>(1, t.batch * t.batch_stride));
  };
  std::vector<T> q_buf(size_of(q)), k_buf(size_of(k)), v_buf(size_of(v));
  const T sentinel = T(-12345.5);
  std::vector<T> out_buf(size_of(out), sentinel);
  q.data = q_buf.data();
  k.data = k_buf.data();
  v.data = v_buf.data();
  out.data = out_buf.data();
  for (auto* buf : {&q_buf, &k_buf, &v_buf}) {
    for (auto& x : *buf) x = decode_value<T>(in, specials);
  }
  const Index lse_count = batch * heads * n_q;
  std::vector<T> lse(static_cast<std::size_t>(lse_count), sentinel);
  // Attention sinks, read after the values so that inputs saved before they existed keep their
  // shapes and values (an exhausted reader gives zeros: no sinks): sinks in [−4, 4], −inf (no
  // sink) and 40 (above every logit).
  std::vector<double> sinks(static_cast<std::size_t>(heads));
  if (in.flag()) {
    for (auto& sink : sinks) {
      const Index code = in.range(0, 34);
      sink = code == 33   ? -std::numeric_limits<double>::infinity()
             : code == 34 ? 40.0
                          : static_cast<double>(code - 16) / 4;
    }
    o.sinks = sinks;
  }

  char shape[320];
  std::snprintf(shape, sizeof shape,
                "T=%s B=%td n_q=%td n_k=%td H=%td H_kv=%td d=%td d_v=%td pad=%td single=%d "
                "causal=%d wl=%td wr=%td kl=%d sparse=%d softcap=%g alibi=%d qc=%td kc=%td "
                "threads=%d scale=%g lse=%d specials=%d invalid=%d sinks=%d",
                sizeof(T) == 4 ? "float" : "double", batch, n_q, n_k, heads, kv_heads, d, d_v, pad,
                single_head_form, o.causal, o.window_left, o.window_right, !o.key_lengths.empty(),
                o.block_sparse != nullptr, o.softcap, !o.alibi_slopes.empty(), o.query_chunk,
                o.key_chunk, o.threads, o.scale, want_lse, specials, invalid, !o.sinks.empty());

  const auto run = [&](const TensorView<T>& qq, const TensorView<T>& kk, const TensorView<T>& vv,
                       const TensorView<T>& oo, const AttentionOptions& opt, blockattn::Span<T> l) {
    if (single_head_form) {
      using Map = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
      Map qm(qq.data, qq.seq, qq.dim, Eigen::OuterStride<>(qq.seq_stride));
      Map km(kk.data, kk.seq, kk.dim, Eigen::OuterStride<>(std::max<Index>(1, kk.seq_stride)));
      Map vm(vv.data, vv.seq, vv.dim, Eigen::OuterStride<>(std::max<Index>(1, vv.seq_stride)));
      Map om(oo.data, oo.seq, oo.dim, Eigen::OuterStride<>(oo.seq_stride));
      attention(qm, km, vm, om, opt, l);
    } else {
      attention(qq, kk, vv, oo, opt, l);
    }
  };

  if (invalid < 24) {
    // Exactly one invalid argument; the call must throw std::invalid_argument and write nothing.
    AttentionOptions bad = o;
    TensorView<T> bq = q, bk = k, bv = v, bout = out;
    std::vector<Index> bad_lengths(static_cast<std::size_t>(batch), n_k);
    std::vector<double> bad_slopes(static_cast<std::size_t>(heads), 0.5);
    BlockSparseLayout small_layout(2 + heads, 1, 1, 1, 1);
    const Index which = invalid % 14;
    switch (which) {
      case 0:
        bad.query_chunk = -1 - in.range(0, 3);
        break;
      case 1:
        bad.key_chunk = -1 - in.range(0, 3);
        break;
      case 2:
        bad.window_left = -2 - in.range(0, 3);
        break;
      case 3:
        bad.window_right = -2 - in.range(0, 3);
        break;
      case 4:
        bad.threads = -1;
        break;
      case 5:
        bad.scale = in.flag() ? std::numeric_limits<double>::quiet_NaN() : HUGE_VAL;
        break;
      case 6:
        bad.softcap = in.flag() ? -0.5 : std::numeric_limits<double>::quiet_NaN();
        break;
      case 7:
        bad_lengths[static_cast<std::size_t>(in.range(0, batch - 1))] =
            in.flag() ? -1 : n_k + 1 + in.range(0, 3);
        bad.key_lengths = bad_lengths;
        break;
      case 8:  // a non-finite slope, or a NaN or +inf sink
        bad_slopes[static_cast<std::size_t>(in.range(0, heads - 1))] =
            std::numeric_limits<double>::infinity();
        bad.alibi_slopes = bad_slopes;
        if (in.flag()) {
          bad.alibi_slopes = o.alibi_slopes;
          bad_slopes[static_cast<std::size_t>(in.range(0, heads - 1))] =
              in.flag() ? std::numeric_limits<double>::quiet_NaN() : HUGE_VAL;
          bad.sinks = bad_slopes;
        }
        break;
      case 9:  // a layout with the wrong number of heads and too few blocks
        bad.block_sparse = &small_layout;
        break;
      case 10:
        bk.dim = d + 1;
        break;  // q·k head dimensions differ
      case 11:
        bout.dim = d_v + 1;
        break;  // out has the wrong width
      case 12:
        bv.seq = n_k + 1;
        break;  // a key without a value
      default:
        bout.data = q_buf.data();
        break;  // out aliases q
    }
    const std::vector<T> q_before = q_buf;
    try {
      run(bq, bk, bv, bout, bad, want_lse ? blockattn::Span<T>(lse) : blockattn::Span<T>());
    } catch (const std::invalid_argument&) {
      for (const T x : out_buf) {
        if (!(x == sentinel)) fail("out written before a validation error", shape);
      }
      for (const T x : lse) {
        if (!(x == sentinel)) fail("lse written before a validation error", shape);
      }
      if (std::memcmp(q_before.data(), q_buf.data(), q_buf.size() * sizeof(T)) != 0) {
        fail("q (aliased by out) written before a validation error", shape);
      }
      return;
    } catch (...) {
      fail("an invalid argument threw something other than std::invalid_argument", shape);
    }
    // Case 9's layout heads are 2 + H, never valid; the others all break a rule.
    fail("an invalid argument was accepted (case " + std::to_string(which) + ")", shape);
  }

  try {
    run(q, k, v, out, o, want_lse ? blockattn::Span<T>(lse) : blockattn::Span<T>());
  } catch (const std::exception& e) {
    fail(std::string("a valid problem threw: ") + e.what(), shape);
  }

  // Each result to check against the reference: out [B, n_q, H, d_v] and lse [B, H, n_q].
  struct Result {
    const char* form;
    TensorView<T> out;
    const std::vector<T>* lse;
  };
  std::vector<Result> results{{"attention", out, &lse}};
  // The other forms, read after everything above so that older inputs keep their meaning (an
  // exhausted reader gives 0: no extra form).
  const std::uint8_t forms = in.byte();
  std::vector<T> varlen_out_buf, varlen_lse, paged_out_buf, paged_lse;
  if (forms & 1) {
    // The batch packed into one sequence axis: the buffers are already [B·n, H, dim + pad].
    const auto packed = [&](T* data, Index seq, Index h, Index dim) {
      return TensorView<T>(data, 1, batch * seq, h, dim, batch * seq * h * (dim + pad),
                           h * (dim + pad), dim + pad);
    };
    std::vector<std::int32_t> cu_q(static_cast<std::size_t>(batch + 1));
    std::vector<std::int32_t> cu_k(static_cast<std::size_t>(batch + 1));
    for (Index b = 0; b <= batch; ++b) {
      cu_q[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b * n_q);
      cu_k[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b * n_k);
    }
    varlen_out_buf.assign(out_buf.size(), sentinel);
    std::vector<T> packed_lse(static_cast<std::size_t>(lse_count), sentinel);  // [H, B·n_q]
    try {
      attention_varlen(packed(q_buf.data(), n_q, heads, d), packed(k_buf.data(), n_k, kv_heads, d),
                       packed(v_buf.data(), n_k, kv_heads, d_v),
                       packed(varlen_out_buf.data(), n_q, heads, d_v), cu_q, cu_k, o,
                       want_lse ? blockattn::Span<T>(packed_lse) : blockattn::Span<T>());
    } catch (const std::exception& e) {
      fail(std::string("a valid problem threw in attention_varlen: ") + e.what(), shape);
    }
    varlen_lse.assign(lse.size(), sentinel);
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < heads; ++h) {
        for (Index i = 0; i < n_q; ++i) {
          varlen_lse[static_cast<std::size_t>((b * heads + h) * n_q + i)] =
              packed_lse[static_cast<std::size_t>(h * batch * n_q + b * n_q + i)];
        }
      }
    }
    TensorView<T> varlen_out = out;
    varlen_out.data = varlen_out_buf.data();
    results.push_back({"attention_varlen", varlen_out, &varlen_lse});
  }
  if ((forms & 2) && o.key_lengths.empty() && n_k > 0) {
    // K/V copied into pages of page_size tokens, the pages shuffled (plus unused ones), and read
    // back through one engine's page table. Slots past a sequence's length hold 0.
    const Index page_size = in.range(1, 4);
    const Index per_sequence = (n_k + page_size - 1) / page_size;
    const Index num_pages = batch * per_sequence + in.range(0, 2);
    std::vector<std::int32_t> order(static_cast<std::size_t>(num_pages));
    for (Index p = 0; p < num_pages; ++p)
      order[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(p);
    for (Index p = num_pages - 1; p > 0; --p) {  // Fisher-Yates from the bytes
      std::swap(order[static_cast<std::size_t>(p)],
                order[static_cast<std::size_t>(in.range(0, p))]);
    }
    const auto page_of = [&](Index b, Index t) {
      return order[static_cast<std::size_t>(b * per_sequence + t / page_size)];
    };
    std::vector<T> k_pool(static_cast<std::size_t>(num_pages * page_size * kv_heads * d), T(0));
    std::vector<T> v_pool(static_cast<std::size_t>(num_pages * page_size * kv_heads * d_v), T(0));
    for (Index b = 0; b < batch; ++b) {
      for (Index t = 0; t < n_k; ++t) {
        const Index slot = page_of(b, t) * page_size + t % page_size;
        for (Index g = 0; g < kv_heads; ++g) {
          for (Index c = 0; c < d; ++c) {
            k_pool[static_cast<std::size_t>((slot * kv_heads + g) * d + c)] =
                k_buf[static_cast<std::size_t>(b * k.batch_stride + t * k.seq_stride +
                                               g * k.head_stride + c)];
          }
          for (Index c = 0; c < d_v; ++c) {
            v_pool[static_cast<std::size_t>((slot * kv_heads + g) * d_v + c)] =
                v_buf[static_cast<std::size_t>(b * v.batch_stride + t * v.seq_stride +
                                               g * v.head_stride + c)];
          }
        }
      }
    }
    // 0: vLLM, 1: FlashInfer, 2: OpenVINO (which needs n_k >= n_q: the chunk is in the pages).
    Index format = in.range(0, 2);
    if (format == 2 && n_k < n_q) format = 0;
    std::vector<std::int32_t> pages, offsets{0}, lengths;
    for (Index b = 0; b < batch; ++b) {
      for (Index t = 0; t < per_sequence; ++t) pages.push_back(page_of(b, t * page_size));
      offsets.push_back(static_cast<std::int32_t>(pages.size()));
      lengths.push_back(static_cast<std::int32_t>(format == 0 ? n_k
                                                  : format == 1
                                                      ? n_k - (per_sequence - 1) * page_size
                                                      : n_k - n_q));
    }
    const PageTable table = format == 0   ? vllm_page_table(pages, per_sequence, lengths)
                            : format == 1 ? flashinfer_page_table(offsets, pages, lengths)
                                          : openvino_page_table(pages, offsets, lengths);
    const PagedKV<T> kv{
        make_tensor_view(static_cast<const T*>(k_pool.data()), num_pages, page_size, kv_heads, d),
        make_tensor_view(static_cast<const T*>(v_pool.data()), num_pages, page_size, kv_heads, d_v),
        table};
    paged_out_buf.assign(out_buf.size(), sentinel);
    paged_lse.assign(lse.size(), sentinel);
    TensorView<T> paged_out = out;
    paged_out.data = paged_out_buf.data();
    try {
      attention(q, kv, paged_out, o,
                want_lse ? blockattn::Span<T>(paged_lse) : blockattn::Span<T>());
    } catch (const std::exception& e) {
      fail(std::string("a valid problem threw in the paged attention(): ") + e.what(), shape);
    }
    results.push_back({"paged attention", paged_out, &paged_lse});
  }

  // The reference on the same values, cast up to long double, head by head.
  using LD = long double;
  const double scale = o.scale != 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(d));
  double extra = o.softcap;
  if (!o.alibi_slopes.empty()) {
    for (const double s : slopes) extra = std::max(extra, s * static_cast<double>(n_q + n_k));
  }
  if (!o.sinks.empty()) {  // the sink's exp argument (−inf: no sink, adds nothing)
    for (const double s : sinks) extra += std::isinf(s) ? 0.0 : std::abs(s);
  }
  const Index group = heads / kv_heads;
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < heads; ++h) {
      const auto qs = detail::head_slice(TensorView<const T>(q), b, h);
      const auto ks = detail::head_slice(TensorView<const T>(k), b, h / group);
      const auto vs = detail::head_slice(TensorView<const T>(v), b, h / group);
      const Matrix<LD> q_ld = qs.template cast<LD>();
      const Matrix<LD> k_ld = ks.template cast<LD>();
      const Matrix<LD> v_ld = vs.template cast<LD>();
      Matrix<LD> want(n_q, d_v);
      std::vector<LD> ref_lse(static_cast<std::size_t>(n_q));
      // reference::attention's single-head form with this head's options (b and h fixed).
      AttentionOptions ho = o;
      const Index length = !o.key_lengths.empty() ? key_lengths[static_cast<std::size_t>(b)] : n_k;
      ho.key_lengths = {&length, 1};
      const double slope = !o.alibi_slopes.empty() ? slopes[static_cast<std::size_t>(h)] : 0;
      ho.alibi_slopes = !o.alibi_slopes.empty() ? blockattn::Span<const double>(&slope, 1)
                                                : blockattn::Span<const double>();
      const double sink = !o.sinks.empty() ? sinks[static_cast<std::size_t>(h)] : 0;
      ho.sinks = !o.sinks.empty() ? blockattn::Span<const double>(&sink, 1)
                                  : blockattn::Span<const double>();
      BlockSparseLayout head_layout;
      if (o.block_sparse != nullptr) {
        const Index lh = layout.heads() == 1 ? 0 : h;
        head_layout = BlockSparseLayout(1, layout.query_blocks(), layout.key_blocks(),
                                        layout.query_block_size(), layout.key_block_size());
        for (Index i = 0; i < layout.query_blocks(); ++i) {
          for (Index j = 0; j < layout.key_blocks(); ++j) {
            head_layout.set(0, i, j, layout.visible(lh, i, j));
          }
        }
        ho.block_sparse = &head_layout;
      }
      reference::attention(q_ld, k_ld, v_ld, want, ho, ref_lse);
      // Tolerances only where every input is finite; with specials, close() compares the
      // non-finite pattern exactly and the finite entries with the finite rows' formula.
      const std::vector<double> tol = test::attention_tolerance<T>(qs, ks, vs, scale, extra);
      const std::vector<double> lse_tol = test::lse_tolerance<T>(qs, ks, scale, extra);
      // With special values only a crash is a failure for rows that a non-finite input of this
      // head can reach (q row i, or any key or value of the head): the numerical policy for those
      // rows is tested case by case in numerics_test.cpp. Denormals and -0 are finite and checked.
      const bool kv_finite = ks.allFinite() && vs.allFinite();
      for (const Result& result : results) {
        const auto os = detail::head_slice(TensorView<const T>(result.out), b, h);
        for (Index i = 0; i < n_q; ++i) {
          if (specials && !(kv_finite && qs.row(i).allFinite())) continue;
          const double t = std::isfinite(tol[static_cast<std::size_t>(i)])
                               ? tol[static_cast<std::size_t>(i)]
                               : std::numeric_limits<double>::infinity();
          for (Index c = 0; c < d_v; ++c) {
            if (!close(static_cast<LD>(os(i, c)), want(i, c), t)) {
              char where[200];
              std::snprintf(
                  where, sizeof where,
                  "%s: out[b=%td, i=%td, h=%td, c=%td] = %.9Lg, reference %.9Lg, tol %.3g",
                  result.form, b, i, h, c, static_cast<LD>(os(i, c)), want(i, c), t);
              fail(where, shape);
            }
          }
          if (want_lse) {
            const auto got =
                static_cast<LD>((*result.lse)[static_cast<std::size_t>((b * heads + h) * n_q + i)]);
            const double lt = lse_tol[static_cast<std::size_t>(i)];
            if (!close(got, ref_lse[static_cast<std::size_t>(i)],
                       std::isfinite(lt) ? lt : std::numeric_limits<double>::infinity())) {
              char where[200];
              std::snprintf(where, sizeof where,
                            "%s: lse[b=%td, h=%td, i=%td] = %.9Lg, reference %.9Lg", result.form, b,
                            h, i, got, ref_lse[static_cast<std::size_t>(i)]);
              fail(where, shape);
            }
          }
        }
      }
    }
  }
}

/// The entry point both drivers call: the first byte picks float or double.
inline void check_bytes(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  if (in.flag()) {
    check_one<double>(in);
  } else {
    check_one<float>(in);
  }
}

}  // namespace blockattn::fuzz
