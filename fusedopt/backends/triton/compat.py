"""Which triton and numpy this process has, and what triton's interpreter cannot do with them.

The kernels need nothing newer than triton 3.1 (the release torch 2.5 pins) and give the same
numbers on every version. What fails on some installs is triton's *interpreter*
(``TRITON_INTERPRET=1``: the kernels run as Python over numpy arrays, on CPU tensors), never the
compiled kernels, which use neither of the two pieces below:

* **triton < 3.2 with numpy >= 2.** The interpreter's memory accesses (``load``, ``store``,
  ``atomic_rmw``, ``atomic_cas`` of the C++ module ``triton._C.libtriton.interpreter``) take numpy
  arrays through pybind11. triton 3.1 was built with pybind11 2.11, which predates numpy 2 (its
  ``libtriton.so`` knows only ``numpy.core.multiarray``; pybind11 2.12 added numpy 2, triton moved
  to 2.13.1 for 3.2: triton-lang/triton#4444). Under numpy 2 those calls misread the arrays: seen
  here with triton 3.1.0 and numpy 2.4, ``tl.store`` writes nothing (silently) and ``tl.atomic_add``
  crashes the process. With numpy 1.x the same triton 3.1 runs every kernel and test.
* **numpy >= 2.4 with an interpreter that turns a one-element array into an int.** The
  interpreter runs ``for i in range(n)``, ``n`` a run-time value (our tail loops and the norm's
  finishing loop), through ``tensor.__index__``, which older interpreters implement as
  ``int(handle.data)`` on a one-element 1-D array (triton-lang/triton#9171; triton 3.2's
  ``runtime/interpreter.py`` still has it). numpy deprecated that conversion in 1.25 and made it a
  ``TypeError`` in 2.4. Which triton release took the fix (``.squeeze()``) is not something to
  guess from a version number, so a one-program probe kernel finds out, once per process.

:func:`interpreter_problem` says why the interpreter cannot run the kernels here, and the
backend reports itself unavailable under ``TRITON_INTERPRET=1`` with that reason (a GPU run with
compiled kernels is unaffected).
"""
import re
from typing import List, Optional, Tuple

from ..._compiling import is_compiling


def version_tuple(text: str) -> Tuple[int, ...]:
    """``"3.1.0"`` -> ``(3, 1, 0)``; ``"3.2.0+git1a2b"`` -> ``(3, 2, 0)`` (leading numbers only)."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


try:  # the interpreter needs numpy; compiled kernels do not
    import numpy as np
    NUMPY_VERSION: Optional[Tuple[int, ...]] = version_tuple(np.__version__)
except Exception:
    NUMPY_VERSION = None
try:
    import triton as _triton
    TRITON_VERSION: Optional[Tuple[int, ...]] = version_tuple(_triton.__version__)
except Exception:  # no triton: the backend says so itself
    TRITON_VERSION = None

#: The probe's verdict: empty until it ran, then [None or the reason].
_loop_probe: List[Optional[str]] = []


def interpreter_problem() -> Optional[str]:
    """Why triton's interpreter cannot run the kernels in this process, or None when it can.
    Only meaningful under ``TRITON_INTERPRET=1`` (the compiled kernels are not affected)."""
    if TRITON_VERSION is None or NUMPY_VERSION is None:
        return None  # said elsewhere: triton cannot be imported / the interpreter's own error
    if TRITON_VERSION < (3, 2) and NUMPY_VERSION >= (2,):
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {_triton.__version__} does "
                f"not work with numpy {np.__version__}: that triton was built with pybind11 2.11, "
                "which predates numpy 2, and its loads, stores and atomics misread numpy 2 arrays "
                "(stores are lost, atomics crash); install numpy<2 or triton>=3.2 (compiled kernels "
                "on a GPU are not affected)")
    if NUMPY_VERSION >= (2, 4):
        return _loop_bound_problem()
    return None


def _loop_bound_problem() -> Optional[str]:
    """Run the probe kernel once. Not outside the interpreter (the kernel would be compiled for a
    GPU, and the question is about the interpreter), nor while torch.compile traces (then assume
    it works; eager code, which comes first in practice, will have run it)."""
    if not _loop_probe:
        from . import interpreting
        if is_compiling() or not interpreting():
            return None
        _loop_probe.append(_run_loop_probe())
    return _loop_probe[0]


def _run_loop_probe() -> Optional[str]:
    import torch

    from . import interpreter_probe  # defines the probe kernel: TRITON_INTERPRET is set by now
    out = torch.zeros(3, dtype=torch.int32)
    try:
        interpreter_probe.loop_kernel[(1,)](out, 2)
    except Exception as exc:  # the interpreter's own error, whatever its class
        cause = exc.__cause__ or exc
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {_triton.__version__} "
                f"cannot run a loop with a run-time bound under numpy {np.__version__} "
                f"({type(cause).__name__}: {cause}; its tensor.__index__ converts a one-element "
                "array with int(), an error since numpy 2.4: triton-lang/triton#9171); install "
                "numpy<2.4 or a triton with the fix (compiled kernels on a GPU are not affected)")
    if out.tolist() != [1, 2, 0]:
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {_triton.__version__} "
                f"with numpy {np.__version__} computed {out.tolist()} instead of [1, 2, 0] in a "
                "probe kernel")
    return None


__all__ = ["interpreter_problem", "version_tuple", "NUMPY_VERSION", "TRITON_VERSION"]
