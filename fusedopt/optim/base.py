"""Plumbing shared by the fused optimizers: gathering a group's tensors, caching them, dispatch.

A step of a param group gathers ``params``, ``grads`` and the algorithm's state lists, buckets
them by device, and hands each bucket to the backend chosen by :func:`fusedopt.backends.select`.
Everything except the gradients is cached per group: params and state tensors do not change
between steps, so the per-step Python work is one list comprehension over the gradients.
The cache is rebuilt when the group's params list (the list or any of its entries), the set of
params with gradients, or the state change: ``load_state_dict``, and any change of
``optimizer.state`` or of its per-param dicts, which a :class:`~fusedopt.optim._state.TrackedState`
reports by a version number (replacing a state tensor, resetting ``step``, ``state.clear()``).

Kernels see :func:`fusedopt._views.kernel_view` of every tensor: the local shard of a DTensor
(FSDP2, tensor parallel; see :mod:`fusedopt._dtensor`), as real numbers if complex. Buckets split
by DTensor layout too, and a global norm (``max_grad_norm``) over DTensors is reduced over their
meshes.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.optim.optimizer import Optimizer

from .. import _dtensor, backends
from .._compiling import STEP_TRACEABLE, is_compiling
from .._lists import any_none as _any_none
from .._lists import any_sparse as _any_sparse
from .._lists import grads_of as _grads_of
from .._lists import SHARED_MEMORY_MESSAGE as _SHARED_MEMORY_MESSAGE
from .._lists import memory_shared as _memory_shared
from .._lists import same_objects as _same_objects
from .._views import as_real, kernel_view
from ..clip import _norm as clip_norm
from ..clip import _step as clip_step
from . import _state

Tensor = torch.Tensor


class GroupBucket:
    """The tensors of one param group with one (device, dtype), in launch order."""

    __slots__ = ("device", "dtype", "layout", "params", "owners", "shards", "state_lists",
                 "complex_mask", "grad_index", "all_grads", "has_complex", "backend",
                 "backend_request")

    def __init__(self, device: torch.device, layout: Optional[_dtensor.Layout] = None):
        self.device = device
        self.dtype: Optional[torch.dtype] = None
        self.layout = layout                    # DTensor layout of every entry (None: plain)
        self.params: List[Tensor] = []          # kernel_view of the params
        self.owners: List[Tensor] = []          # the params themselves (state dict keys)
        self.shards: List[Tensor] = []          # DTensor buckets: each owner's local tensor then
        self.state_lists: Dict[str, List[Tensor]] = {}
        self.complex_mask: List[bool] = []      # grads of these entries need view_as_real
        self.grad_index: List[int] = []         # position of each entry in the group's params
        self.all_grads = False                  # grad_index is every position, in order
        self.has_complex = False                # True in complex_mask
        self.backend = None                     # the backend chosen for backend_request
        self.backend_request = None             # (backend=, FUSEDOPT_BACKEND, generation) it answered


def _shards_current(bucket: GroupBucket) -> bool:
    """Whether a bucket's DTensor params still hold the local tensors its views were made of
    (FSDP2 may give a sharded param a new one, e.g. when it pins CPU-offloaded memory)."""
    return bucket.layout is None or all(map(operator.is_, _dtensor.shards_of(bucket.owners),
                                            bucket.shards))


def _views_current(bucket: GroupBucket) -> bool:
    """Whether the real views of a bucket's complex params still view their memory (``p.data =
    ...`` gives a param new memory; a real param is its own kernel view and needs no check)."""
    return not bucket.has_complex or all(
        view.data_ptr() == owner.data_ptr()
        for view, owner, is_complex in zip(bucket.params, bucket.owners, bucket.complex_mask)
        if is_complex)


def _buckets_current(cache: "GroupCache") -> bool:
    return all(_shards_current(b) and _views_current(b) for b in cache.buckets)


class GroupCache:
    """What a group's step needs besides the gradients, valid while ``key`` matches."""

    __slots__ = ("params_ref", "params", "present", "buckets", "state_version", "flags")

    def __init__(self, params_ref, present, buckets, state_version, flags):
        self.params_ref = params_ref          # the group's params list
        self.params = list(params_ref)        # and what it held (entries may be replaced)
        self.present = present
        self.buckets = buckets
        self.state_version = state_version
        self.flags = flags                    # the group options the state lists depend on

    def current(self, params: List[Tensor], state_version: int, flags: tuple) -> bool:
        """Whether the group's params list, the state and the group options that shape the
        state are what the cache was built from."""
        return (self.params_ref is params and self.state_version == state_version
                and self.flags == flags and _same_objects(params, self.params))


_DUPLICATE_PARAMS = (
    "a parameter group lists a parameter more than once; a fused step would update it twice at "
    "once (torch.optim deprecates such groups and will refuse them)")


def check_hyperparameter(ok: bool, message: str, *values: Any) -> None:
    """``ValueError(message.format(*values))`` unless ``ok``. The message is built only on
    failure: ``repr`` of a value torch.compile traces symbolically (a changed beta) cannot be
    traced, so a message built eagerly broke ``fullgraph=True`` steps."""
    if not ok:
        raise ValueError(message.format(*values))


class _Same:
    """Equal only to the very object it holds: a tensor kept for a later comparison that must
    not read it (``tensor == x`` would, and wait for the device)."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return other is self.obj

    __hash__ = None


def check_value(ok, value, what: str) -> None:
    """``ok(value)`` or ``ValueError("Invalid <what>: <value>")`` (torch's wording); a value that
    cannot be compared (a string, None) is a ``TypeError`` saying so."""
    try:
        good = ok(value)
    except TypeError:
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    check_hyperparameter(good, "Invalid {}: {}", what, value)


#: Clipping options every fused optimizer takes (keyword arguments, stored in the groups; torch.optim
#: ignores them when it loads a fusedopt checkpoint).
CLIP_DEFAULTS: Dict[str, Any] = {"max_grad_norm": None, "skip_nonfinite": False}


#: The group keys fusedopt adds to torch.optim's. They are options of the running optimizer, not
#: part of its checkpoints: state_dict() leaves them out, so its groups have exactly
#: torch.optim's keys (torch.distributed.checkpoint refuses to load a checkpoint that lacks a key
#: of the target, so an extra key would stop torch.optim checkpoints from loading into fusedopt),
#: and load_state_dict() keeps the values the groups had.
OWN_GROUP_KEYS = ("backend", "max_grad_norm", "skip_nonfinite")


def check_clip_options(max_grad_norm, skip_nonfinite) -> None:
    check_hyperparameter(max_grad_norm is None or float(max_grad_norm) > 0.0,
                         "Invalid max_grad_norm: {} (None or > 0)", max_grad_norm)
    check_hyperparameter(isinstance(skip_nonfinite, bool),
                         "skip_nonfinite must be a bool, got {!r}", skip_nonfinite)


def check_group_options(group: Dict[str, Any]) -> None:
    """The group options every fused optimizer checks (added groups, and steps after a change)."""
    check_clip_options(group.get("max_grad_norm"), group.get("skip_nonfinite", False))
    if group.get("differentiable", False):
        raise ValueError("differentiable=True is not supported (its kernels are not "
                         "autograd-aware); use torch.optim for differentiable optimisation")


def _step_outside_the_graph(optimizer: "FusedOptimizer", closure=None):
    """``optimizer.step()`` on a torch whose dynamo cannot trace it
    (``fusedopt._compiling.STEP_TRACEABLE``: torch < 2.10), wrapped in ``torch.compiler.disable``
    below: a compiled region breaks its graph around the step and runs it as eager code, with
    the eager numbers (``fullgraph=True`` refuses the break, naming this function), and dynamo
    does not try the step's own frames one by one. Every step goes through it there (a frame
    that broke its graph is rerun eagerly, where ``is_compiling()`` is False: a step choosing by
    that would then run unwrapped). That costs ~4 us a step in eager code (torch 2.5.1, AdamW
    over 8 tiny params: 29.4 against 25.6 us). On torch >= 2.10 the step is traced into the
    graph, and eager steps call it directly."""
    with torch.no_grad():
        return optimizer._step(closure)


if not STEP_TRACEABLE:
    _step_outside_the_graph = torch.compiler.disable(_step_outside_the_graph)


class FusedOptimizer(Optimizer):
    """Base class: subclasses define the state of a parameter and the backend call."""

    #: state keys holding one tensor per parameter, in the order the backend takes them
    STATE_KEYS: Sequence[str] = ()
    #: name used in error messages ("fusedopt.optim.Adam")
    DISPLAY_NAME = "fusedopt optimizer"
    #: torch.optim arguments accepted for compatibility (stored in groups so checkpoints load
    #: into torch.optim unchanged); they do not change fusedopt's code path.
    COMPAT_DEFAULTS: Dict[str, Any] = {"foreach": None, "fused": None, "capturable": False,
                                       "differentiable": False}

    def __init__(self, params, defaults: Dict[str, Any]):
        backends.validate_choice(defaults.get("backend", "auto"))
        for key, value in CLIP_DEFAULTS.items():
            defaults.setdefault(key, value)
        check_clip_options(defaults["max_grad_norm"], defaults["skip_nonfinite"])
        # What steps report (last_grad_norm, skipped_steps), in a dict: torch.compile keeps a
        # compiled step's writes to a dict attribute, but drops its attribute assignments on an
        # Optimizer (dynamo's OptimizerVariable; measured with torch 2.14).
        self._step_stats: Dict[str, Optional[Tensor]] = {"last_grad_norm": None, "skipped_steps": None}
        if defaults.get("differentiable"):
            raise ValueError(
                f"{self.DISPLAY_NAME} does not support differentiable=True (its kernels are not "
                "autograd-aware); use torch.optim for differentiable optimisation")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        # param_groups index -> its work cache. Keyed by position, not id(group): torch.compile
        # of torch 2.5 cannot trace id() of a dict. A cache is used only while current() (the
        # group's very params list, the state version, the options that shape the state), so a
        # group dict replaced at the same position cannot be stepped with another's cache.
        self._group_caches: Dict[int, GroupCache] = {}
        self._checked_values: Dict[int, tuple] = {}  # id(group) -> values last validated by a step
        super().__init__(params, defaults)  # (it sets self.state: see the property)

    # torch.amp.GradScaler passes grad_scale / found_inf as attributes when this is True.
    _step_supports_amp_scaling = True

    @property
    def state(self) -> "_state.TrackedState":
        """torch.optim's ``state`` (param -> dict of its state), tracked: any change of it or its
        dicts makes the next step rebuild its cache (see :mod:`fusedopt.optim._state`)."""
        return self._tracked_state

    @state.setter
    def state(self, value) -> None:
        self._tracked_state = _state.tracked(value, self.__dict__.get("_tracked_state"))

    def _state_version(self) -> int:
        return self._tracked_state._version.value

    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        """2-norm of the unscaled gradients before clipping, computed by the last step that
        needed it (``max_grad_norm`` or ``skip_nonfinite``): a device tensor, never synced."""
        return self._step_stats["last_grad_norm"]

    @property
    def skipped_steps(self) -> Optional[Tensor]:
        """Steps skipped so far because of non-finite gradients (``skip_nonfinite``) or
        GradScaler's ``found_inf``: an int64 device tensor (None before the first such step)."""
        return self._step_stats["skipped_steps"]

    @skipped_steps.setter
    def skipped_steps(self, value: Optional[Tensor]) -> None:
        self._step_stats["skipped_steps"] = value

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch's __setstate__ (load_state_dict and unpickling call it) writes __dict__, which
        # the state property shadows: hand the new state to the property.
        if "state" in self.__dict__:
            self.state = self.__dict__.pop("state")
        self.__dict__.pop("_state_version", None)  # (an int attribute, before the property)
        old = {key: self.__dict__.pop(key, None) for key in ("last_grad_norm", "skipped_steps")}
        self.__dict__.setdefault("_step_stats", old)  # objects pickled before the dict existed
        self._checked_values = {}
        self._group_caches = {}
        self._tracked_state._version.value += 1
        for group in self.param_groups:
            self._fill_group_defaults(group)

    def _fill_group_defaults(self, group: Dict[str, Any]) -> None:
        """Give groups loaded from a torch.optim checkpoint the keys fusedopt reads."""
        group.setdefault("backend", self.defaults.get("backend", "auto"))
        for key in ("max_grad_norm", "skip_nonfinite"):
            group.setdefault(key, self.defaults.get(key, CLIP_DEFAULTS[key]))
        for flag, default in self.COMPAT_DEFAULTS.items():
            group.setdefault(flag, default)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            self.param_groups.pop()
            raise ValueError(_DUPLICATE_PARAMS)
        backends.validate_choice(group.get("backend", "auto"))
        check_group_options(group)
        self._validate_group(group)

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state dict (same keys, same layout, plain dicts; see
        :data:`OWN_GROUP_KEYS`)."""
        saved = super().state_dict()
        # Plain dicts; and no empty entries: a param of a stateless group (SGD without momentum)
        # has one in ``self.state`` (kept: torch.distributed.checkpoint takes an empty
        # ``optimizer.state`` for "never stepped" and runs a step with zero grads to fill it, at
        # every save and load), where torch.optim's state_dict has none.
        saved["state"] = {key: dict(value) if isinstance(value, _state.ParamState) else value
                          for key, value in saved["state"].items() if len(value) != 0}
        for group in saved["param_groups"]:  # (copies of the groups: the live ones keep theirs)
            for key in OWN_GROUP_KEYS:
                group.pop(key, None)
        return saved

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load torch.optim's or fusedopt's state dict; the groups keep their fusedopt options."""
        own = [{key: group[key] for key in OWN_GROUP_KEYS if key in group}
               for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, values in zip(self.param_groups, own):
            group.update(values)
        self._invalidate()

    def _invalidate(self) -> None:
        self._group_caches = {}
        self._tracked_state._version.value += 1

    def _validate_group(self, group: Dict[str, Any]) -> None:
        """Subclasses check per-group hyperparameters given to ``add_param_group``."""

    def _watched_values(self, group: Dict[str, Any]) -> tuple:
        """The group values a step validates again when they change: subclasses return theirs
        plus the clipping options, in one flat tuple (one call a group a step)."""
        return (group.get("max_grad_norm"), group.get("skip_nonfinite", False),
                group.get("differentiable", False))

    def _validate_on_step(self, group: Dict[str, Any]) -> None:
        """Check the :meth:`_watched_values` of ``group`` (subclasses check theirs too)."""
        check_group_options(group)

    def _recheck_groups(self) -> None:
        """Validate a group's hyperparameters again when its :meth:`_watched_values` (what the
        update reads besides lr) changed since the last step, before anything is updated: a value
        set in ``param_groups`` after construction (``group["betas"] = (0.9, 2.0)``) gets the
        constructor's clear error, naming the group, instead of NaN parameters. Numbers are
        compared by type and value, tensors by identity (never read: that would wait for the
        device; only their size is checked). ~0.5 us a group when nothing changed. Under
        torch.compile every group is checked while tracing, at no cost in the compiled step: the
        values are guarded constants there, so a changed one retraces and is checked again."""
        compiling = is_compiling()
        checked = self._checked_values
        for index, group in enumerate(self.param_groups):
            if not compiling:
                values = self._watched_values(group)
                last = checked.get(id(group))
                # same types, then equal values (tensors by identity: the stored ones are _Same)
                if last is not None and last[0] == tuple(map(type, values)) and last[1] == values:
                    continue
            try:
                self._validate_on_step(group)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{self.DISPLAY_NAME}: param_groups[{index}]: {exc}") from None
            if not compiling:
                checked[id(group)] = (tuple(map(type, values)),
                                      tuple(_Same(v) if isinstance(v, Tensor) else v for v in values))

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        if not STEP_TRACEABLE:  # (always: a compiled caller that breaks its graph here reruns
            return _step_outside_the_graph(self, closure)  # step() eagerly, with the same frames)
        return self._step(closure)

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._recheck_groups()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            # GradScaler sums its per-device flags: the int 0 when no param had a grad.
            found_inf = None if not found_inf else torch.tensor(float(found_inf))
        max_norms = [g.get("max_grad_norm") for g in self.param_groups]
        skip = any(g.get("skip_nonfinite", False) for g in self.param_groups)
        clipping = skip or any(m is not None for m in max_norms)
        # With clipping, the fast path needs the norm first: read in C++ from the params'
        # grads when every group allows it (None otherwise: the general path computes it).
        scaling = self._fold_clipping_reading_grads(grad_scale, found_inf, max_norms, skip) \
            if clipping else None
        work = []
        sparse_work = []  # (group, [(param, sparse grad)]): stepped apart, by torch ops
        for index, group in enumerate(self.param_groups):
            if not clipping or scaling is not None:
                scale, inf = (grad_scale, found_inf) if scaling is None else \
                    (scaling.grad_scale_for(group.get("max_grad_norm")), scaling.found_inf)
                if self._step_reading_grads(index, group, scale, inf):
                    continue
            grads = _grads_of(group["params"])
            sparse = self._sparse_grad_positions(grads)
            if sparse:
                sparse_work.append((group, [(group["params"][i], grads[i]) for i in sparse]))
                for i in sparse:  # (the kernels see these params as having no grad)
                    grads[i] = None
            cache = self._group_cache(index, group, grads)
            for bucket in cache.buckets:
                backend = self._select_backend(group, bucket)
                work.append((group, bucket, self._bucket_grads(bucket, grads, backend), backend))
        if scaling is None:
            if not work and not sparse_work:  # every group took the fast path (no clipping)
                self._count_skipped(found_inf)
                return loss
            sparse_grads = [g for _, pairs in sparse_work for _, g in pairs]
            scaling = self._fold_clipping(work, grad_scale, found_inf, max_norms, skip,
                                          sparse_grads)
        for group, bucket, bucket_grads, backend in work:
            scale = scaling.grad_scale_for(group.get("max_grad_norm"))
            if scale is not None and scale.device != bucket.device:
                scale = clip_norm.to_device(scale, bucket.device)
            self._apply(group, bucket, bucket_grads, scale, scaling.found_inf, backend)
        for group, pairs in sparse_work:
            self._step_sparse(group, pairs, scaling.grad_scale_for(group.get("max_grad_norm")),
                              scaling.found_inf)
        return loss

    def _step_reading_grads(self, index: int, group: Dict[str, Any], grad_scale: Optional[Tensor],
                            found_inf: Optional[Tensor]) -> bool:
        """Fast path: step ``group`` with a backend that reads each param's ``.grad`` itself, when
        the group's cache was built with every param having a grad and holds one bucket of real
        params (with clipping, the caller has folded the norm into ``grad_scale`` first, see
        :meth:`_fold_clipping_reading_grads`). The backend declines
        (nothing changed) when a grad is now missing or unusual; the caller then takes the
        general path, which sees the new situation and rebuilds the cache."""
        bucket = self._fast_path_bucket(index, group)
        if bucket is None:
            return False
        backend = self._select_backend(group, bucket)
        # (skipped steps are counted once per step, by step() itself)
        return self._apply_reading_grads(group, bucket, grad_scale, found_inf, backend)

    def _fast_path_bucket(self, index: int, group: Dict[str, Any]) -> Optional[GroupBucket]:
        """The one bucket of the cache of ``group`` (``param_groups[index]``) when the fast path
        may read the grads in C++: the cache is current and was built with every param having a
        grad, all of them real plain tensors and in one bucket. None otherwise."""
        cache = self._group_caches.get(index)
        if (cache is None or cache.present is not None or len(cache.buckets) != 1
                or not cache.current(group["params"], self._state_version(),
                                     self._cache_flags(group))):
            return None
        bucket = cache.buckets[0]
        if not bucket.all_grads or bucket.has_complex or bucket.layout is not None:
            return None
        return bucket

    def _fold_clipping_reading_grads(self, grad_scale: Optional[Tensor],
                                     found_inf: Optional[Tensor], max_norms: List[Optional[float]],
                                     skip: bool):
        """:meth:`_fold_clipping` with the global norm read by the backend from the params'
        grads (one C++ call, no grads list in Python), when every group can take the fast path
        with one backend that can do that. None (nothing done) otherwise."""
        buckets = []
        for index, group in enumerate(self.param_groups):
            bucket = self._fast_path_bucket(index, group)
            if bucket is None:
                return None
            buckets.append((group, bucket))
        chosen = {self._select_backend(group, bucket) for group, bucket in buckets}
        if len(chosen) != 1:
            return None
        norm_of_grads = getattr(chosen.pop(), "norm_of_grads", None)
        if norm_of_grads is None:
            return None
        params = [p for _, bucket in buckets for p in bucket.params]
        norm = norm_of_grads(params, 2.0, clip_step.unscaling(grad_scale))
        if norm is None:
            return None
        scaling = clip_step.fold_norm(norm, max_norms, grad_scale, found_inf, skip)
        self._step_stats["last_grad_norm"] = scaling.norm
        self._count_skipped(scaling.found_inf)
        return scaling

    def _count_skipped(self, found_inf: Optional[Tensor]) -> None:
        if found_inf is not None:
            skipped = (found_inf != 0).to(torch.int64)
            counter = self._step_stats["skipped_steps"]
            if counter is None:
                self._step_stats["skipped_steps"] = skipped
            else:  # in place: a step replayed from a CUDA graph keeps counting
                counter.add_(skipped.to(counter.device))

    def _fold_clipping(self, work, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                       max_norms: List[Optional[float]], skip: bool,
                       sparse_grads: Sequence[Tensor] = ()):
        """``max_grad_norm`` / ``skip_nonfinite``: fold the global-norm clip coefficient into the
        grad scale each kernel divides by, and non-finite gradients into ``found_inf``, all on the
        device (see :mod:`fusedopt.clip._step`). Sets ``last_grad_norm`` and ``skipped_steps``."""
        if skip or any(m is not None for m in max_norms):
            backend = self.param_groups[0].get("backend", "auto")
            prescale = clip_step.unscaling(grad_scale)
            if any(b.layout is not None for _, b, _, _ in work):
                norm = clip_norm.sharded_norm(self._grads_by_layout(work), 2.0, backend, prescale)
            else:
                all_grads = [g for _, _, grads, _ in work for g in grads] + list(sparse_grads)
                # Buckets know their device and (real) dtype; sparse grads were refused by
                # _bucket_grads or are refused by the native norm op before anything is
                # written, except those an optimizer steps apart (SGD), read here.
                summary = None if sparse_grads else clip_norm.Summary.from_parts(
                    [b.device for _, b, _, _ in work], [b.dtype for _, b, _, _ in work])
                norm = clip_norm.total_norm(all_grads, 2.0, backend, summary, prescale)
            scaling = clip_step.fold_norm(norm, max_norms, grad_scale, found_inf, skip)
            self._step_stats["last_grad_norm"] = scaling.norm
        else:
            scaling = clip_step.StepScaling(grad_scales={None: grad_scale}, found_inf=found_inf)
        self._count_skipped(scaling.found_inf)
        return scaling

    def _grads_by_layout(self, work) -> Dict[_dtensor.Layout, List[Tensor]]:
        """The (local) gradients of a step's buckets by DTensor layout, for the global norm."""
        groups: Dict[_dtensor.Layout, List[Tensor]] = {}
        for _, bucket, grads, _ in work:
            if bucket.layout is None:
                raise ValueError(
                    f"{self.DISPLAY_NAME}: max_grad_norm / skip_nonfinite need every parameter "
                    "to be a DTensor when some are (the global norm of plain tensors, whose "
                    "values may differ between ranks, is not defined)")
            groups.setdefault(bucket.layout, []).extend(grads)
        return groups

    def _bucket_grads(self, bucket: GroupBucket, grads: List[Optional[Tensor]], backend) -> List[Tensor]:
        out = grads if bucket.all_grads else [grads[i] for i in bucket.grad_index]
        if bucket.layout is not None:
            out = _dtensor.locals_like(out, bucket.layout, "a gradient", redistribute=True)
        # Backends whose kernels reject non-strided grads themselves (before writing anything)
        # spare the step this Python loop; the others rely on it.
        if not getattr(backend, "rejects_sparse_grads", False) and _any_sparse(out):
            raise RuntimeError(f"{self.DISPLAY_NAME} does not support sparse gradients")
        if bucket.has_complex:
            out = [torch.view_as_real(g) if c else g for g, c in zip(out, bucket.complex_mask)]
        return out

    def _group_cache(self, index: int, group: Dict[str, Any],
                     grads: List[Optional[Tensor]]) -> GroupCache:
        """The work cache of ``group`` (``param_groups[index]``), rebuilt when not current."""
        params = group["params"]
        present = tuple(g is not None for g in grads) if _any_none(grads) else None
        cache = self._group_caches.get(index)
        if (cache is not None and cache.present == present and len(params) == len(grads)
                and cache.current(params, self._state_version(), self._cache_flags(group))
                and _buckets_current(cache)):
            return cache
        cache = self._build_cache(group, grads, present)
        self._group_caches[index] = cache
        return cache

    def _rebase_caches(self, before: int) -> None:
        """After the optimizer's own writes to the state (creating it, fixing it up), which
        advanced its version from ``before``: caches that were current then still are (the
        writes keep them consistent), so they move to the new version instead of rebuilding."""
        after = self._state_version()
        if after != before:
            for cache in self._group_caches.values():
                if cache.state_version == before:
                    cache.state_version = after

    def _build_cache(self, group, grads, present) -> GroupCache:
        before = self._state_version()
        cache = self._collect_buckets(group, grads, present)
        self._rebase_caches(before)
        return cache

    def _param_state(self, p: Tensor):
        """``self.state[p]``, created empty if missing, without the defaultdict's ``__missing__``:
        the dynamo of torch 2.7 does not call a dict subclass's ``__missing__`` when tracing."""
        if p not in self.state:
            self.state[p] = {}
        return self.state[p]

    def _collect_buckets(self, group, grads, present) -> GroupCache:
        buckets: Dict[tuple, GroupBucket] = {}
        seen = set()
        for index, (p, g) in enumerate(zip(group["params"], grads)):
            if id(p) in seen:
                raise ValueError(_DUPLICATE_PARAMS)
            seen.add(id(p))
            if g is None:
                continue
            self._check_param(p, g)
            state = self._param_state(p)
            if len(state) == 0:
                self._init_state(group, p, state)
            self._prepare_state(group, p, state)
            real = kernel_view(p)
            layout = _dtensor.layout_of(p)
            key = (p.device, real.dtype, layout)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = GroupBucket(p.device, layout)
                bucket.dtype = real.dtype
                bucket.state_lists = {name: [] for name in self.STATE_KEYS}
            bucket.params.append(real)
            bucket.owners.append(p)
            if layout is not None:
                bucket.shards.append(_dtensor.local(p))
            bucket.complex_mask.append(p.is_complex())
            bucket.grad_index.append(index)
            for name in self.STATE_KEYS:
                bucket.state_lists[name].append(self._state_view(name, state.get(name), layout))
        for bucket in buckets.values():
            bucket.all_grads = bucket.grad_index == list(range(len(grads)))
            bucket.has_complex = True in bucket.complex_mask
            # Checked here, once per cache, not at every step: what the kernels write must not
            # share memory (the state a user assigned may view a param or another state).
            written = [bucket.shards if bucket.layout is not None else bucket.params]
            written += list(bucket.state_lists.values())
            if _memory_shared(written):
                raise ValueError(f"{self.DISPLAY_NAME}: {_SHARED_MEMORY_MESSAGE}")
        return GroupCache(group["params"], present, list(buckets.values()), self._state_version(),
                          self._cache_flags(group))

    def _state_view(self, name: str, value: Optional[Tensor],
                    layout: Optional[_dtensor.Layout]) -> Optional[Tensor]:
        """The kernel's view of a state tensor of a param of ``layout`` (``step``: a 0-dim
        counter, a plain tensor in torch.optim even for DTensor params, used as it is)."""
        if value is None:
            return None
        if name == "step":
            return _dtensor.local(value)
        value = _dtensor.local_like(value, layout, f"{self.DISPLAY_NAME}: state {name!r}")
        return as_real(value)

    def _check_param(self, p: Tensor, g: Tensor) -> None:
        if g.is_sparse:
            raise RuntimeError(f"{self.DISPLAY_NAME} does not support sparse gradients")
        if not (p.is_floating_point() or p.is_complex()):
            raise RuntimeError(f"{self.DISPLAY_NAME} can only optimize floating point or complex "
                               f"parameters, got {p.dtype}")
        if g.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter shape "
                               f"{tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype}")
        if g.device != p.device:
            raise RuntimeError(f"gradient on {g.device} but parameter on {p.device}")

    def _select_backend(self, group: Dict[str, Any], bucket: GroupBucket):
        # Remembered on the bucket for the request it answered (the group's backend,
        # FUSEDOPT_BACKEND, the selection cache's generation): backends.select costs ~2.5 us, a
        # noticeable part of a small step.
        request = (group.get("backend", "auto"), os.environ.get(backends.ENV_VAR),
                   backends.generation)
        if bucket.backend_request != request:
            bucket.backend = backends.select(request[0], bucket.device, bucket.dtype)
            bucket.backend_request = request
        return bucket.backend

    # ---- subclass hooks ---------------------------------------------------------------------
    def _sparse_grad_positions(self, grads: List[Optional[Tensor]]) -> List[int]:
        """Positions of the grads this optimizer steps apart with :meth:`_step_sparse` (sparse
        ones, for an optimizer that takes them); none by default (the checks refuse them)."""
        return []

    def _step_sparse(self, group: Dict[str, Any], pairs, grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> None:
        """Step ``(param, sparse grad)`` pairs of ``group`` (see :meth:`_sparse_grad_positions`)."""
        raise NotImplementedError

    def _cache_flags(self, group: Dict[str, Any]) -> tuple:
        """Group options that decide which state tensors the cache holds (a change rebuilds)."""
        return ()

    def _init_state(self, group: Dict[str, Any], p: Tensor, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _prepare_state(self, group: Dict[str, Any], p: Tensor, state: Dict[str, Any]) -> None:
        """Fix up loaded state before caching it (e.g. move ``step`` next to the param)."""

    def _apply(self, group, bucket: GroupBucket, grads: List[Tensor], grad_scale, found_inf,
               backend) -> None:
        """One backend call (or a few) updating ``bucket`` with ``backend``."""
        raise NotImplementedError

    def _apply_reading_grads(self, group, bucket: GroupBucket, grad_scale, found_inf,
                             backend) -> bool:
        """Like :meth:`_apply` with a backend that reads the params' grads itself; False (nothing
        done) when the backend or the state does not allow it."""
        return False

