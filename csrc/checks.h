// Argument classes shared by the native kernels' metadata checks (the Python validators' dtype
// rules, loramix_kernels/_checks.py: FLOAT_DTYPES, INDEX_DTYPES).

#pragma once

#include <ATen/core/Tensor.h>

namespace loramix {

// fp16 / bf16 / fp32: the dtypes the ops compute in.
inline bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// int32 / int64: the index dtypes.
inline bool is_index(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

}  // namespace loramix
