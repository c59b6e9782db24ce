// The two private ops through which Python manages the direct CPU kernels (csrc/direct.h):
//   loramix::_direct_install(str name) -> bool   register `name`'s direct kernel for the CPU key
//                                                 (false: no such kernel in this build)
//   loramix::_direct_delegate(bool on) -> ()     hand every direct call to the Python kernel
// and one that tells whether the kernels' at::parallel_for runs in parallel (csrc/flags.py: it
// does not when the extension is compiled without OpenMP):
//   loramix::_parallel_threads() -> int           threads that took part in a 1024-step loop

#include "direct.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace loramix {
namespace {

bool direct_install(const std::string& name) {
  static std::mutex mutex;
  static std::set<std::string> done;
  // Libraries live as long as the process: their destructors would deregister the kernels.
  static auto* libraries = new std::vector<std::unique_ptr<torch::Library>>();
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(name)) return true;
  const auto it = direct::installers().find(name);
  if (it == direct::installers().end()) return false;
  libraries->push_back(std::make_unique<torch::Library>(
      torch::Library::IMPL, "loramix", c10::DispatchKey::CPU, __FILE__, __LINE__));
  it->second(*libraries->back());
  done.insert(name);
  return true;
}

void direct_delegate(bool on) { direct::delegating().store(on); }

int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    seen |= uint64_t{1} << (at::get_thread_num() & 63);
  });
  int64_t n = 0;
  for (uint64_t bits = seen.load(); bits != 0; bits &= bits - 1) ++n;
  return n;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_direct_install(str name) -> bool");
  m.def("_direct_delegate(bool on) -> ()");
  m.def("_parallel_threads() -> int");
}

// CompositeExplicitAutograd: no tensor arguments, so no backend key to dispatch on.
TORCH_LIBRARY_IMPL(loramix, CompositeExplicitAutograd, m) {
  m.impl("_direct_install", &direct_install);
  m.impl("_direct_delegate", &direct_delegate);
  m.impl("_parallel_threads", &parallel_threads);
}

}  // namespace loramix
