"""The SGD kernel (momentum, dampening, Nesterov, weight decay, maximize): one launch per dtype."""
import triton
import triton.language as tl

from .program import chunk_of, load_grad, round_to, scalar, step_applies, tensor_at
from .rules import sgd_update


@triton.jit
def _sgd_tile(param_ptr, grad_ptr, buffer_ptr, offsets, mask, grad_scale_ptr,
              lr, momentum, one_minus_dampening, weight_decay,
              DTYPE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr,
              HAS_GRAD_SCALE: tl.constexpr):
    """Load one tile (``mask`` None: whole tile in range), apply the rule in fp32, round once, store."""
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE)
    if HAS_MOMENTUM and not FIRST_STEP:
        buffer = tl.load(buffer_ptr + offsets, mask=mask).to(tl.float32)
    else:
        buffer = grad  # not read: the first step overwrites it, no momentum has no buffer
    param, buffer = sgd_update(param, grad, buffer, lr, momentum, one_minus_dampening,
                               weight_decay, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                               FIRST_STEP)
    tl.store(param_ptr + offsets, round_to(param, DTYPE), mask=mask)
    if HAS_MOMENTUM:
        tl.store(buffer_ptr + offsets, round_to(buffer, DTYPE), mask=mask)


@triton.jit
def _sgd_chunk(param_ptrs, grad_ptrs, buffer_ptrs, tensor, start, numel, grad_scale_ptr,
               lr, momentum, one_minus_dampening, weight_decay,
               DTYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, VECTOR: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """This program's chunk: TILES tiles of BLOCK elements of tensor ``tensor`` from ``start``.
    VECTOR: its addresses are 16-byte aligned (the compiler may use 128-bit accesses).
    Pointers are advanced to the chunk once (64-bit); offsets inside the chunk are 32-bit."""
    param_ptr = tensor_at(param_ptrs, tensor, DTYPE, VECTOR) + start
    grad_ptr = tensor_at(grad_ptrs, tensor, DTYPE, VECTOR) + start
    if HAS_MOMENTUM:
        buffer_ptr = tensor_at(buffer_ptrs, tensor, DTYPE, VECTOR) + start
    else:
        buffer_ptr = param_ptr  # unused
    lanes = tl.arange(0, BLOCK)
    remaining = numel - start
    if remaining >= BLOCK * TILES:  # whole chunk in range: no masks, full vectors
        for tile in range(TILES):
            _sgd_tile(param_ptr, grad_ptr, buffer_ptr, tile * BLOCK + lanes, None,
                      grad_scale_ptr, lr, momentum, one_minus_dampening, weight_decay,
                      DTYPE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP,
                      HAS_GRAD_SCALE)
    else:  # the tensor's last chunk
        tail = remaining.to(tl.int32)  # elements left: less than one chunk
        for tile in range((tail + BLOCK - 1) // BLOCK):  # only the tiles holding elements
            offsets = tile * BLOCK + lanes
            _sgd_tile(param_ptr, grad_ptr, buffer_ptr, offsets, offsets < tail,
                      grad_scale_ptr, lr, momentum, one_minus_dampening, weight_decay,
                      DTYPE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP,
                      HAS_GRAD_SCALE)


@triton.jit
def sgd_kernel(
    param_ptrs,             # int64[tensors]: addresses of the parameters (DTYPE)
    grad_ptrs,              # int64[tensors]: addresses of the gradients (DTYPE, read only)
    buffer_ptrs,            # int64[tensors]: addresses of the momentum buffers; used if HAS_MOMENTUM
    numels,                 # int64[tensors]: elements of each tensor
    vector_ok,              # int64[tensors]: 1 when all addresses of the tensor are 16-byte aligned
    chunk_tensor,           # int64[programs]: tensor owning the chunk of each program
    chunk_start,            # int64[programs]: first element of that chunk
    lr,                     # fp32 learning rate, when not LR_ON_DEVICE
    lr_ptr,                 # 0-dim tensor holding the learning rate, when LR_ON_DEVICE
    momentum,               # momentum factor
    one_minus_dampening,    # 1 - dampening (host double, rounded once)
    weight_decay,           # L2 weight decay
    grad_scale_ptr,         # 0-dim tensor dividing every gradient, when HAS_GRAD_SCALE
    found_inf_ptr,          # 0-dim tensor; nonzero means skip the step, when HAS_FOUND_INF
    DTYPE: tl.constexpr,            # element type of params, grads and buffers
    BLOCK: tl.constexpr,            # elements per tile
    TILES: tl.constexpr,            # tiles per program
    HAS_WEIGHT_DECAY: tl.constexpr, # weight_decay != 0
    HAS_MOMENTUM: tl.constexpr,     # momentum != 0
    NESTEROV: tl.constexpr,         # Nesterov momentum
    MAXIMIZE: tl.constexpr,         # maximise the objective
    FIRST_STEP: tl.constexpr,       # buffers are new: b = g instead of reading them
    LR_ON_DEVICE: tl.constexpr,     # read lr from lr_ptr
    HAS_GRAD_SCALE: tl.constexpr,   # divide gradients by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,    # obey *found_inf_ptr
):
    if step_applies(found_inf_ptr, HAS_FOUND_INF):
        tensor, start, numel = chunk_of(chunk_tensor, chunk_start, numels, BLOCK)
        lr = scalar(lr, lr_ptr, LR_ON_DEVICE)
        if tl.load(vector_ok + tensor) != 0:
            _sgd_chunk(param_ptrs, grad_ptrs, buffer_ptrs, tensor, start, numel, grad_scale_ptr,
                       lr, momentum, one_minus_dampening, weight_decay, DTYPE, BLOCK, TILES, True,
                       HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP, HAS_GRAD_SCALE)
        else:
            _sgd_chunk(param_ptrs, grad_ptrs, buffer_ptrs, tensor, start, numel, grad_scale_ptr,
                       lr, momentum, one_minus_dampening, weight_decay, DTYPE, BLOCK, TILES, False,
                       HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP, HAS_GRAD_SCALE)
