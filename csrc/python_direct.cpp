// Direct Python entry points of the CPU kernels: fusedopt._C._adam_cpu / _sgd_cpu.
//
// Why: calling torch.ops.fusedopt.adam_ from Python boxes every tensor of the six lists into
// IValues and unboxes them again (refcount traffic on every TensorImpl, GIL round trips on
// release). With 1000 small tensors that costs ~0.6 ms, more than the update itself. These
// entry points instead BORROW the tensors straight from the Python lists (no refcount
// changes) and call the same C++ function the dispatcher would (cpu/adam.cpp, cpu/sgd.cpp).
//
// They only take plain CPU-side tensors (torch.Tensor / nn.Parameter, no subclass, no Python
// or functorch dispatch keys, no active TorchDispatchMode). Otherwise they return False and
// the caller uses torch.ops.fusedopt.* (which handles subclasses, fake tensors, modes). Under
// torch.compile the caller always uses torch.ops, which dynamo can trace.
#include "python_direct.h"

#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "cpu/ops_cpu.h"

namespace fusedopt {
namespace {

namespace py = pybind11;

// Keys of tensors whose meaning is not "the memory you see": they must go through the
// dispatcher.
const c10::DispatchKeySet kNeedsDispatcher = c10::DispatchKeySet({
    c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
    c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::BatchedNestedTensor,
    c10::DispatchKey::Conjugate, c10::DispatchKey::Negative, c10::DispatchKey::ZeroTensor});

// Tensors of one Python list, borrowed: the tuple copy keeps them alive even if another thread
// edits the list while the GIL is released; the at::Tensor handles hold no reference.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }

  // False when some element is not a plain tensor (the caller then uses the dispatcher).
  bool load(py::handle sequence) {
    keep_alive_ = py::reinterpret_steal<py::tuple>(PySequence_Tuple(sequence.ptr()));
    if (!keep_alive_) throw py::error_already_set();
    const Py_ssize_t n = PyTuple_GET_SIZE(keep_alive_.ptr());
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyTuple_GET_ITEM(keep_alive_.ptr(), i);
      if (!THPVariable_CheckExact(obj)) return false;
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (t.defined() && t.key_set().has_any(kNeedsDispatcher)) return false;
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
    }
    return true;
  }

  // The .grad of each of `params` (already loaded), borrowed from the autograd metadata: what
  // `[p.grad for p in params]` gives, without a Python attribute read per tensor (~0.1 us each).
  // False when some param has no grad or a grad that needs the dispatcher.
  bool load_grads_of(const BorrowedTensors& params) {
    tensors_.reserve(params.tensors_.size());
    for (const at::Tensor& p : params.tensors_) {
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.key_set().has_any(kNeedsDispatcher)) return false;
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(g));
    }
    return true;
  }

  at::TensorList list() const { return tensors_; }

 private:
  py::tuple keep_alive_;
  std::vector<at::Tensor> tensors_;
};

bool dispatch_modes_active() { return c10::impl::TorchDispatchModeTLS::any_modes_set(); }

using OptTensor = std::optional<at::Tensor>;

bool adam_direct(py::handle params, py::handle grads, py::handle exp_avgs,
                 py::handle exp_avg_sqs, py::handle max_exp_avg_sqs, py::handle state_steps,
                 double lr, double beta1, double beta2, double eps, double weight_decay,
                 bool amsgrad, bool maximize, bool decoupled_weight_decay,
                 const OptTensor& lr_tensor, const OptTensor& grad_scale,
                 const OptTensor& found_inf) {
  if (dispatch_modes_active()) return false;
  BorrowedTensors p, g, m, v, vmax, steps;
  if (!p.load(params) || !(grads.is_none() ? g.load_grads_of(p) : g.load(grads)) ||
      !m.load(exp_avgs) || !v.load(exp_avg_sqs) || !vmax.load(max_exp_avg_sqs) ||
      !steps.load(state_steps)) {
    return false;
  }
  py::gil_scoped_release no_gil;
  RECORD_FUNCTION("fusedopt::adam_", std::vector<c10::IValue>());
  cpu::adam_cpu(p.list(), g.list(), m.list(), v.list(), vmax.list(), steps.list(), lr, beta1,
                beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor,
                grad_scale, found_inf);
  return true;
}

bool sgd_direct(py::handle params, py::handle grads, py::handle momentum_buffers, double lr,
                double momentum, double dampening, double weight_decay, bool nesterov,
                bool maximize, bool is_first_step, const OptTensor& lr_tensor,
                const OptTensor& grad_scale, const OptTensor& found_inf) {
  if (dispatch_modes_active()) return false;
  BorrowedTensors p, g, buf;
  if (!p.load(params) || !(grads.is_none() ? g.load_grads_of(p) : g.load(grads)) ||
      !buf.load(momentum_buffers)) {
    return false;
  }
  py::gil_scoped_release no_gil;
  RECORD_FUNCTION("fusedopt::sgd_", std::vector<c10::IValue>());
  cpu::sgd_cpu(p.list(), g.list(), buf.list(), lr, momentum, dampening, weight_decay, nesterov,
               maximize, is_first_step, lr_tensor, grad_scale, found_inf);
  return true;
}

}  // namespace

void bind_direct_calls(py::module& m) {
  m.def("_adam_cpu", &adam_direct,
        "Eager fast path of torch.ops.fusedopt.adam_ for plain CPU tensors (positional "
        "arguments in schema order; grads=None reads each param's .grad). Returns False, "
        "doing nothing, when the call must go through the dispatcher instead (or, with "
        "grads=None, when a param has no plain grad).");
  m.def("_sgd_cpu", &sgd_direct,
        "Eager fast path of torch.ops.fusedopt.sgd_ for plain CPU tensors (positional "
        "arguments in schema order; grads=None reads each param's .grad). Returns False, "
        "doing nothing, when the call must go through the dispatcher instead (or, with "
        "grads=None, when a param has no plain grad).");
}

}  // namespace fusedopt
