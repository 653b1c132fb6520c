"""The probe kernel of :mod:`.compat`: a loop whose bound is a run-time value, as in the kernels'
tail loops. Imported only under the interpreter, when the probe runs (``@triton.jit`` reads
``TRITON_INTERPRET`` when this module is imported)."""
import triton
import triton.language as tl


@triton.jit
def loop_kernel(out, n):
    """out[i] = i + 1 for i < n (int32): n arrives as a run-time value, not a constexpr."""
    for i in range(n):
        tl.store(out + i, i + 1)
