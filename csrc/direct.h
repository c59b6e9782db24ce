// Direct CPU kernels: a C++ kernel registered for a public op's CPU dispatch key, so a CPU call
// of that op (torch.ops.loramix.<op>, the public function, autograd's redispatch, an engine's
// decode step) never leaves C++: no trip into the Python kernel, no Python validator.
//
// The op itself stays defined by Python (loramix_kernels/ops/_registry.py, register_op with
// direct_cpu=True), with its Python kernel also registered as the private op
// loramix::_<op>_py (same schema, CPU key). The direct kernel checks the metadata that its fast
// path needs; a call it does not take (an argument the Python validator may reject, a case the
// fast path does not cover, or delegation switched on) goes to _<op>_py, which validates, names
// the rejected argument with the Python error message, or runs the Python CPU path. Python
// switches delegation on while CPU tensors must take the Triton kernels under the interpreter
// (LORAMIX_BACKEND=triton) and while the native kernels are disabled (tests); see
// loramix_kernels/_native.py (install_direct, sync_direct).
//
// Python installs a direct kernel (loramix::_direct_install(name), csrc/direct.cpp) only after
// defining the op, and then registers no Python CPU kernel for it, so the CPU key has one kernel.

#pragma once

#include "checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <string>

namespace loramix {
namespace direct {

// Whether the direct kernels hand every call to the Python kernel (see above). Starts on: Python
// switches it off once it has decided (loramix_kernels/_native.py, sync_direct).
inline std::atomic<bool>& delegating() {
  static std::atomic<bool> flag{true};
  return flag;
}

using Installer = void (*)(torch::Library&);

// Installers by public op name, filled by the static initialisers of the kernels' files.
inline std::map<std::string, Installer>& installers() {
  static std::map<std::string, Installer> table;
  return table;
}

struct Add {
  Add(const char* name, Installer install) { installers()[name] = install; }
};

// The Python kernel of public op `name` (loramix::_<name>_py), typed as `Sig`.
template <typename Sig>
c10::TypedOperatorHandle<Sig> python_kernel(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("loramix::_") + name + "_py").c_str(), "")
      .typed<Sig>();
}

// Run the Python kernel on the CPU key (below autograd and autocast, which already ran).
template <typename Sig, typename... Args>
auto delegate(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), std::forward<Args>(args)...);
}

// A dense CPU tensor of `ndim` dimensions (what every direct fast path reads).
inline bool plain(const at::Tensor& t, int64_t ndim) {
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.dim() == ndim;
}

}  // namespace direct
}  // namespace loramix
