"""Measure (and predict) the activation memory a training step keeps for backward."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from bdia_fx.calls import first_float_leaf
from bdia_fx.converted import observing
from bdia_fx.errors import ConversionError
from bdia_fx.module_tree import CHECKPOINT_FORMS, original_class, proxy_class, shallow_clone
from bdia_fx.report import ChainReport
from bdia_fx.run.frame import ChainObserver

__all__ = ["MemoryEstimate", "checkpoint_blocks", "default_loss", "estimate_saved_bytes", "saved_activation_bytes"]


class _ChainStateBytes(ChainObserver):
    """What chain calls keep outside autograd's saved tensors: the side inputs (masks, ...) a
    reversible call holds for its recompute (saved tensors of its updates too), and each call's RNG states."""

    def __init__(self) -> None:
        self.side_storages: dict[int, int] = {}
        self.state_bytes = 0

    def block_called(self, frame, index, sides) -> None:
        if frame.reversible:
            for _, tensor in sides:
                pointer = _data_pointer(tensor)
                if pointer is not None:
                    self.side_storages[pointer] = tensor.untyped_storage().nbytes()

    def forward_finished(self, frame) -> None:
        self.state_bytes += frame.unsaved_bytes()


def saved_activation_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes kept for backward by ``loss_fn()`` (a forward returning a loss), then run backward.

    Counts tensors autograd saves (``saved_tensors_hooks``, storages deduplicated, parameters and
    buffers excluded; a BDIA chain's codes and side bits are among them) plus what a converted
    model's chains keep outside saved tensors: checkpoint's RNG states, checksums, the γ seed, and
    the side inputs (masks, ...) the checkpointed blocks hold for their recompute.
    """
    storages: dict[int, int] = {}
    with observing(model, _ChainStateBytes()) as chains:
        with _recording_saved_tensors(model, lambda pointer, nbytes: storages.__setitem__(pointer, nbytes)):
            loss = loss_fn()
    model_storages = _model_storages(model)
    storages.update({p: n for p, n in chains.side_storages.items() if p not in model_storages})
    loss.backward()
    return sum(storages.values()) + chains.state_bytes


def default_loss(out: Any) -> torch.Tensor:
    """The mean square of the first floating-point tensor of a model output (a loss for measurements)."""
    leaves = tree_flatten(out)[0]
    index = first_float_leaf(leaves)
    if index is None:
        raise ConversionError("the model returned no floating-point tensor to take a loss of; pass a loss function")
    return leaves[index].float().square().mean()


@contextlib.contextmanager
def _recording_saved_tensors(model: nn.Module, record: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``record(storage address, bytes)`` for every tensor autograd saves, except the model's own."""
    model_storages = _model_storages(model)

    def pack(t: torch.Tensor) -> torch.Tensor:
        pointer = _data_pointer(t)
        if pointer is not None and pointer not in model_storages:
            record(pointer, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _model_storages(model: nn.Module) -> set[int]:
    """Storage addresses of the model's parameters and buffers (state, not activations)."""
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def _data_pointer(t: torch.Tensor) -> int | None:
    """The storage address of a real tensor; None for the fake tensors of a graph capture."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    """Saved-for-backward bytes of one training step, predicted from one plain forward."""

    outside_chains: int             # activations saved by the modules around the chains
    chain_blocks: dict[str, int]    # per chain: bytes all its blocks save under plain autograd
    chain_streams: dict[str, tuple[int, int]]  # per chain: (elements, bytes) of one stream tensor
    chain_lengths: dict[str, int]
    chain_random_blocks: dict[str, int]  # blocks whose RNG state is kept for replay
    chain_side_inputs: dict[str, int]    # per chain: bytes of the side inputs (masks, ...), kept once

    @property
    def plain(self) -> int:
        return self.outside_chains + sum(self.chain_blocks.values())

    @property
    def checkpoint(self) -> int:
        """Per-block ``torch.utils.checkpoint``: each block keeps only its input."""
        return self.outside_chains + sum(k * self.chain_streams[c][1] + self.chain_side_inputs[c]
                                         for c, k in self.chain_lengths.items())

    @property
    def bdia(self) -> int:
        """x_K and x_{K-1} in full, K-1 packed side-bit tensors (1 bit per element), RNG states, side
        inputs, and the 8-byte seed γ is drawn from (per chain)."""
        rng_state = torch.get_rng_state().numel()
        total = self.outside_chains
        for chain, k in self.chain_lengths.items():
            elements, nbytes = self.chain_streams[chain]
            total += 2 * nbytes + (k - 1) * math.ceil(elements / 8) + self.chain_random_blocks[chain] * rng_state
            total += self.chain_side_inputs[chain] + 8
        return total


def estimate_saved_bytes(model: nn.Module, report: ChainReport, loss_fn: Callable[[], torch.Tensor]) -> MemoryEstimate:
    """Predict plain / checkpoint / BDIA saved bytes from one plain forward of ``loss_fn()``.

    ``model`` is the unconverted model and ``report`` its :func:`bdia_fx.find_chains` report;
    saved tensors are attributed to the block running when autograd saves them.
    """
    modules = dict(model.named_modules())
    owner: dict[str, str] = {path: chain.container for chain in report.chains for path in chain.block_paths}
    running: list[str] = []
    per_chain = {chain.container: 0 for chain in report.chains}
    streams: dict[str, tuple[int, int]] = {}
    sides: dict[str, dict[int, int]] = {chain.container: {} for chain in report.chains}
    seen: dict[int, tuple[str, int]] = {}
    model_storages = _model_storages(model)
    handles = []
    for path, chain in owner.items():
        def enter(module, args, kwargs, _path=path, _chain=chain):
            running.append(_path)
            leaves = tree_flatten((args, kwargs))[0]
            index = first_float_leaf(leaves)
            stream = leaves[index] if index is not None else None
            tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
            if stream is not None:
                streams[_chain] = (stream.numel(), stream.numel() * stream.element_size())
            for side in tensors:
                pointer = _data_pointer(side)
                if side is not stream and pointer is not None and pointer not in model_storages:
                    sides[_chain][pointer] = side.untyped_storage().nbytes()
        handles.append(modules[path].register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(modules[path].register_forward_hook(lambda *_: running.pop() and None))

    def record(pointer: int, nbytes: int) -> None:
        seen[pointer] = (owner[running[-1]] if running else "", nbytes)

    try:
        with _recording_saved_tensors(model, record):
            loss_fn()
    finally:
        for handle in handles:
            handle.remove()
    outside = 0
    for chain, nbytes in seen.values():
        if chain:
            per_chain[chain] += nbytes
        else:
            outside += nbytes
    lengths = {chain.container: len(chain.blocks) for chain in report.chains}
    random = {chain.container: sum(b.random for b in chain.blocks) for chain in report.chains}
    side_bytes = {chain: sum(found.values()) for chain, found in sides.items()}
    return MemoryEstimate(outside, per_chain, streams, lengths, random, side_bytes)


def checkpoint_blocks(model: nn.Module, report: ChainReport, form: str = "checkpoint",
                      only: Collection[str] | None = None) -> nn.Module:
    """A structural copy of ``model`` (shared parameters) running every chain block (or the blocks whose paths
    are in ``only``) under ``torch.utils.checkpoint`` — per-block checkpointing, the baseline of comparisons.
    ``form``: ``"checkpoint"`` (torch's recommended non-reentrant form, its recompute stops early),
    ``"checkpoint-full"`` (early stop off: each block recomputed whole, as BDIA must) or
    ``"checkpoint-reentrant"`` (the classic form)."""
    if form not in CHECKPOINT_FORMS:
        raise ValueError(f"form must be one of {sorted(CHECKPOINT_FORMS)}, got {form!r}")
    clone = shallow_clone(model)
    modules = dict(clone.named_modules())
    for chain in report.chains:
        for path in chain.block_paths:
            if only is None or path in only:
                modules[path].__class__ = proxy_class(original_class(modules[path]), form)
    return clone
