// Direct Python entry points of the kernels: fusedopt._C._adam_cpu / _sgd_cpu (in CUDA builds
// also _adam_cuda / _sgd_cuda), _total_norm_cpu / _scale_cpu, _summarize (the metadata pass of
// the clipping code), _addresses (the table-cache key of the Triton backend) and _same_objects
// (the optimizers' check of their params lists), _sparse_positions (SGD's check of its grads).
//
// Why: calling torch.ops.fusedopt.adam_ from Python boxes every tensor of the six lists into
// IValues and unboxes them again (refcount traffic on every TensorImpl, GIL round trips on
// release). With 1000 small tensors that costs ~0.6 ms, more than the update itself. These
// entry points instead BORROW the tensors straight from the Python lists (no refcount
// changes) and call the same C++ function the dispatcher would (cpu/adam.cpp, cpu/sgd.cpp,
// cuda/ops_cuda.cpp).
//
// They only take plain tensors (torch.Tensor / nn.Parameter, no subclass, no Python
// or functorch dispatch keys, no active TorchDispatchMode). Otherwise they return False and
// the caller uses torch.ops.fusedopt.* (which handles subclasses, fake tensors, modes). Under
// torch.compile the caller always uses torch.ops, which dynamo can trace.
#include "python_direct.h"

#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/ops_cpu.h"
#include "list_overlap.h"
#if defined(FUSEDOPT_WITH_CUDA)
#include "cuda/ops_cuda.h"
#endif

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
  // False when some param has no grad, a grad that needs the dispatcher, or a sparse one (the
  // caller's general path then refuses it with a clear error, before anything is written).
  bool load_grads_of(const BorrowedTensors& params) {
    tensors_.reserve(params.tensors_.size());
    for (const at::Tensor& p : params.tensors_) {
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.key_set().has_any(kNeedsDispatcher) || g.layout() != at::kStrided) {
        return false;
      }
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

// Impl: the function the dispatcher would call for the tensors' device (cpu::adam_cpu, or
// cuda::adam_cuda in CUDA builds); it checks the devices itself.
template <AdamOp* Impl>
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
  Impl(p.list(), g.list(), m.list(), v.list(), vmax.list(), steps.list(), lr, beta1, beta2, eps,
       weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale, found_inf);
  return true;
}

template <SgdOp* Impl>
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
  Impl(p.list(), g.list(), buf.list(), lr, momentum, dampening, weight_decay, nesterov, maximize,
       is_first_step, lr_tensor, grad_scale, found_inf);
  return true;
}

// All tensors on the CPU (the clipping ops' direct paths leave other devices to the dispatcher).
bool all_cpu(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.device().is_cpu()) return false;
  }
  return true;
}

// torch.ops.fusedopt.total_norm without boxing; None when the dispatcher must take the call.
// With of_grads, `tensors` are params and the norm is that of their .grad (None when one has
// no grad): what an optimizer step with max_grad_norm needs, without a grads list in Python.
py::object total_norm_direct(py::handle tensors, double norm_type, bool of_grads,
                             const std::optional<at::Tensor>& prescale) {
  if (dispatch_modes_active()) return py::none();
  if (prescale.has_value() &&
      (!prescale->device().is_cpu() || prescale->key_set().has_any(kNeedsDispatcher))) {
    return py::none();
  }
  BorrowedTensors loaded, grads;
  if (!loaded.load(tensors)) return py::none();
  if (of_grads && !grads.load_grads_of(loaded)) return py::none();
  const BorrowedTensors& t = of_grads ? grads : loaded;
  if (!all_cpu(t.list())) return py::none();
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    RECORD_FUNCTION("fusedopt::total_norm", std::vector<c10::IValue>());
    out = cpu::total_norm_cpu(t.list(), norm_type, prescale);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

// list_overlap.h's written_memory_shared for Python: `written` and `read` are sequences of
// sequences of tensors (any tensor type; None and tensors without storage, e.g. meta or fake
// ones, are passed over).
bool memory_shared(py::handle written, py::handle read) {
  auto load = [](py::handle lists, std::vector<std::vector<at::Tensor>>& out) {
    for (py::handle list : py::reinterpret_borrow<py::sequence>(lists)) {
      std::vector<at::Tensor>& tensors = out.emplace_back();
      for (py::handle obj : py::reinterpret_borrow<py::sequence>(list)) {
        if (!obj.is_none()) tensors.push_back(py::cast<at::Tensor>(obj));
      }
    }
  };
  std::vector<std::vector<at::Tensor>> w, r;
  load(written, w);
  load(read, r);
  std::vector<at::TensorList> wl(w.begin(), w.end()), rl(r.begin(), r.end());
  py::gil_scoped_release no_gil;
  return written_memory_shared(wl, rl);
}

// torch.ops.fusedopt.scale_ without boxing; False (nothing done) when the dispatcher must.
bool scale_direct(py::handle tensors, const at::Tensor& scale) {
  if (dispatch_modes_active() || scale.key_set().has_any(kNeedsDispatcher)) return false;
  BorrowedTensors t;
  if (!t.load(tensors) || !all_cpu(t.list())) return false;
  py::gil_scoped_release no_gil;
  RECORD_FUNCTION("fusedopt::scale_", std::vector<c10::IValue>());
  cpu::scale_cpu(t.list(), scale);
  return true;
}

// (devices, dtypes, any_sparse) of a sequence of tensors: distinct devices and dtypes in order
// of first appearance, and whether any layout is not strided. What
// fusedopt.clip._norm.Summary reads through three Python attribute getters per tensor (~0.6 us
// a tensor: 0.6 ms for 1000 grads, more than the norm of 1000 small tensors takes), here
// ~10 ns a tensor. None when some element is not a plain tensor (a subclass may answer
// .device / .dtype differently); the caller then reads the attributes in Python.
py::object summarize(py::handle sequence) {
  BorrowedTensors tensors;
  if (!tensors.load(sequence)) return py::none();
  std::vector<c10::Device> devices;
  std::vector<at::ScalarType> dtypes;
  bool any_sparse = false;
  for (const at::Tensor& t : tensors.list()) {
    if (!t.defined()) return py::none();
    const c10::Device device = t.device();
    const at::ScalarType dtype = t.scalar_type();
    if (std::find(devices.begin(), devices.end(), device) == devices.end()) devices.push_back(device);
    if (std::find(dtypes.begin(), dtypes.end(), dtype) == dtypes.end()) dtypes.push_back(dtype);
    any_sparse = any_sparse || t.layout() != at::kStrided;
  }
  py::list device_list, dtype_list;
  for (const c10::Device& d : devices) {
    PyObject* obj = THPDevice_New(d);
    if (obj == nullptr) throw py::error_already_set();
    device_list.append(py::reinterpret_steal<py::object>(obj));
  }
  for (at::ScalarType d : dtypes) {
    dtype_list.append(py::reinterpret_borrow<py::object>(
        reinterpret_cast<PyObject*>(torch::getTHPDtype(d))));
  }
  return py::make_tuple(device_list, dtype_list, any_sparse);
}

// The cache key of the Triton backend's tables (fusedopt/backends/triton/tables.py): the
// data_ptr() and dtype of every tensor of every sequence in `lists`, then the dim(), sizes and
// strides of every tensor of the first `layouts` sequences, as native int64s in one bytes
// object (compared with memcmp). The dtype and strides matter as much as the address: a freed gradient's memory is
// often handed to a tensor of another dtype or layout with the same element count. In Python that is one
// getter call per tensor, ~70 ns each: ~0.35 ms for an Adam step of 1000 tensors (5000 calls),
// more than the GPU needs for the step itself. None when some element is not a plain tensor.
py::object addresses(py::handle lists, size_t layouts) {
  const py::tuple seqs = py::reinterpret_steal<py::tuple>(PySequence_Tuple(lists.ptr()));
  if (!seqs) throw py::error_already_set();
  if (layouts > seqs.size()) throw py::value_error("_addresses: layouts > len(lists)");
  std::vector<BorrowedTensors> loaded(seqs.size());
  size_t total = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (!loaded[i].load(seqs[i])) return py::none();
    total += loaded[i].list().size();
  }
  std::vector<int64_t> key;
  key.reserve(6 * total);
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (const at::Tensor& t : loaded[i].list()) {
      if (!t.defined()) return py::none();
      key.push_back(reinterpret_cast<int64_t>(t.const_data_ptr()));
      key.push_back(static_cast<int64_t>(t.scalar_type()));
    }
  }
  for (size_t i = 0; i < layouts; ++i) {
    for (const at::Tensor& t : loaded[i].list()) {
      // dim, sizes, strides: what decides a tensor's tables besides its address and dtype
      key.push_back(t.dim());
      for (int64_t d = 0; d < t.dim(); ++d) key.push_back(t.size(d));
      for (int64_t d = 0; d < t.dim(); ++d) key.push_back(t.stride(d));
    }
  }
  return py::bytes(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t));
}

// Whether two lists hold the same objects in the same order (identity, not ==: == on tensors
// compares values). The optimizers' caches check their group's params list with it at every
// step: ~1 ns a param, where all(map(operator.is_, a, b)) takes ~30.
bool same_objects(py::handle a, py::handle b) {
  if (!PyList_Check(a.ptr()) || !PyList_Check(b.ptr())) {
    throw py::type_error("_same_objects takes two lists");
  }
  const Py_ssize_t n = PyList_GET_SIZE(a.ptr());
  if (PyList_GET_SIZE(b.ptr()) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_ITEM(a.ptr(), i) != PyList_GET_ITEM(b.ptr(), i)) return false;
  }
  return true;
}

// Positions of the tensors of a list whose layout is not strided (sparse grads); None entries
// are skipped. SGD checks its grads with it at every step (~2 ns a grad, where a Python pass
// reading .is_sparse takes ~100 ns). Raises TypeError on an element that is not a tensor.
py::list sparse_positions(py::handle sequence) {
  if (!PyList_Check(sequence.ptr())) throw py::type_error("_sparse_positions takes a list");
  py::list out;
  const Py_ssize_t n = PyList_GET_SIZE(sequence.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(sequence.ptr(), i);
    if (item == Py_None) continue;
    if (!THPVariable_Check(item)) throw py::type_error("_sparse_positions: not a tensor");
    if (THPVariable_Unpack(item).layout() != at::kStrided) out.append(i);
  }
  return out;
}

}  // namespace

void bind_direct_calls(py::module& m) {
  m.def("_sparse_positions", &sparse_positions, py::arg("tensors"),
        "Positions of the non-strided (sparse) tensors of a list of tensors and Nones.");
  m.def("_same_objects", &same_objects, py::arg("a"), py::arg("b"),
        "Whether lists a and b hold the same objects (by identity) in the same order.");
  m.def("_addresses", &addresses, py::arg("lists"), py::arg("layouts"),
        "bytes of int64: the data_ptr() and dtype (ScalarType number) of every tensor of every "
        "sequence of `lists`, then the dim(), sizes and strides of every tensor of the first "
        "`layouts` sequences, read in one C++ pass; None when some element is not a plain "
        "torch.Tensor / nn.Parameter.");
  m.def("_total_norm_cpu", &total_norm_direct, py::arg("tensors"), py::arg("norm_type"),
        py::arg("of_grads") = false, py::arg("prescale") = py::none(),
        "Eager fast path of torch.ops.fusedopt.total_norm for plain CPU tensors (of_grads=True: "
        "the norm of the .grad of each tensor of the list); None, doing nothing, when the call "
        "must go through the dispatcher instead (or a tensor has no plain grad).");
  m.def("_scale_cpu", &scale_direct,
        "Eager fast path of torch.ops.fusedopt.scale_ for plain CPU tensors; False, doing "
        "nothing, when the call must go through the dispatcher instead.");
  m.def("_memory_shared", &memory_shared, py::arg("written"), py::arg("read"),
        "Whether a tensor of the `written` lists shares memory with another tensor of the call "
        "(written or read); tensors of the `read` lists may share memory among themselves.");
  m.def("_summarize", &summarize,
        "(devices, dtypes, any_sparse) of a sequence of plain tensors, read in one C++ pass "
        "(distinct devices and dtypes in order of first appearance); None when some element "
        "is not a plain torch.Tensor / nn.Parameter.");
  m.def("_adam_cpu", &adam_direct<&cpu::adam_cpu>,
        "Eager fast path of torch.ops.fusedopt.adam_ for plain CPU tensors (positional "
        "arguments in schema order; grads=None reads each param's .grad). Returns False, "
        "doing nothing, when the call must go through the dispatcher instead (or, with "
        "grads=None, when a param has no plain grad).");
  m.def("_sgd_cpu", &sgd_direct<&cpu::sgd_cpu>,
        "Eager fast path of torch.ops.fusedopt.sgd_ for plain CPU tensors (positional "
        "arguments in schema order; grads=None reads each param's .grad). Returns False, "
        "doing nothing, when the call must go through the dispatcher instead (or, with "
        "grads=None, when a param has no plain grad).");
#if defined(FUSEDOPT_WITH_CUDA)
  m.def("_adam_cuda", &adam_direct<&cuda::adam_cuda>,
        "_adam_cpu for plain CUDA tensors: the CUDA kernel of torch.ops.fusedopt.adam_ without "
        "the dispatcher's boxing (~0.6 us a tensor). False, doing nothing, when the call must "
        "go through the dispatcher (or a param has no plain grad, with grads=None).");
  m.def("_sgd_cuda", &sgd_direct<&cuda::sgd_cuda>,
        "_sgd_cpu for plain CUDA tensors: the CUDA kernel of torch.ops.fusedopt.sgd_ without "
        "the dispatcher's boxing. False, doing nothing, when the call must go through the "
        "dispatcher (or a param has no plain grad, with grads=None).");
#endif
}

}  // namespace fusedopt
