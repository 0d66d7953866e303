"""``export_onnx``: write the γ = 0 model to ONNX with ``torch.onnx.export`` and check it in onnxruntime.

Needs the ``onnx`` extra (``pip install "bdia-fx[onnx]"``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from bdia_fx.converted import is_converted
from bdia_fx.errors import ExportError
from bdia_fx.module_tree import infer_batch_dim, is_inference_proxy, shallow_clone
from bdia_fx.reversal import revert, reverted_info

__all__ = ["OnnxCheck", "OnnxExport", "export_onnx", "run_onnx", "verify_onnx"]


def _gist(error: Exception) -> str:
    """The line of a torch.onnx error that says what failed: its exception summary if it has one
    (the first line only says which export step failed), else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the exporter colours its messages
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "## Exception summary" in lines[:-1]:
        return f"{lines[0].split('. ')[0]}: {lines[lines.index('## Exception summary') + 1]}"
    return lines[0]


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    file_bytes: int
    export_seconds: float
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    check: OnnxCheck | None  # onnxruntime vs PyTorch on the example inputs (None: not verified)


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: tuple = (),
                example_kwargs: dict | None = None,
                quantize: bool = False, dynamic_batch: bool = True, dynamic_seq: bool = True, verify: bool = True,
                atol: float = 1e-4, rtol: float = 1e-4, max_mismatch: float = 0.0) -> OnnxExport:
    """Export the γ = 0 graph of a converted (or reverted) ``model`` to the ONNX file ``path``.

    A converted model is reverted first (:func:`bdia_fx.revert` with ``quantize``); with
    ``quantize=True`` the stream quantization appears in the file as ordinary Mul/Round/Div ops.
    ``dynamic_batch`` / ``dynamic_seq`` make the batch and sequence axes of the inputs symbolic
    (found from the first tensor input: batch on dim 0, or dim 1 for ``batch_first=False``
    models; sequence = the other of the first two dims of a rank-2/3 input; image inputs have no
    sequence axis). The file is written to a temporary name beside ``path``, checked with
    ``onnx.checker`` and, when ``verify``, run in onnxruntime on the example inputs against the
    PyTorch model; only then is it moved to ``path``. Raises :class:`ExportError` (nothing left
    behind) if the path cannot be written, the model cannot be exported, or the outputs differ
    by more than ``atol + rtol·|reference|`` (in more than a ``max_mismatch`` fraction of the
    elements). With ``quantize`` the allowed difference is at least the quantization's own effect
    on the outputs (quantized vs unquantized PyTorch): onnxruntime sums in another order, and a
    value within a float rounding of a half-code boundary rounds to the neighbouring code, which
    later blocks carry on — the file must stay within the noise the quantization itself adds.
    """
    torch_onnx, onnx = _import_onnx()
    target = Path(path)
    _check_writable(target)
    if not example_inputs and not example_kwargs:
        raise ExportError("export_onnx needs example inputs (example_inputs and/or example_kwargs)")
    exported = _inference_model(model, quantize)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    named, argument_names = _bind(exported, args, kwargs)
    axes = _dynamic_axes(exported, named, dynamic_batch, dynamic_seq)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise ExportError(f"cannot write {target}: {error}") from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        start = time.perf_counter()
        with _quiet():
            try:
                program = torch_onnx.export(
                    exported, args, kwargs=kwargs, dynamo=True, verbose=False,
                    dynamic_shapes=_dynamic_shapes(argument_names, axes) if axes else None)
            except Exception as error:  # the exporter's own errors are long; keep their gist visible
                raise ExportError(f"torch.onnx.export failed for {type(model).__name__} (the reverted model runs "
                                  f"the model's own code): {_gist(error)}") from error
            program.save(tmp, external_data=False)
        seconds = time.perf_counter() - start
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as error:
            raise ExportError(f"onnx.checker rejected the exported file: {error}") from error
        proto = onnx.load(str(tmp), load_external_data=False)
        _check_axes_stayed_dynamic(proto, axes)
        check = None
        if verify:
            if quantize:
                atol = max(atol, _quantization_effect(exported, args, kwargs))
            check = verify_onnx(tmp, exported, args, kwargs, atol, rtol, max_mismatch)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return OnnxExport(target, target.stat().st_size, seconds, tuple(i.name for i in proto.graph.input),
                      tuple(o.name for o in proto.graph.output), axes, check)


@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime vs PyTorch on one set of inputs."""

    max_abs_diff: float
    mismatched: int  # elements differing by more than atol + rtol·|reference|
    total: int

    @property
    def mismatch_fraction(self) -> float:
        return self.mismatched / max(self.total, 1)


def verify_onnx(path: str | os.PathLike, model: nn.Module, example_inputs: tuple = (),
                example_kwargs: dict | None = None,
                atol: float = 1e-4, rtol: float = 1e-4, max_mismatch: float = 0.0) -> OnnxCheck:
    """Run the ONNX file in onnxruntime and ``model`` (eval, no grad) on the same inputs; compare.

    An element mismatches when it differs by more than ``atol + rtol·|reference|``; raises
    :class:`ExportError` with the max difference if more than a ``max_mismatch`` fraction of
    all output elements do (0: none may). A quantized chain needs a small allowance: onnxruntime
    and PyTorch sum in different orders, so a value within a float rounding of a half-code
    boundary can round to the neighbouring code (one step, 2^-l) in one of them.
    """
    expected = _reference_outputs(model, tuple(example_inputs), dict(example_kwargs or {}))
    got = run_onnx(path, model, example_inputs, example_kwargs)
    if len(got) != len(expected):
        raise ExportError(f"{path}: onnxruntime gave {len(got)} outputs, PyTorch {len(expected)}")
    worst, mismatched, total = 0.0, 0, 0
    for i, (ref, out) in enumerate(zip(expected, got)):
        out = torch.from_numpy(out)
        if out.shape != ref.shape:
            raise ExportError(f"{path}: output {i} has shape {tuple(out.shape)} in onnxruntime, "
                              f"{tuple(ref.shape)} in PyTorch")
        if not ref.is_floating_point():
            if not torch.equal(out.to(ref.dtype), ref):
                raise ExportError(f"{path}: integer output {i} differs between onnxruntime and PyTorch")
            continue
        diff = (out.to(ref.dtype) - ref).abs()
        total += diff.numel()
        if diff.numel():
            worst = max(worst, float(diff.max()))
            mismatched += int((diff > atol + rtol * ref.abs()).sum())
    check = OnnxCheck(worst, mismatched, total)
    if check.mismatch_fraction > max_mismatch or worst != worst:
        raise ExportError(f"{path}: onnxruntime and PyTorch disagree: max abs diff {worst:.3g}, {mismatched} of "
                          f"{total} elements beyond {atol:g} + {rtol:g}·|reference| "
                          f"(allowed fraction {max_mismatch:g})")
    return check


def run_onnx(path: str | os.PathLike, model: nn.Module, example_inputs: tuple = (),
             example_kwargs: dict | None = None) -> list:
    """Run an exported file in onnxruntime, feeding the tensor arguments of ``model``'s call by name."""
    _import_onnx()
    import onnxruntime

    named, _ = _bind(model, tuple(example_inputs), dict(example_kwargs or {}))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in named:
            raise ExportError(f"{path}: the ONNX input '{spec.name}' is not a tensor argument of "
                              f"{type(model).__name__}.forward ({sorted(named)})")
        feeds[spec.name] = named[spec.name].detach().cpu().numpy()
    return session.run(None, feeds)


def _import_onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        import torch.onnx as torch_onnx
    except ImportError as error:
        raise ExportError(f"ONNX export needs the onnx extra: pip install \"bdia-fx[onnx]\" ({error})") from error
    return torch_onnx, onnx


def _check_writable(target: Path) -> None:
    if target.is_dir():
        raise ExportError(f"cannot write {target}: it is a directory")
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ExportError(f"cannot write {target}: permission denied")


def _inference_model(model: nn.Module, quantize: bool) -> nn.Module:
    """A γ = 0 copy of ``model`` in eval mode (``model`` itself keeps its mode)."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected an nn.Module, got {type(model).__name__}")
    if is_converted(model):
        exported = revert(model, quantize=quantize)
    else:
        info = reverted_info(model)
        if info is not None and info.quantize != quantize:
            raise ExportError(f"the model was reverted with quantize={info.quantize}; export it with that, "
                              f"or revert the converted model with quantize={quantize}")
        if info is None and quantize:
            raise ExportError("quantize=True needs a model made by bdia_fx.convert or bdia_fx.revert(quantize=True)")
        exported = shallow_clone(model)
    broken = [name for name, p in exported.named_parameters() if p.is_meta]
    if broken:
        raise ExportError(f"parameter '{broken[0]}' is on the meta device (no values): load weights before exporting")
    return exported.eval()


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensor arguments of ``model.forward(*args, **kwargs)`` by parameter name (the ONNX input
    names), and the names of all bound arguments (the keys of ``torch.export`` dynamic shapes)."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ExportError(f"example inputs do not fit {type(model).__name__}.forward: {error}") from error
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update({k: v for k, v in value.items() if isinstance(v, torch.Tensor)})
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if any(isinstance(v, torch.Tensor) for v in value):
                raise ExportError(f"{type(model).__name__}.forward takes *{name}; "
                                  "tensor inputs need names to be exported")
        elif isinstance(value, torch.Tensor):
            named[name] = value
        elif any(isinstance(v, torch.Tensor) for v in tree_flatten(value)[0]):
            raise ExportError(f"argument '{name}' nests tensors in a {type(value).__name__}; pass tensors as "
                              "top-level arguments to export them")
    return named, list(bound.arguments)


def _dynamic_axes(model: nn.Module, named: dict[str, torch.Tensor], batch: bool,
                  seq: bool) -> dict[str, dict[int, str]]:
    """Which axis of which input is 'batch' / 'seq', found from the first tensor input's layout."""
    if not named or not (batch or seq):
        return {}
    first_name, first = next(iter(named.items()))
    batch_dim = infer_batch_dim([model])
    sizes: dict[str, int] = {}
    if batch and first.dim() > batch_dim:
        sizes["batch"] = first.shape[batch_dim]
    if seq and first.dim() in (2, 3):
        sizes["seq"] = first.shape[1 - batch_dim]
    for axis, size in sizes.items():
        if size < 2:
            raise ExportError(f"the example {axis} size of '{first_name}' is {size}; use at least 2 so the exporter "
                              "does not fix that axis")
    if len(set(sizes.values())) < len(sizes):
        raise ExportError(f"the example batch and sequence sizes of '{first_name}' are equal ({sizes['batch']}); "
                          "use different sizes so the axes can be told apart")
    axes = {}
    for name, tensor in named.items():
        found = {}
        for dim, size in enumerate(tensor.shape):
            for axis, axis_size in sizes.items():
                if size == axis_size and axis not in found.values():
                    found[dim] = axis
                    break
        if found:
            axes[name] = found
    return axes


def _dynamic_shapes(argument_names: list[str], axes: dict[str, dict[int, str]]) -> dict[str, Any]:
    """``torch.export`` dynamic shapes by argument name: ``Dim.AUTO`` on every batch/seq axis."""
    return {name: ({dim: torch.export.Dim.AUTO for dim in axes[name]} if name in axes else None)
            for name in argument_names}


def _check_axes_stayed_dynamic(proto: Any, axes: dict[str, dict[int, str]]) -> None:
    inputs = {i.name: i for i in proto.graph.input}
    for name, dims in axes.items():
        if name not in inputs:
            continue
        shape = inputs[name].type.tensor_type.shape.dim
        for dim, axis in dims.items():
            if not shape[dim].dim_param:
                raise ExportError(f"the exporter fixed the {axis} axis (dim {dim}) of input '{name}' to "
                                  f"{shape[dim].dim_value}: the model's code depends on that size; export with "
                                  f"dynamic_{axis}=False")


def _quantization_effect(model: nn.Module, args: tuple, kwargs: dict) -> float:
    """Max |quantized − unquantized| PyTorch output of a model with quantized inference forms on these inputs."""
    unquantized = shallow_clone(model)
    forms: dict[int, Any] = {}
    for module in unquantized.modules():
        if is_inference_proxy(module):
            form = module.__dict__["_bdia_form"]
            module.__dict__["_bdia_form"] = forms.setdefault(id(form), form.with_quantize(False))
    pairs = zip(_reference_outputs(model, args, kwargs), _reference_outputs(unquantized, args, kwargs))
    return max((float((a - b).abs().max()) for a, b in pairs if a.is_floating_point() and a.numel()), default=0.0)


def _reference_outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    reference = shallow_clone(model).eval()
    with torch.no_grad():
        out = reference(*args, **kwargs)
    return [leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines and its one internal deprecation notice (torch's own
    pytree use); the model's own warnings and all errors still show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)
