// Uses the public API the way a user would, and fails unless the answer is right.
#include <cmath>
#include <cstdio>

#include <blockattn/blockattn.hpp>

int main() {
  blockattn::OnlineSoftmax<float> left;
  blockattn::OnlineSoftmax<float> right;
  left.update(1.0F);
  right.update(2.0F);
  left.merge(right);
  const float expected = std::log(std::exp(1.0F) + std::exp(2.0F));
  const bool ok = std::fabs(left.log_sum_exp() - expected) < 1e-6F;
  std::printf("blockattn %d.%d.%d consumer: %s\n", BLOCKATTN_VERSION_MAJOR, BLOCKATTN_VERSION_MINOR,
              BLOCKATTN_VERSION_PATCH, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
