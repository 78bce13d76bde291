// The smallest useful program: a softmax normaliser computed in pieces and merged exactly.
#include <cmath>
#include <cstdio>

#include <blockattn/blockattn.hpp>

int main() {
  // [readme]
  const float scores[] = {2.0F, -1.0F, 0.5F, 3.0F, 1.0F};

  // One pass over the first three scores, another over the last two (think: two threads).
  blockattn::OnlineSoftmax<float> left, right;
  left.update(scores, 3);
  right.update(scores + 3, 2);
  left.merge(right);  // exactly the state of one pass over all five

  std::printf("log-sum-exp = %f\n", static_cast<double>(left.log_sum_exp()));
  // [readme]
  double direct = 0;
  for (const float s : scores) direct += std::exp(static_cast<double>(s));
  std::printf("direct      = %f\n", std::log(direct));
  return std::fabs(std::log(direct) - static_cast<double>(left.log_sum_exp())) < 1e-5 ? 0 : 1;
}
