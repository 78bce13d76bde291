// Every validation branch of every public entry point, one table row per bad input: the call,
// the exception type, substrings of the message (function, argument, both sizes), and the
// outputs — prefilled with NaN sentinels — checked untouched afterwards. Inputs that an output
// aliases are checked unchanged as well. To cover a new entry point (attention_backward,
// transformer_block), write a `<name>_rows<T>(table)` function like those below and call it from
// validation_table<T>().

#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/softmax.hpp>

#include "support/scalar_types.hpp"

namespace validation_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::BlockSparseLayout;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::RowVector;
using blockattn::TensorView;

/// The buffers one row's call may write: all created here, filled with sentinels, and checked
/// bit for bit after the call has thrown. Deques keep the addresses stable.
template <class T>
class Buffers {
 public:
  /// A rows×cols output prefilled with NaN.
  Matrix<T>& out(Index rows, Index cols) {
    outputs_.emplace_back(Matrix<T>::Constant(rows, cols, std::numeric_limits<T>::quiet_NaN()));
    return outputs_.back();
  }
  /// A vector output of n values prefilled with NaN.
  T* out_ptr(Index n) { return out(1, std::max<Index>(n, 1)).data(); }
  /// The same as a sized view (an lse output).
  blockattn::Span<T> out_span(Index n) { return {out_ptr(n), n}; }
  /// An input of n values (an lse input), as a sized view.
  blockattn::Span<const T> in_span(Index n) { return {in(1, std::max<Index>(n, 1)).data(), n}; }
  /// An index output of n entries prefilled with -7.
  Index* index_ptr(Index n) {
    index_outputs_.emplace_back(static_cast<std::size_t>(std::max<Index>(n, 1)), Index{-7});
    return index_outputs_.back().data();
  }
  /// An input of rows×cols values 1/(1 + r + c); an output that aliases it must not change it.
  Matrix<T>& in(Index rows, Index cols) {
    Matrix<T> m(rows, cols);
    for (Index r = 0; r < rows; ++r) {
      for (Index c = 0; c < cols; ++c) m(r, c) = T(1) / static_cast<T>(1 + r + c);
    }
    inputs_.push_back(m);
    snapshots_.push_back(m);
    return inputs_.back();
  }

  /// Fails the current test for every changed sentinel or input.
  void expect_untouched() const {
    for (const auto& m : outputs_) {
      for (Index i = 0; i < m.size(); ++i) {
        EXPECT_TRUE(std::isnan(m.data()[i])) << "output element " << i << " was written";
      }
    }
    for (const auto& indices : index_outputs_) {
      for (const Index x : indices) EXPECT_EQ(x, -7) << "an index output was written";
    }
    for (std::size_t b = 0; b < inputs_.size(); ++b) {
      if (inputs_[b].size() == 0) continue;  // no data pointer to compare
      EXPECT_EQ(std::memcmp(inputs_[b].data(), snapshots_[b].data(),
                            static_cast<std::size_t>(inputs_[b].size()) * sizeof(T)),
                0)
          << "an input was written";
    }
  }

 private:
  std::deque<Matrix<T>> outputs_;
  std::deque<std::vector<Index>> index_outputs_;
  std::deque<Matrix<T>> inputs_;
  std::deque<Matrix<T>> snapshots_;
};

enum class Expect { InvalidArgument, OutOfRange };

/// One bad input. `branch` names the validation branch it reaches (several rows may reach one).
template <class T>
struct Row {
  std::string branch;
  Expect expect;
  std::vector<std::string> message;  ///< substrings the exception message must contain
  std::function<void(Buffers<T>&)> call;
};

template <class T>
using Table = std::vector<Row<T>>;

template <class T>
void add(Table<T>& table, std::string branch, std::vector<std::string> message,
         std::function<void(Buffers<T>&)> call) {
  table.push_back(
      {std::move(branch), Expect::InvalidArgument, std::move(message), std::move(call)});
}

template <class T>
TensorView<const T> as_const(const TensorView<T>& t) {
  return t;
}

// --- softmax, matrix and vector forms --------------------------------------------------------

template <class T>
void softmax_rows(Table<T>& table) {
  using blockattn::SoftmaxAlgorithm;
  const auto bad_algorithm = static_cast<SoftmaxAlgorithm>(7);
  add<T>(table, "softmax/y.rows", {"blockattn::softmax", "y.rows() is 4 but x.rows() is 3"},
         [](Buffers<T>& b) { blockattn::softmax(b.in(3, 5), b.out(4, 5)); });
  add<T>(table, "softmax/y.cols", {"blockattn::softmax", "y.cols() is 6 but x.cols() is 5"},
         [](Buffers<T>& b) { blockattn::softmax(b.in(3, 5), b.out(3, 6)); });
  add<T>(table, "softmax/algorithm", {"blockattn::softmax", "algorithm is 7"},
         [=](Buffers<T>& b) { blockattn::softmax(b.in(3, 5), b.out(3, 5), bad_algorithm); });
  add<T>(table, "softmax/overlap", {"blockattn::softmax", "y overlaps the memory of x"},
         [](Buffers<T>& b) {
           Matrix<T>& x = b.in(4, 5);  // y = rows 1..3 of x: a partial overlap
           blockattn::softmax(x.topRows(3), x.bottomRows(3));
         });
  add<T>(table, "softmax[n]/n", {"blockattn::softmax", "n is -1"},
         [](Buffers<T>& b) { blockattn::softmax(b.in(1, 4).data(), -1, b.out_ptr(4)); });
  add<T>(
      table, "softmax[n]/null", {"blockattn::softmax", "x or y is null but n is 4"},
      [](Buffers<T>& b) { blockattn::softmax(static_cast<const T*>(nullptr), 4, b.out_ptr(4)); });
  add<T>(table, "softmax[n]/null", {"blockattn::softmax", "x or y is null but n is 4"},
         [](Buffers<T>& b) { blockattn::softmax(b.in(1, 4).data(), 4, static_cast<T*>(nullptr)); });
  add<T>(table, "softmax[n]/algorithm", {"blockattn::softmax", "algorithm is 7"},
         [=](Buffers<T>& b) {
           blockattn::softmax(b.in(1, 4).data(), 4, b.out_ptr(4), bad_algorithm);
         });
  add<T>(table, "softmax[n]/overlap", {"blockattn::softmax", "y overlaps the memory of x"},
         [](Buffers<T>& b) {
           T* x = b.in(1, 8).data();
           blockattn::softmax(x, 4, x + 2);
         });
}

// --- softmax_topk, Eigen and Span forms ------------------------------------------------------

template <class T>
void softmax_topk_rows(Table<T>& table) {
  using Values = RowVector<T>;
  using Indices = RowVector<Index>;
  add<T>(table, "softmax_topk/k", {"blockattn::softmax_topk", "k is -2"}, [](Buffers<T>& b) {
    Values x = b.in(1, 6).row(0);
    Values values = Values::Constant(3, std::numeric_limits<T>::quiet_NaN());
    Indices indices = Indices::Constant(3, -7);
    blockattn::softmax_topk(x, -2, values, indices);
    // Locals are not checked by Buffers; these must still be sentinels here (not reached).
  });
  add<T>(table, "softmax_topk/values.size",
         {"blockattn::softmax_topk", "values.size() is 2 but min(k, x.size()) is 3"},
         [](Buffers<T>& b) {
           const Values x = b.in(1, 6).row(0);
           Eigen::Map<Values> values(b.out_ptr(2), 2);
           Eigen::Map<Indices> indices(b.index_ptr(3), 3);
           blockattn::softmax_topk(x, 3, values, indices);
         });
  add<T>(table, "softmax_topk/indices.size",
         {"blockattn::softmax_topk", "indices.size() is 1 but min(k, x.size()) is 3"},
         [](Buffers<T>& b) {
           const Values x = b.in(1, 6).row(0);
           Eigen::Map<Values> values(b.out_ptr(3), 3);
           Eigen::Map<Indices> indices(b.index_ptr(1), 1);
           blockattn::softmax_topk(x, 3, values, indices);
         });
  add<T>(table, "softmax_topk/values overlap x",
         {"blockattn::softmax_topk", "values overlaps the memory of x"}, [](Buffers<T>& b) {
           Matrix<T>& x = b.in(1, 6);
           Eigen::Map<const Values> xs(x.data(), 6);
           Eigen::Map<Values> values(x.data() + 3, 3);
           Eigen::Map<Indices> indices(b.index_ptr(3), 3);
           blockattn::softmax_topk(xs, 3, values, indices);
         });
  // The Span form: every array carries its length.
  using blockattn::Span;
  add<T>(table, "softmax_topk[span]/values.size",
         {"blockattn::softmax_topk", "values.size() is 2 but min(k, x.size()) is 3"},
         [](Buffers<T>& b) {
           blockattn::softmax_topk(b.in_span(6), 3, b.out_span(2), Span(b.index_ptr(3), 3));
         });
  add<T>(table, "softmax_topk[span]/indices.size",
         {"blockattn::softmax_topk", "indices.size() is 1 but min(k, x.size()) is 2"},
         [](Buffers<T>& b) {
           blockattn::softmax_topk(b.in_span(6), 2, b.out_span(4), Span(b.index_ptr(1), 1));
         });
  add<T>(table, "softmax_topk[span]/x.size", {"blockattn::softmax_topk", "x.size() is -1"},
         [](Buffers<T>& b) {
           blockattn::softmax_topk(Span(b.in(1, 4).data(), -1), 2, b.out_span(2),
                                   Span(b.index_ptr(2), 2));
         });
  add<T>(table, "softmax_topk[span]/k", {"blockattn::softmax_topk", "k is -1"}, [](Buffers<T>& b) {
    blockattn::softmax_topk(b.in_span(4), -1, b.out_span(2), Span(b.index_ptr(2), 2));
  });
  add<T>(table, "softmax_topk[span]/x null",
         {"blockattn::softmax_topk", "x.data() is null but x.size() is 4"}, [](Buffers<T>& b) {
           blockattn::softmax_topk(Span(static_cast<const T*>(nullptr), 4), 2, b.out_span(2),
                                   Span(b.index_ptr(2), 2));
         });
  add<T>(table, "softmax_topk[span]/outputs null",
         {"blockattn::softmax_topk",
          "values.data() or indices.data() is null but min(k, x.size()) is 2"},
         [](Buffers<T>& b) {
           blockattn::softmax_topk(b.in_span(4), 2, Span(static_cast<T*>(nullptr), 2),
                                   Span(b.index_ptr(2), 2));
         });
  add<T>(table, "softmax_topk[span]/outputs null",
         {"blockattn::softmax_topk",
          "values.data() or indices.data() is null but min(k, x.size()) is 2"},
         [](Buffers<T>& b) {
           blockattn::softmax_topk(b.in_span(4), 2, b.out_span(2),
                                   Span(static_cast<Index*>(nullptr), 2));
         });
  add<T>(table, "softmax_topk[span]/values overlap x",
         {"blockattn::softmax_topk", "values overlaps the memory of x"}, [](Buffers<T>& b) {
           T* x = b.in(1, 6).data();
           blockattn::softmax_topk(Span<const T>(x, 6), 2, Span(x + 5, 2), Span(b.index_ptr(2), 2));
         });
  add<T>(table, "softmax_topk[span]/indices overlap x",
         {"blockattn::softmax_topk", "indices overlaps the memory of x"}, [](Buffers<T>& b) {
           T* x = b.in(1, 16).data();  // the first bytes of x reinterpreted as indices
           blockattn::softmax_topk(Span<const T>(x + 8, 8), 2, b.out_span(2),
                                   Span(reinterpret_cast<Index*>(x + 7), 2));
         });
  add<T>(table, "softmax_topk[span]/indices overlap values",
         {"blockattn::softmax_topk", "indices overlaps the memory of values"}, [](Buffers<T>& b) {
           T* values = b.out_ptr(8);
           blockattn::softmax_topk(b.in_span(6), 2, Span(values, 8),
                                   Span(reinterpret_cast<Index*>(values), 2));
         });
}

// --- BlockSparseLayout -------------------------------------------------------------------------

template <class T>
void layout_rows(Table<T>& table) {
  add<T>(table, "BlockSparseLayout/counts",
         {"blockattn::BlockSparseLayout", "must be positive (got 0, 2, 2)"},
         [](Buffers<T>&) { BlockSparseLayout(0, 2, 2, 4, 4); });
  add<T>(table, "BlockSparseLayout/counts", {"blockattn::BlockSparseLayout", "(got 1, -1, 2)"},
         [](Buffers<T>&) { BlockSparseLayout(1, -1, 2, 4, 4); });
  add<T>(table, "BlockSparseLayout/counts", {"blockattn::BlockSparseLayout", "(got 1, 2, 0)"},
         [](Buffers<T>&) { BlockSparseLayout(1, 2, 0, 4, 4); });
  add<T>(table, "BlockSparseLayout/block sizes",
         {"blockattn::BlockSparseLayout", "block sizes must be positive (got 0 and 4)"},
         [](Buffers<T>&) { BlockSparseLayout(1, 2, 2, 0, 4); });
  add<T>(table, "BlockSparseLayout/block sizes", {"(got 4 and -3)"},
         [](Buffers<T>&) { BlockSparseLayout(1, 2, 2, 4, -3); });
  add<T>(table, "BlockSparseLayout::from_permutations/empty",
         {"blockattn::BlockSparseLayout::from_permutations", "no permutation given"},
         [](Buffers<T>&) { BlockSparseLayout::from_permutations({}, 4); });
  add<T>(table, "BlockSparseLayout::from_permutations/size",
         {"blockattn::BlockSparseLayout::from_permutations", "a permutation's size is 2",
          "the first one's is 3"},
         [](Buffers<T>&) {
           BlockSparseLayout::from_permutations({{0, 1, 2}, {1, 0}}, 4);
         });
  add<T>(table, "BlockSparseLayout::from_permutations/index",
         {"blockattn::BlockSparseLayout::from_permutations", "block index 3 is outside [0, 3)"},
         [](Buffers<T>&) {
           BlockSparseLayout::from_permutations({{0, 3, 1}}, 4);
         });
  add<T>(table, "BlockSparseLayout::from_permutations/index", {"block index -1"}, [](Buffers<T>&) {
    BlockSparseLayout::from_permutations({{0, -1, 1}}, 4);
  });
  add<T>(table, "BlockSparseLayout::from_permutations/block size",
         {"blockattn::BlockSparseLayout", "(got 0 and 0)"},
         [](Buffers<T>&) { BlockSparseLayout::from_permutations({{0}}, 0); });
  for (const auto& [h, qb, kb] : std::vector<std::array<Index, 3>>{
           {2, 0, 0}, {-1, 0, 0}, {0, 3, 0}, {0, -1, 0}, {0, 0, 4}, {0, 0, -1}}) {
    add<T>(table, "BlockSparseLayout::set",
           {"blockattn::BlockSparseLayout::set",
            "block (" + std::to_string(h) + ", " + std::to_string(qb) + ", " + std::to_string(kb) +
                ") is outside the layout's [2, 3, 4]"},
           [h = h, qb = qb, kb = kb](Buffers<T>&) {
             BlockSparseLayout layout(2, 3, 4, 8, 8);
             layout.set(h, qb, kb);
           });
  }
}

// --- attention(): the options, shared by both forms ------------------------------------------

/// Rows for every option check; `run` calls one attention form with the options on a valid
/// problem of batch 2, 3 query heads, n_q = 5, n_k = 7 (single head: batch 1, 1 head).
template <class T>
void option_rows(Table<T>& table, const std::string& form, Index batch, Index heads,
                 std::function<void(Buffers<T>&, const AttentionOptions&)> run) {
  const auto row = [&](const std::string& branch, std::vector<std::string> message,
                       std::function<void(AttentionOptions&)> set) {
    message.insert(message.begin(), "blockattn::attention: ");
    add<T>(table, form + "/" + branch, std::move(message), [run, set](Buffers<T>& b) {
      AttentionOptions o;
      set(o);
      run(b, o);
    });
  };
  row("query_chunk", {"options.query_chunk is -1 but must be >= 0"},
      [](AttentionOptions& o) { o.query_chunk = -1; });
  row("key_chunk", {"options.key_chunk is -4 but must be >= 0"},
      [](AttentionOptions& o) { o.key_chunk = -4; });
  row("window_left", {"options.window_left is -2 but must be >= -1"},
      [](AttentionOptions& o) { o.window_left = -2; });
  row("window_right", {"options.window_right is -9 but must be >= -1"},
      [](AttentionOptions& o) { o.window_right = -9; });
  row("threads", {"options.threads is -3 but must be >= 0"},
      [](AttentionOptions& o) { o.threads = -3; });
  row("scale", {"options.scale is nan but must be finite"},
      [](AttentionOptions& o) { o.scale = std::numeric_limits<double>::quiet_NaN(); });
  row("scale", {"options.scale is inf but must be finite"},
      [](AttentionOptions& o) { o.scale = std::numeric_limits<double>::infinity(); });
  row("softcap", {"options.softcap is -0.5 but must be finite and >= 0"},
      [](AttentionOptions& o) { o.softcap = -0.5; });
  row("softcap", {"options.softcap is inf"},
      [](AttentionOptions& o) { o.softcap = std::numeric_limits<double>::infinity(); });
  row("softcap", {"options.softcap is nan"},
      [](AttentionOptions& o) { o.softcap = std::numeric_limits<double>::quiet_NaN(); });
  static const Index too_long[2] = {7, 8};
  static const Index negative[2] = {-1, 3};
  row("key_lengths",
      {"options.key_lengths[" + std::to_string(batch - 1) + "] is ", "but must be in [0, 7] (n_k"},
      [batch](AttentionOptions& o) {
        o.key_lengths = batch == 1 ? blockattn::Span<const Index>(too_long + 1, 1) : too_long;
      });
  row("key_lengths", {"options.key_lengths[0] is -1 but must be in [0, 7]"},
      [](AttentionOptions& o) { o.key_lengths = negative; });
  static const double slopes[3] = {0.5, 0.25, std::numeric_limits<double>::quiet_NaN()};
  row("alibi_slopes", {"options.alibi_slopes[" + std::to_string(heads - 1) + "] is nan"},
      [heads](AttentionOptions& o) {
        o.alibi_slopes = {slopes + (3 - heads), heads};
      });
  row("key_lengths null",
      {"options.key_lengths.data() is null but options.key_lengths.size() is 2"},
      [](AttentionOptions& o) {
        o.key_lengths = {nullptr, 2};
      });
  row("alibi_slopes null",
      {"options.alibi_slopes.data() is null but options.alibi_slopes.size() is 1"},
      [](AttentionOptions& o) {
        o.alibi_slopes = {nullptr, 1};
      });
  if (batch > 1) {
    row("key_lengths short",
        {"options.key_lengths.size() is " + std::to_string(batch - 1) + " but the batch size is " +
         std::to_string(batch) + " (one key length per sequence)"},
        [batch](AttentionOptions& o) {
          o.key_lengths = {too_long, batch - 1};
        });
  }
  if (heads > 1) {
    row("alibi_slopes short",
        {"options.alibi_slopes.size() is " + std::to_string(heads - 1) +
         " but the number of query heads is " + std::to_string(heads) + " (one slope per query"},
        [heads](AttentionOptions& o) {
          o.alibi_slopes = {slopes, heads - 1};
        });
  }
  static const BlockSparseLayout two_heads(2, 2, 2, 4, 4);
  static const BlockSparseLayout few_queries(1, 1, 2, 4, 4);
  static const BlockSparseLayout few_keys(1, 3, 3, 2, 2);
  if (heads != 2) {
    row("block_sparse heads",
        {"options.block_sparse->heads() is 2 but q has " + std::to_string(heads) + " heads"},
        [](AttentionOptions& o) { o.block_sparse = &two_heads; });
  }
  row("block_sparse queries", {"options.block_sparse covers 4 queries but n_q is 5"},
      [](AttentionOptions& o) { o.block_sparse = &few_queries; });
  row("block_sparse keys", {"options.block_sparse covers 6 keys but n_k is 7"},
      [](AttentionOptions& o) { o.block_sparse = &few_keys; });
}

// --- attention(), single head ----------------------------------------------------------------

template <class T>
void attention_rows(Table<T>& table) {
  using blockattn::attention;
  const auto shape = [](Index n_q, Index d, Index n_k, Index d_k, Index n_v, Index d_v,
                        Index out_rows, Index out_cols, std::vector<std::string> message) {
    return std::make_pair(std::array<Index, 8>{n_q, d, n_k, d_k, n_v, d_v, out_rows, out_cols},
                          std::move(message));
  };
  for (const auto& [s, message] : {
           shape(5, 0, 7, 0, 7, 3, 5, 3, {"q.cols() is 0"}),
           shape(5, 4, 7, 6, 7, 3, 5, 3, {"k.cols() is 6 but q.cols() is 4"}),
           shape(5, 4, 7, 4, 8, 3, 5, 3, {"v.rows() is 8 but k.rows() is 7"}),
           shape(5, 4, 7, 4, 7, 3, 6, 3, {"out.rows() is 6 but q.rows() is 5"}),
           shape(5, 4, 7, 4, 7, 3, 5, 2, {"out.cols() is 2 but v.cols() is 3"}),
       }) {
    std::vector<std::string> m = message;
    m.insert(m.begin(), "blockattn::attention: ");
    add<T>(table, "attention/" + message[0].substr(0, message[0].find(" is")), m,
           [s = s](Buffers<T>& b) {
             attention(b.in(s[0], s[1]), b.in(s[2], s[3]), b.in(s[4], s[5]), b.out(s[6], s[7]), {},
                       b.out_span(s[0]));
           });
  }
  option_rows<T>(table, "attention", 1, 1, [](Buffers<T>& b, const AttentionOptions& o) {
    attention(b.in(5, 4), b.in(7, 4), b.in(7, 3), b.out(5, 3), o, b.out_span(5));
  });
  add<T>(table, "attention/lse short",
         {"blockattn::attention: lse.size() is 4 but q.rows() is 5 (one log-sum-exp per query)"},
         [](Buffers<T>& b) {
           attention(b.in(5, 4), b.in(7, 4), b.in(7, 3), b.out(5, 3), {}, b.out_span(4));
         });
  add<T>(table, "attention/lse null",
         {"blockattn::attention: lse.data() is null but lse.size() is 5"}, [](Buffers<T>& b) {
           attention(b.in(5, 4), b.in(7, 4), b.in(7, 3), b.out(5, 3), {},
                     blockattn::Span<T>(nullptr, 5));
         });
  add<T>(table, "attention/out self-overlap",
         {"blockattn::attention: out.outerStride() is 2 but out.cols() is 3"}, [](Buffers<T>& b) {
           Matrix<T>& out = b.out(1, 16);
           Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> rows(out.data(), 5, 3,
                                                               Eigen::OuterStride<>(2));
           attention(b.in(5, 4), b.in(7, 4), b.in(7, 3), rows);
         });
  // Aliasing: out or lse inside q, k, v (or lse inside out).
  for (const char* input : {"q", "k", "v"}) {
    const std::string name = input;
    add<T>(table, "attention/out aliases " + name,
           {"blockattn::attention: out overlaps the memory of " + name}, [name](Buffers<T>& b) {
             Matrix<T>& q = b.in(5, 4);
             Matrix<T>& k = b.in(7, 4);
             Matrix<T>& v = b.in(7, 4);
             Matrix<T>& target = name == "q" ? q : name == "k" ? k : v;
             attention(q, k, v, target.topRows(5), {}, b.out_span(5));
           });
    add<T>(table, "attention/lse aliases " + name,
           {"blockattn::attention: lse overlaps the memory of " + name}, [name](Buffers<T>& b) {
             Matrix<T>& q = b.in(5, 4);
             Matrix<T>& k = b.in(7, 4);
             Matrix<T>& v = b.in(7, 4);
             Matrix<T>& target = name == "q" ? q : name == "k" ? k : v;
             attention(q, k, v, b.out(5, 4), {}, blockattn::Span<T>(target.data() + 2, 5));
           });
  }
  add<T>(table, "attention/lse aliases out",
         {"blockattn::attention: lse overlaps the memory of out"}, [](Buffers<T>& b) {
           Matrix<T>& out = b.out(5, 3);
           attention(b.in(5, 4), b.in(7, 4), b.in(7, 3), out, {},
                     blockattn::Span<T>(out.data() + 9, 5));
         });
}

// --- attention(), TensorView ------------------------------------------------------------------

/// A contiguous BSHD tensor over a fresh buffer (an input, or a NaN-filled output).
template <class T>
TensorView<T> tensor(Buffers<T>& b, bool output, Index batch, Index seq, Index heads, Index dim) {
  const Index size = std::max<Index>(1, batch * seq * heads * dim);
  T* data = output ? b.out_ptr(size) : b.in(1, size).data();
  return blockattn::make_tensor_view(data, batch, seq, heads, dim);
}

template <class T>
void tensor_attention_rows(Table<T>& table) {
  // The valid problem: q [2, 5, 3, 4], k [2, 7, 1, 4], v [2, 7, 1, 6], out [2, 5, 3, 6].
  using Dims = std::array<Index, 4>;
  struct Case {
    Dims q, k, v, out;
    std::vector<std::string> message;
  };
  const Dims q{2, 5, 3, 4}, k{2, 7, 1, 4}, v{2, 7, 1, 6}, o{2, 5, 3, 6};
  const std::vector<Case> cases = {
      {{2, -5, 3, 4}, k, v, o, {"q has a negative size [2, -5, 3, 4]"}},
      {q, {2, 7, -1, 4}, v, o, {"k has a negative size [2, 7, -1, 4]"}},
      {q, k, {-2, 7, 1, 6}, o, {"v has a negative size [-2, 7, 1, 6]"}},
      {{2, 5, 3, 0}, {2, 7, 1, 0}, v, o, {"q.dim is 0"}},
      {q, {2, 7, 1, 5}, v, o, {"k.dim is 5 but q.dim is 4"}},
      {q, {3, 7, 1, 4}, {3, 7, 1, 6}, o, {"k.batch is 3 but q.batch is 2"}},
      {q, k, {1, 7, 1, 6}, o, {"v.batch is 1 but q.batch is 2"}},
      {q, k, {2, 8, 1, 6}, o, {"v.seq is 8 but k.seq is 7"}},
      {q, k, {2, 7, 3, 6}, o, {"v.heads is 3 but k.heads is 1"}},
      {q, {2, 7, 0, 4}, {2, 7, 0, 6}, o, {"k.heads is 0"}},
      {q, {2, 7, 2, 4}, {2, 7, 2, 6}, o, {"q.heads is 3 but k.heads is 2", "multiple"}},
      {q, k, v, {1, 5, 3, 6}, {"out.batch is 1 but q.batch is 2"}},
      {q, k, v, {2, 4, 3, 6}, {"out.seq is 4 but q.seq is 5"}},
      {q, k, v, {2, 5, 1, 6}, {"out.heads is 1 but q.heads is 3"}},
      {q, k, v, {2, 5, 3, 4}, {"out.dim is 4 but v.dim is 6"}},
  };
  for (const auto& c : cases) {
    std::vector<std::string> m = c.message;
    m.insert(m.begin(), "blockattn::attention: ");
    add<T>(table, "attention[tensor]/" + c.message[0].substr(0, c.message[0].find(" ")), m,
           [c](Buffers<T>& b) {
             // Negative sizes get a valid buffer; the view alone carries the bad size.
             const auto make = [&](bool output, const Dims& d) {
               TensorView<T> t = tensor<T>(b, output, std::abs(d[0]), std::abs(d[1]),
                                           std::abs(d[2]), std::abs(d[3]));
               t.batch = d[0], t.seq = d[1], t.heads = d[2], t.dim = d[3];
               return t;
             };
             blockattn::attention(as_const(make(false, c.q)), as_const(make(false, c.k)),
                                  as_const(make(false, c.v)), make(true, c.out), {},
                                  b.out_span(2 * 3 * 5));
           });
  }
  add<T>(table, "attention[tensor]/null q or out",
         {"blockattn::attention: q.data or out.data is null"}, [q, k, v, o](Buffers<T>& b) {
           TensorView<T> qt = tensor<T>(b, false, q[0], q[1], q[2], q[3]);
           qt.data = nullptr;
           blockattn::attention(as_const(qt), as_const(tensor<T>(b, false, k[0], k[1], k[2], k[3])),
                                as_const(tensor<T>(b, false, v[0], v[1], v[2], v[3])),
                                tensor<T>(b, true, o[0], o[1], o[2], o[3]));
         });
  add<T>(table, "attention[tensor]/null q or out",
         {"blockattn::attention: q.data or out.data is null"}, [q, k, v, o](Buffers<T>& b) {
           TensorView<T> ot = tensor<T>(b, true, o[0], o[1], o[2], o[3]);
           ot.data = nullptr;
           blockattn::attention(as_const(tensor<T>(b, false, q[0], q[1], q[2], q[3])),
                                as_const(tensor<T>(b, false, k[0], k[1], k[2], k[3])),
                                as_const(tensor<T>(b, false, v[0], v[1], v[2], v[3])), ot);
         });
  for (const bool null_k : {true, false}) {
    add<T>(table, "attention[tensor]/null k or v",
           {"blockattn::attention: k.data or v.data is null"}, [=](Buffers<T>& b) {
             TensorView<T> kt = tensor<T>(b, false, k[0], k[1], k[2], k[3]);
             TensorView<T> vt = tensor<T>(b, false, v[0], v[1], v[2], v[3]);
             (null_k ? kt : vt).data = nullptr;
             blockattn::attention(as_const(tensor<T>(b, false, q[0], q[1], q[2], q[3])),
                                  as_const(kt), as_const(vt),
                                  tensor<T>(b, true, o[0], o[1], o[2], o[3]));
           });
  }
  for (const Index head_stride : {Index{0}, Index{3}}) {  // heads on one address; overlapping
    add<T>(table, "attention[tensor]/out self-overlap",
           {"blockattn::attention: out's strides [90, 18, " + std::to_string(head_stride) + "]",
            "make elements of out [2, 5, 3, 6] share memory"},
           [=](Buffers<T>& b) {
             TensorView<T> out = tensor<T>(b, true, o[0], o[1], o[2], o[3]);
             out.head_stride = head_stride;
             blockattn::attention(as_const(tensor<T>(b, false, q[0], q[1], q[2], q[3])),
                                  as_const(tensor<T>(b, false, k[0], k[1], k[2], k[3])),
                                  as_const(tensor<T>(b, false, v[0], v[1], v[2], v[3])), out);
           });
  }
  option_rows<T>(
      table, "attention[tensor]", 2, 3, [q, k, v, o](Buffers<T>& b, const AttentionOptions& opt) {
        blockattn::attention(as_const(tensor<T>(b, false, q[0], q[1], q[2], q[3])),
                             as_const(tensor<T>(b, false, k[0], k[1], k[2], k[3])),
                             as_const(tensor<T>(b, false, v[0], v[1], v[2], v[3])),
                             tensor<T>(b, true, o[0], o[1], o[2], o[3]), opt, b.out_span(30));
      });
  add<T>(table, "attention[tensor]/lse short",
         {"blockattn::attention: lse.size() is 29 but batch·heads·n_q is 30"},
         [q, k, v, o](Buffers<T>& b) {
           blockattn::attention(as_const(tensor<T>(b, false, q[0], q[1], q[2], q[3])),
                                as_const(tensor<T>(b, false, k[0], k[1], k[2], k[3])),
                                as_const(tensor<T>(b, false, v[0], v[1], v[2], v[3])),
                                tensor<T>(b, true, o[0], o[1], o[2], o[3]), {}, b.out_span(29));
         });
  // Aliasing, with q, k, v and out all views into one input buffer (a fused QKV + out).
  for (int target = 0; target < 4; ++target) {
    const char* names[] = {"q", "k", "v", "out"};
    for (const bool lse : {false, true}) {
      if (!lse && target == 3) continue;
      const std::string what =
          std::string(lse ? "lse" : "out") + " overlaps the memory of " + names[target];
      add<T>(table, "attention[tensor]/" + what, {"blockattn::attention: " + what},
             [=](Buffers<T>& b) {
               T* fused = b.in(1, 400).data();
               // Disjoint views: q at 0 (120 elements), k at 120 (56), v at 176 (84), out 260.
               const auto view = [&](Index offset, const Dims& d) {
                 return blockattn::make_tensor_view(fused + offset, d[0], d[1], d[2], d[3]);
               };
               const Index offsets[] = {0, 120, 176, 260};
               TensorView<T> out = view(lse ? 260 : offsets[target] + 1, o);
               const blockattn::Span<T> lse_span =
                   lse ? blockattn::Span<T>(fused + offsets[target] + 3, 30) : blockattn::Span<T>();
               blockattn::attention(as_const(view(0, q)), as_const(view(120, k)),
                                    as_const(view(176, v)), out, {}, lse_span);
             });
    }
  }
}

// --- merge_attention_states --------------------------------------------------------------------

template <class T>
void merge_rows(Table<T>& table) {
  using blockattn::merge_attention_states;
  const auto merge = [](Buffers<T>& b, Index rows_b, Index cols_b, Index rows, Index cols) {
    merge_attention_states(b.in(4, 3), b.in_span(4), b.in(rows_b, cols_b), b.in_span(4),
                           b.out(rows, cols), b.out_span(4));
  };
  add<T>(
      table, "merge_attention_states/out_b.rows",
      {"blockattn::merge_attention_states: parts[1].out.rows() is 5 but parts[0].out.rows() is 4"},
      [=](Buffers<T>& b) { merge(b, 5, 3, 4, 3); });
  add<T>(
      table, "merge_attention_states/out_b.cols",
      {"blockattn::merge_attention_states: parts[1].out.cols() is 2 but parts[0].out.cols() is 3"},
      [=](Buffers<T>& b) { merge(b, 4, 2, 4, 3); });
  add<T>(table, "merge_attention_states/out.rows",
         {"blockattn::merge_attention_states: out.rows() is 3 but parts[0].out.rows() is 4"},
         [=](Buffers<T>& b) { merge(b, 4, 3, 3, 3); });
  add<T>(table, "merge_attention_states/out.cols",
         {"blockattn::merge_attention_states: out.cols() is 4 but parts[0].out.cols() is 3"},
         [=](Buffers<T>& b) { merge(b, 4, 3, 4, 4); });
  for (const bool null_a : {true, false}) {
    const std::string name = null_a ? "parts[0].lse" : "parts[1].lse";
    const std::string rows = null_a ? "parts[0].out.rows()" : "parts[1].out.rows()";
    add<T>(table, "merge_attention_states/lse empty",
           {"blockattn::merge_attention_states: " + name + " is empty but " + rows + " is 4"},
           [=](Buffers<T>& b) {
             using Span = blockattn::Span<const T>;
             merge_attention_states(b.in(4, 3), null_a ? Span() : b.in_span(4), b.in(4, 3),
                                    null_a ? b.in_span(4) : Span(), b.out(4, 3));
           });
    add<T>(table, "merge_attention_states/lse short",
           {"blockattn::merge_attention_states: " + name + ".size() is 3 but " + rows + " is 4"},
           [=](Buffers<T>& b) {
             merge_attention_states(b.in(4, 3), b.in_span(null_a ? 3 : 4), b.in(4, 3),
                                    b.in_span(null_a ? 4 : 3), b.out(4, 3));
           });
  }
  for (const bool side_a : {true, false}) {
    const std::string name = side_a ? "parts[0].out" : "parts[1].out";
    add<T>(table, "merge_attention_states/out overlaps " + name,
           {"blockattn::merge_attention_states: out overlaps the memory of " + name},
           [=](Buffers<T>& b) {
             Matrix<T>& shared = b.in(5, 3);  // out = rows 1..4, the input rows 0..3
             Matrix<T>& other = b.in(4, 3);
             using View = blockattn::ConstMatrixView<T>;
             const View top(shared.topRows(4));
             const View rest(other);
             merge_attention_states(side_a ? top : rest, b.in_span(4), side_a ? rest : top,
                                    b.in_span(4), shared.bottomRows(4));
           });
    const std::string lse_name = side_a ? "parts[0].lse" : "parts[1].lse";
    add<T>(table, "merge_attention_states/lse overlaps " + lse_name,
           {"blockattn::merge_attention_states: lse overlaps the memory of " + lse_name},
           [=](Buffers<T>& b) {
             T* shared = b.in(1, 6).data();
             T* other = b.in(1, 4).data();
             using Span = blockattn::Span<const T>;
             merge_attention_states(b.in(4, 3), Span(side_a ? shared : other, 4), b.in(4, 3),
                                    Span(side_a ? other : shared, 4), b.out(4, 3),
                                    blockattn::Span<T>(shared + 1, 4));
           });
  }
  add<T>(table, "merge_attention_states/lse overlaps out",
         {"blockattn::merge_attention_states: lse overlaps the memory of out"}, [](Buffers<T>& b) {
           Matrix<T>& out = b.out(4, 3);
           merge_attention_states(b.in(4, 3), b.in_span(4), b.in(4, 3), b.in_span(4), out,
                                  blockattn::Span<T>(out.data() + 5, 4));
         });
  add<T>(table, "merge_attention_states[N]/no parts",
         {"blockattn::merge_attention_states: parts is empty"}, [](Buffers<T>& b) {
           merge_attention_states(std::vector<blockattn::AttentionState<T>>{}, b.out(4, 3));
         });
  add<T>(table, "merge_attention_states[tensor]/lse short",
         {"blockattn::merge_attention_states: parts[1].lse.size() is 5 but batch·heads·n_q is 6"},
         [](Buffers<T>& b) {
           std::vector<blockattn::TensorAttentionState<T>> parts;
           parts.push_back({as_const(tensor<T>(b, false, 2, 3, 1, 4)), b.in_span(6)});
           parts.push_back({as_const(tensor<T>(b, false, 2, 3, 1, 4)), b.in_span(5)});
           merge_attention_states(parts, tensor<T>(b, true, 2, 3, 1, 4), b.out_span(6));
         });
  add<T>(table, "merge_attention_states/lse out short",
         {"blockattn::merge_attention_states: lse.size() is 3 but out.rows() is 4"},
         [](Buffers<T>& b) {
           merge_attention_states(b.in(4, 3), b.in_span(4), b.in(4, 3), b.in_span(4), b.out(4, 3),
                                  b.out_span(3));
         });
}

// --- attention_backward: the lse it requires ----------------------------------------------------

template <class T>
void backward_rows(Table<T>& table) {
  const auto run = [](Buffers<T>& b, blockattn::Span<const T> lse) {
    blockattn::AttentionBackwardInputs<T> in;
    in.q = b.in(5, 4), in.k = b.in(7, 4), in.v = b.in(7, 3), in.out = b.in(5, 3);
    in.dout = b.in(5, 3), in.lse = lse;
    blockattn::AttentionGradients<T> grads;
    grads.dq = b.out(5, 4), grads.dk = b.out(7, 4), grads.dv = b.out(7, 3);
    blockattn::attention_backward(in, grads);
  };
  add<T>(table, "attention_backward/lse empty",
         {"blockattn::attention_backward: lse is empty but q.rows() is 5"},
         [=](Buffers<T>& b) { run(b, {}); });
  add<T>(table, "attention_backward/lse short",
         {"blockattn::attention_backward: lse.size() is 4 but q.rows() is 5"},
         [=](Buffers<T>& b) { run(b, b.in_span(4)); });
  add<T>(table, "attention_backward[tensor]/lse short",
         {"blockattn::attention_backward: lse.size() is 5 but batch·heads·n_q is 6"},
         [](Buffers<T>& b) {
           const auto in = [&](Index seq, Index dim) {
             return as_const(tensor<T>(b, false, 2, seq, 1, dim));
           };
           const auto out = [&](Index seq, Index dim) {
             return tensor<T>(b, true, 2, seq, 1, dim);
           };
           blockattn::TensorBackwardInputs<T> args;
           args.q = in(3, 4), args.k = in(7, 4), args.v = in(7, 3), args.out = in(3, 3);
           args.dout = in(3, 3), args.lse = b.in_span(5);
           blockattn::TensorGradients<T> grads;
           grads.dq = out(3, 4), grads.dk = out(7, 4), grads.dv = out(7, 3);
           blockattn::attention_backward(args, grads);
         });
}

/// The whole table. Append new entry points' rows here.
template <class T>
Table<T> validation_table() {
  Table<T> table;
  softmax_rows(table);
  softmax_topk_rows(table);
  layout_rows(table);
  attention_rows(table);
  tensor_attention_rows(table);
  merge_rows(table);
  backward_rows(table);
  return table;
}

template <class T>
class ValidationTest : public ::testing::Test {};
TYPED_TEST_SUITE(ValidationTest, blockattn::test::Scalars, );

TYPED_TEST(ValidationTest, EveryBadInputThrowsBeforeWritingAnything) {
  using T = TypeParam;
  const Table<T> table = validation_table<T>();
  std::set<std::string> branches;
  for (const Row<T>& row : table) {
    SCOPED_TRACE(row.branch);
    branches.insert(row.branch);
    Buffers<T> buffers;
    std::string message;
    bool threw_expected = false;
    try {
      row.call(buffers);
    } catch (const std::invalid_argument& e) {
      threw_expected = row.expect == Expect::InvalidArgument;
      message = e.what();
    } catch (const std::out_of_range& e) {
      threw_expected = row.expect == Expect::OutOfRange;
      message = e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw another exception type: " << e.what();
    }
    EXPECT_TRUE(threw_expected) << "did not throw the expected exception type";
    for (const std::string& part : row.message) EXPECT_THAT(message, ::testing::HasSubstr(part));
    EXPECT_THAT(message, ::testing::StartsWith("blockattn::"));
    buffers.expect_untouched();
  }
  std::cout << "validation_test: " << table.size() << " bad inputs covering " << branches.size()
            << " validation branches\n";
  this->RecordProperty("bad_inputs", static_cast<int>(table.size()));
  this->RecordProperty("branches", static_cast<int>(branches.size()));
  EXPECT_GE(table.size(), 100U);
}

}  // namespace

}  // namespace validation_test
