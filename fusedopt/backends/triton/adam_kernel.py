"""The Adam / AMSGrad / AdamW kernel: one launch updates every tensor of one dtype."""
import triton
import triton.language as tl

from .program import advance_step, chunk_of, load_grad, round_to, scalar, step_applies, tensor_at
from .rules import adam_update, bias_correction


@triton.jit
def _adam_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
               offsets, mask, grad_scale_ptr,
               lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size,
               bias_correction2_sqrt,
               DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr):
    """Load one tile of every list (``mask`` None: the whole tile is in range), apply the rule in
    fp32, round once to DTYPE and store."""
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    if AMSGRAD:
        max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    else:
        max_exp_avg_sq = exp_avg_sq  # unused
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, one_minus_beta1, beta2,
        one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
        AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED)
    tl.store(param_ptr + offsets, round_to(param, DTYPE), mask=mask)
    tl.store(exp_avg_ptr + offsets, round_to(exp_avg, DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, round_to(exp_avg_sq, DTYPE), mask=mask)
    if AMSGRAD:
        tl.store(max_exp_avg_sq_ptr + offsets, round_to(max_exp_avg_sq, DTYPE), mask=mask)


@triton.jit
def _adam_chunk(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs,
                tensor, start, numel, grad_scale_ptr,
                lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size,
                bias_correction2_sqrt,
                DTYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
                VECTOR: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr):
    """This program's chunk: TILES tiles of BLOCK elements of tensor ``tensor`` from ``start``.
    VECTOR: its addresses are 16-byte aligned (the compiler may use 128-bit accesses).
    Pointers are advanced to the chunk once (64-bit); offsets inside the chunk are 32-bit."""
    param_ptr = tensor_at(param_ptrs, tensor, DTYPE, VECTOR) + start
    grad_ptr = tensor_at(grad_ptrs, tensor, DTYPE, VECTOR) + start
    exp_avg_ptr = tensor_at(exp_avg_ptrs, tensor, DTYPE, VECTOR) + start
    exp_avg_sq_ptr = tensor_at(exp_avg_sq_ptrs, tensor, DTYPE, VECTOR) + start
    if AMSGRAD:
        max_exp_avg_sq_ptr = tensor_at(max_exp_avg_sq_ptrs, tensor, DTYPE, VECTOR) + start
    else:
        max_exp_avg_sq_ptr = exp_avg_sq_ptr  # unused
    lanes = tl.arange(0, BLOCK)
    remaining = numel - start
    if remaining >= BLOCK * TILES:  # whole chunk in range: no masks, full vectors
        for tile in range(TILES):
            _adam_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                       tile * BLOCK + lanes, None, grad_scale_ptr,
                       lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                       step_size, bias_correction2_sqrt,
                       DTYPE, AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, HAS_GRAD_SCALE)
    else:  # the tensor's last chunk (possibly empty: it still advanced the step)
        tail = remaining.to(tl.int32)  # elements left: less than one chunk
        for tile in range((tail + BLOCK - 1) // BLOCK):  # only the tiles holding elements
            offsets = tile * BLOCK + lanes
            _adam_tile(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                       offsets, offsets < tail, grad_scale_ptr,
                       lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                       step_size, bias_correction2_sqrt,
                       DTYPE, AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, HAS_GRAD_SCALE)


@triton.jit
def adam_kernel(
    param_ptrs,             # int64[tensors]: addresses of the parameters (DTYPE)
    grad_ptrs,              # int64[tensors]: addresses of the gradients (DTYPE, read only)
    exp_avg_ptrs,           # int64[tensors]: addresses of exp_avg (DTYPE)
    exp_avg_sq_ptrs,        # int64[tensors]: addresses of exp_avg_sq (DTYPE)
    max_exp_avg_sq_ptrs,    # int64[tensors]: addresses of max_exp_avg_sq (DTYPE); read only if AMSGRAD
    step_ptrs,              # int64[tensors]: addresses of the 0-dim step counters (STEP_DTYPE)
    numels,                 # int64[tensors]: elements of each tensor
    vector_ok,              # int64[tensors]: 1 when all addresses of the tensor are 16-byte aligned
    chunk_counts,           # int64[tensors]: programs owning a chunk of each tensor
    chunk_tensor,           # int64[programs]: tensor owning the chunk of each program
    chunk_start,            # int64[programs]: first element of that chunk
    arrivals,               # int32[tensors]: zero between launches (see program.advance_step)
    lr,                     # fp32 learning rate, when not LR_ON_DEVICE
    lr_ptr,                 # 0-dim tensor holding the learning rate, when LR_ON_DEVICE
    one_minus_beta1,        # 1 - beta1 (host double, rounded once)
    beta2,                  # beta2
    one_minus_beta2,        # 1 - beta2 (host double, rounded once)
    log_beta1,              # ln(beta1) for the bias correction (-inf when beta1 == 0)
    log_beta2,              # ln(beta2)
    eps,                    # epsilon added to the denominator
    weight_decay,           # weight decay factor
    grad_scale_ptr,         # 0-dim tensor dividing every gradient, when HAS_GRAD_SCALE
    found_inf_ptr,          # 0-dim tensor; nonzero means skip the step, when HAS_FOUND_INF
    DTYPE: tl.constexpr,            # element type of params, grads and state
    STEP_DTYPE: tl.constexpr,       # element type of the step counters
    BLOCK: tl.constexpr,            # elements per tile
    TILES: tl.constexpr,            # tiles per program
    AMSGRAD: tl.constexpr,          # AMSGrad variant
    MAXIMIZE: tl.constexpr,         # maximise the objective
    HAS_WEIGHT_DECAY: tl.constexpr, # weight_decay != 0
    DECOUPLED: tl.constexpr,        # AdamW's decoupled weight decay
    LR_ON_DEVICE: tl.constexpr,     # read lr from lr_ptr
    HAS_GRAD_SCALE: tl.constexpr,   # divide gradients by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,    # obey *found_inf_ptr
):
    if step_applies(found_inf_ptr, HAS_FOUND_INF):
        tensor, start, numel = chunk_of(chunk_tensor, chunk_start, numels, BLOCK)
        step = advance_step(step_ptrs, chunk_counts, arrivals, tensor, STEP_DTYPE)
        lr = scalar(lr, lr_ptr, LR_ON_DEVICE)
        step_size = tl.div_rn(lr, bias_correction(step, log_beta1))
        bias_correction2_sqrt = tl.sqrt_rn(bias_correction(step, log_beta2))
        if tl.load(vector_ok + tensor) != 0:
            _adam_chunk(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs,
                        tensor, start, numel, grad_scale_ptr, lr, one_minus_beta1, beta2,
                        one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
                        DTYPE, BLOCK, TILES, True, AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED,
                        HAS_GRAD_SCALE)
        else:
            _adam_chunk(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs,
                        tensor, start, numel, grad_scale_ptr, lr, one_minus_beta1, beta2,
                        one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
                        DTYPE, BLOCK, TILES, False, AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED,
                        HAS_GRAD_SCALE)
