"""What every kernel program does besides the math: read the tables, the scalars, the step.

A launch covers every tensor of one dtype. Program ``pid`` owns chunk ``pid``: elements
``[start, start + BLOCK * TILES)`` of tensor ``chunk_tensor[pid]`` (see :mod:`.tables`). Tensor
addresses are read from int64 tables and cast to typed pointers here.
"""
import triton
import triton.language as tl

# ``tl.pointer_type(tl.constexpr(DTYPE).value)`` below, not ``tl.pointer_type(DTYPE)``: in compiled
# code a constexpr parameter arrives wrapped in ``tl.constexpr``, and triton 3.1's pointer_type()
# refuses the wrapper ("element_ty is a constexpr"; triton 3.2 and later unwrap it themselves),
# while the interpreter passes the plain dtype. ``tl.constexpr(x).value`` is the dtype in both
# cases (the constructor unwraps a constexpr), so the pointer type, and the code, are the same.


@triton.jit
def chunk_of(chunk_tensor, chunk_start, numels, BLOCK: tl.constexpr):
    """(tensor index, first element, elements of that tensor) of this program's chunk.

    chunk_tensor: int64[chunks] tensor owning each chunk
    chunk_start:  int64[chunks] first element of each chunk (a multiple of the chunk size)
    numels:       int64[tensors] elements of each tensor
    """
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)  # 64-bit offsets throughout
    return tensor, start, tl.load(numels + tensor)


@triton.jit
def tensor_at(address_table, tensor, DTYPE: tl.constexpr, VECTOR: tl.constexpr):
    """Typed pointer to tensor ``tensor`` of a list, read from its int64 address table.

    VECTOR: the launcher checked that the address is a multiple of 16 bytes; telling the
    compiler lets it emit 128-bit vector loads and stores.
    """
    pointer = tl.load(address_table + tensor).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    if VECTOR:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def scalar(value, pointer, ON_DEVICE: tl.constexpr):
    """A hyperparameter given either as a kernel argument (``value``) or as a 0-dim device tensor
    (``pointer``, read here: no host synchronisation), as fp32."""
    if ON_DEVICE:
        return tl.load(pointer).to(tl.float32)
    else:
        return value


@triton.jit
def step_applies(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """False when GradScaler found inf/nan gradients (``*found_inf_ptr != 0``): the program must
    then change nothing at all, not even the step counters."""
    if HAS_FOUND_INF:
        return tl.load(found_inf_ptr) == 0
    else:
        return tl.full([], 1, tl.int1)


@triton.jit
def load_grad(grad_pointer, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """A tile of gradient in fp32, divided by the GradScaler scale when there is one (the
    gradient in memory is never written). A scale beyond fp32's range (a float64 grad_scale:
    GradScaler's scale near its ceiling divided by a clip coefficient) is divided as
    (g / (scale * 2^-64)) * 2^-64, the same quotient (rules.h, grad_divisor)."""
    grad = tl.load(grad_pointer + offsets, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float64)
        huge = scale > 3.4028234663852886e38
        divisor = tl.where(huge, scale * 5.421010862427522e-20, scale).to(tl.float32)
        post = tl.where(huge, 5.421010862427522e-20, 1.0).to(tl.float32)
        grad = tl.div_rn(grad, divisor) * post
    return grad


@triton.jit
def advance_step(step_ptrs, chunk_counts, arrivals, tensor, STEP_DTYPE: tl.constexpr):
    """Return the new step (old + 1, fp32) of ``tensor``; store it once, after every program of
    that tensor has read the old value.

    step_ptrs:    int64[tensors] addresses of the 0-dim step counters (``state["step"]``)
    chunk_counts: int64[tensors] programs owning a chunk of each tensor
    arrivals:     int32[tensors] zero between launches

    The old value is read with an atomic (adding 0): Triton executes a scalar atomic in one
    thread and hands its result to every thread of the program. A plain load would be issued by
    every warp, and a warp running late could read the value after this program, or the last
    sibling, stored the new one.

    A tensor owned by one program: that program writes. Otherwise each program, after reading,
    takes a ticket with an acq_rel atomic (release: its read is done before the ticket shows);
    the program holding the last ticket writes the new value and resets the counter for the next
    launch. Writing from a fixed program instead (say chunk 0) would race with the sibling
    programs that have not read the old value yet.
    """
    step_ptr = tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.constexpr(STEP_DTYPE).value))
    step = tl.atomic_add(step_ptr, 0.0, sem="acq_rel").to(tl.float32) + 1.0
    count = tl.load(chunk_counts + tensor)
    if count == 1:
        tl.store(step_ptr, step.to(STEP_DTYPE))
    else:
        ticket = tl.atomic_add(arrivals + tensor, 1, sem="acq_rel")
        if ticket == count - 1:
            tl.store(step_ptr, step.to(STEP_DTYPE))
            tl.store(arrivals + tensor, 0)
    return step


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to DTYPE, to nearest even, as torch does.

    bfloat16 is rounded by hand: the Triton interpreter truncates in ``.to(tl.bfloat16)``, so CI
    would test other numbers than the GPU computes. The integer form below is the textbook one
    (add 0x7FFF plus the lowest kept bit, drop 16 bits; NaN stays NaN) and costs nothing in a
    memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
