"""``optimizer.state`` that says when it changed, so the optimizers' caches know when to rebuild.

The optimizers cache, per param group, the lists of state tensors their kernels take
(``base.GroupCache``): reading ``state[p][key]`` for every param at every step would cost more
than a small step itself (a dict lookup keyed by a tensor runs ``Tensor.__hash__`` in Python).
torch.optim reads the state afresh at every step, so code that edits it between steps works
there: ``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p] = {...}``,
``opt.state[p]["step"] = torch.tensor(0.)``, ``opt.state[p]["momentum_buffer"] = None``. Here
the state is a :class:`TrackedState` of :class:`ParamState` dicts: every change of an entry, at
either level, advances one :class:`StateVersion` shared by both, and a cache built at another
version is rebuilt. In-place changes of the tensors themselves need nothing (the caches hold
the same tensors).

Both are dicts (``TrackedState`` a ``defaultdict``), so code that reads the state sees
torch.optim's types; ``FusedOptimizer.state_dict()`` hands out plain dicts, so checkpoints
hold nothing of this module and load with ``torch.load(weights_only=True)`` anywhere.
"""
from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping, Optional


class StateVersion:
    """A counter: advanced by every change of a :class:`TrackedState` or its entries."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0):
        self.value = value

    def __reduce__(self):
        return (StateVersion, (self.value,))


def _changing(name: str):
    """The dict method ``name``, advancing the version after it ran."""
    method = getattr(dict, name)

    def changed(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        self._version.value += 1
        return result

    changed.__name__ = name
    changed.__doc__ = method.__doc__
    return changed


class ParamState(dict):
    """The state of one parameter (``opt.state[p]``): a dict whose changes advance the version."""

    __slots__ = ("_version",)

    def __init__(self, version: StateVersion, items: Any = ()):
        super().__init__(items)
        self._version = version

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, value)
        self._version.value += 1

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def __reduce__(self):
        return (ParamState, (self._version, dict(self)))

    def __repr__(self) -> str:
        return dict.__repr__(self)


class TrackedState(collections.defaultdict):
    """``optimizer.state``: param -> :class:`ParamState`, created empty on first access as
    torch.optim's ``defaultdict(dict)`` does. A plain dict stored into it is copied into a
    ``ParamState`` (so that its later changes are seen too)."""

    __slots__ = ("_version",)

    def __init__(self, items: Optional[Iterable] = None, version: Optional[StateVersion] = None):
        super().__init__(None)
        self._version = version if version is not None else StateVersion()
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for key, value in pairs:
                dict.__setitem__(self, key, self._wrap(value))

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, ParamState) and value._version is self._version:
            return value
        return ParamState(self._version, value) if isinstance(value, Mapping) else value

    def __missing__(self, key) -> ParamState:
        value = ParamState(self._version)
        dict.__setitem__(self, key, value)
        self._version.value += 1
        return value

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, self._wrap(value))
        self._version.value += 1

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return dict.__getitem__(self, key)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            dict.__setitem__(self, key, self._wrap(value))
        self._version.value += 1

    def __ior__(self, other):
        self.update(other)
        return self

    def copy(self) -> "TrackedState":
        return TrackedState(self, StateVersion(self._version.value + 1))

    __copy__ = copy

    def __reduce__(self):
        return (TrackedState, (None, self._version), None, None, iter(self.items()))

    def __repr__(self) -> str:
        return dict.__repr__(self)


for _name in ("__delitem__", "clear", "pop", "popitem", "update", "__ior__"):
    setattr(ParamState, _name, _changing(_name))
for _name in ("__delitem__", "clear", "pop", "popitem"):
    setattr(TrackedState, _name, _changing(_name))
del _name


def tracked(state: Mapping, previous: Optional[TrackedState] = None) -> TrackedState:
    """``state`` as a :class:`TrackedState` (itself if it is one), at a version no cache built
    on ``previous`` can hold."""
    if isinstance(state, TrackedState):
        if previous is not None and state is not previous:
            state._version.value = max(state._version.value, previous._version.value) + 1
        return state
    start = previous._version.value + 1 if previous is not None else 0
    return TrackedState(state, StateVersion(start))


__all__ = ["StateVersion", "ParamState", "TrackedState", "tracked"]
