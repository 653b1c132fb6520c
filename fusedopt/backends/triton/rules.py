"""The update rules, as ``@triton.jit`` helpers: the math of SGD and Adam, written once.

Every function here works on fp32 values (tensors of one tile, or per-program scalars) and knows
nothing about tables, pointers or masks; the kernels load, call a rule, round once and store.
The operation order follows :mod:`fusedopt.backends.reference` (and so ``torch.optim``'s
single-tensor path), so results agree to rounding: e.g. ``lerp`` picks the same of its two forms.
``tl.sqrt_rn`` / ``tl.div_rn`` are the IEEE round-to-nearest operations (plain ``tl.sqrt`` and ``/``
are approximate on NVIDIA GPUs); the kernels are memory-bound, so exactness costs nothing.
"""
import triton
import triton.language as tl


@triton.jit
def bias_correction(step, log_beta):
    """``1 - beta ** step``, accurately: ``-expm1(step * ln(beta))``.

    step:     fp32 scalar, the step number counted from 1
    log_beta: fp32 ``ln(beta)``, computed on the host in double precision (``-inf`` for beta = 0)

    The direct form loses most digits of ``1 - 0.999 ** 1`` to cancellation in fp32. libdevice's
    ``expm1`` would do, but the Triton interpreter (our CPU test bed) cannot run libdevice calls,
    so: a Taylor polynomial of ``expm1(x)`` (Horner form, truncation below 1e-12) for
    ``-0.25 < x <= 0``, and ``exp(x) - 1`` below, where the result is far enough from 0.
    """
    x = step * log_beta  # <= 0
    s = tl.maximum(x, -0.25)  # the series' argument, kept small so it never overflows
    series = s * (1.0 + s * 0.5 * (1.0 + s * (1.0 / 3.0) * (1.0 + s * 0.25 * (
        1.0 + s * 0.2 * (1.0 + s * (1.0 / 6.0) * (1.0 + s * (1.0 / 7.0) * (
            1.0 + s * 0.125 * (1.0 + s * (1.0 / 9.0)))))))))
    return -tl.where(x > -0.25, series, tl.exp(x) - 1.0)


@triton.jit
def lerp(start, end, weight):
    """``start + weight * (end - start)``, with torch's two forms (the one that is exact at weight 1
    for ``weight >= 0.5``), so ``exp_avg.lerp_(grad, 1 - beta1)`` rounds as torch rounds."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                lr,                       # learning rate (fp32 scalar)
                one_minus_beta1,          # 1 - beta1, computed on the host in double
                beta2,                    # second-moment decay
                one_minus_beta2,          # 1 - beta2, computed on the host in double
                eps,                      # added to the denominator
                weight_decay,             # L2 (Adam) or decoupled (AdamW) decay
                step_size,                # lr / (1 - beta1 ** step)
                bias_correction2_sqrt,    # sqrt(1 - beta2 ** step)
                AMSGRAD: tl.constexpr,    # keep and use the running max of exp_avg_sq
                MAXIMIZE: tl.constexpr,   # ascend instead of descend
                HAS_WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0 (skipping it keeps inf/nan out)
                DECOUPLED: tl.constexpr):  # AdamW: shrink the param instead of adding to the grad
    """One Adam / AMSGrad / AdamW step on fp32 values; returns the new (param, exp_avg,
    exp_avg_sq, max_exp_avg_sq). ``grad`` is already divided by the grad scale."""
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param = param * (1.0 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = lerp(exp_avg, grad, one_minus_beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    if AMSGRAD:
        # NaN propagates, as in torch.maximum
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    param = param - step_size * tl.div_rn(exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def sgd_update(param, grad, momentum_buffer,
               lr,                        # learning rate (fp32 scalar)
               momentum,                  # momentum factor mu
               one_minus_dampening,       # 1 - dampening, computed on the host in double
               weight_decay,              # L2 decay added to the grad
               HAS_WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
               HAS_MOMENTUM: tl.constexpr,      # momentum != 0: there is a buffer
               NESTEROV: tl.constexpr,          # Nesterov momentum
               MAXIMIZE: tl.constexpr,          # ascend instead of descend
               FIRST_STEP: tl.constexpr):       # the buffer is created: b = g (torch's first step)
    """One SGD step on fp32 values; returns the new (param, momentum_buffer)."""
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    if HAS_MOMENTUM:
        if FIRST_STEP:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum_buffer * momentum + one_minus_dampening * grad
        if NESTEROV:
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param - lr * grad
    return param, momentum_buffer
