"""What a step's recompute depends on besides its stream input, as it was at the step's forward.

A reversible backward runs each block again from the model's *current* state. Autograd guards the
tensors it saves with version counters; a recompute must guard what it reads instead (see
``docs/design.md``, "Never silently wrong"):

- parameters and buffers of the block's modules, and the side inputs of the call (masks, rotary
  tables, encoder memory): an in-place change between forward and backward (``optimizer.step()``
  before ``backward()``, ``load_state_dict``, ``weight.add_()``) raises
  :class:`~bdia_fx.errors.ReversibilityError` naming the tensor, where plain autograd raises
  "modified by an inplace operation". A parameter, buffer or submodule *replaced* by another
  object is exact in plain autograd (it saved the old tensors), so the recompute runs with the
  forward's objects.
- module state: ``training`` flags and attributes holding plain values (bool, int, float, str,
  None: ``Dropout.p``, counters): the recompute runs under the values the forward saw, and the
  values current before the recompute are put back after it (a counter is not bumped twice).

Edits through ``.data`` bump no version counter; autograd misses them too. The checksum of the
step's update codes (``BDIAConfig(verify=True)``, the default) catches those that change the output.
Other tensor attributes (caches a module keeps of its last call) are not guarded: holding them
would keep the previous call's activations alive.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bdia_fx.errors import ReversibilityError

__all__ = ["StepState", "record_step", "version_of"]

_PLAIN_TYPES = (bool, int, float, str, type(None))
_MISSING = object()


def version_of(t: torch.Tensor) -> int | None:
    """The version counter of ``t``; None where there is none (inference tensors)."""
    return None if t.is_inference() else t._version


def _plain_state(module: nn.Module) -> tuple[dict[str, object], frozenset[str]]:
    """The module's attributes holding plain values, and the names of all its attributes."""
    table = module.__dict__
    return {k: v for k, v in table.items() if type(v) in _PLAIN_TYPES}, frozenset(table)


def _modules_of(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``block.named_modules(remove_duplicate=False)``, in its order, without a generator per module
    (this runs at every step of every training call)."""
    found, stack = [], [("", block)]
    while stack:
        name, module = stack.pop()
        found.append((name, module))
        stack.extend((f"{name}.{key}" if name else key, child)
                     for key, child in reversed(module._modules.items()) if child is not None)
    return found


def record_step(block: nn.Module, path: str, side_inputs: list[tuple[int, torch.Tensor]],
                name_of: Callable[[int], str], outside: list[tuple[str, torch.Tensor]] = ()) -> StepState:
    """What the recompute of a step of ``block`` will read, as it is now (before the step runs);
    ``side_inputs`` are the call's other tensors by argument leaf, named by ``name_of``; ``outside`` the
    parameters and buffers it reads from modules outside ``block``, by qualified name."""
    modules = _modules_of(block)
    slots = [(name, kind, table, key, value)
             for name, module in modules
             for kind, table in (("parameter", module._parameters), ("buffer", module._buffers),
                                 ("submodule", module._modules))
             for key, value in table.items() if value is not None]
    versions = [version_of(value) if isinstance(value, torch.Tensor) else None for *_, value in slots]
    sides = [(index, weakref.ref(t), version_of(t)) for index, t in side_inputs]  # not kept alive by the guard
    return StepState(path, modules, slots, versions, sides, name_of, [_plain_state(m) for _, m in modules],
                     [(name, t, version_of(t)) for name, t in outside])


class StepState:
    """A step's dependencies as recorded at its forward; :meth:`replay` is the recompute's context."""

    def __init__(self, path: str, modules: list[tuple[str, nn.Module]], slots: list, versions: list,
                 sides: list, name_of: Callable[[int], str], plain: list[tuple[dict[str, object], frozenset[str]]],
                 outside: list[tuple[str, torch.Tensor, int | None]] = ()):
        self.path, self.modules, self.slots, self.versions = path, modules, slots, versions
        self.sides, self.name_of, self.plain = sides, name_of, plain
        self.outside = list(outside)  # (name, tensor, version) of the state read from outside the block

    def check(self) -> None:
        """Raise :class:`ReversibilityError` if a tensor the recompute reads was modified in place."""
        for (name, kind, _, key, value), version in zip(self.slots, self.versions):
            if version is not None and value._version != version:
                where = f"{name}.{key}" if name else key
                raise ReversibilityError(
                    f"{kind} '{self.path}.{where}' was modified in place between this block's forward and its "
                    "backward (by optimizer.step() or load_state_dict() before loss.backward(), an in-place write "
                    "such as weight.add_(), or code run after the block's forward that updates it); the recompute "
                    "would use the new values. Plain autograd raises too where it saved the tensor: run backward "
                    "before changing parameters", module=self.path)
        for name, tensor, version in self.outside:
            if version is not None and tensor._version != version:
                raise ReversibilityError(
                    f"'{name}', which this block reads from a module outside it, was modified in place between the "
                    "forward and the backward (optimizer.step() or load_state_dict() before loss.backward(), an "
                    "in-place write); the recompute would use the new values. Run backward before changing it",
                    module=self.path)
        for index, ref, version in self.sides:
            tensor = ref()
            if version is not None and tensor is not None and tensor._version != version:
                raise ReversibilityError(
                    f"side input '{self.name_of(index)}' of this block (a mask, position table or encoder state) was "
                    "modified in place between the forward and the backward; the recompute would read the new "
                    "values. Pass a copy, or modify it only after backward", module=self.path)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the recompute with the forward's module state and objects; afterwards every entry it
        touched holds what it held before the recompute (or is absent again)."""
        touched: list[tuple[dict, str, object]] = []

        def put(table: dict, key: str, value: object) -> None:
            touched.append((table, key, table.get(key, _MISSING)))
            table[key] = value

        try:
            for _, _, table, key, value in self.slots:
                if table.get(key, _MISSING) is not value:
                    put(table, key, value)
            for (_, module), (then, names) in zip(self.modules, self.plain):
                table = module.__dict__
                for key in [k for k in table.keys() - names if type(table[k]) in _PLAIN_TYPES]:
                    touched.append((table, key, table.pop(key)))  # made after the forward saw the module
                for key, value in then.items():
                    if table.get(key, _MISSING) is not value:
                        put(table, key, value)
            yield
        finally:
            for table, key, before in reversed(touched):
                if before is _MISSING:
                    table.pop(key, None)
                else:
                    table[key] = before
