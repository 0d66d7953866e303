"""Hugging Face conventions in training, applied the way HF applies them under gradient checkpointing.

- ``use_cache``: a key/value cache keeps every block's activations, which a reversible chain does
  not. Training calls of a model whose ``forward`` takes ``use_cache`` get ``use_cache=False`` and
  no cache (``past_key_values``, from transformers 5.24 ``cache``), with one logged warning when the
  call or the config asked for a cache — in every call path: eager, lazily converted, ``Trainer``,
  ``generate()`` in train mode.
- HF gradient checkpointing (``model.gradient_checkpointing_enable()``, ``TrainingArguments(
  gradient_checkpointing=True)``) wraps each layer's forward in ``torch.utils.checkpoint``. A BDIA
  chain already recomputes each block once in backward; a second recompute would be pure cost, so
  it is turned off on the chain's blocks (before or after ``convert``), with one logged warning.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

from torch import nn

__all__ = ["CACHE_ARGUMENTS", "takes_use_cache", "turn_off_gradient_checkpointing", "without_cache"]

logger = logging.getLogger(__name__)


def takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``use_cache``: as a parameter (HF models with caches), or
    through ``**kwargs`` of a wrapper whose config has one (a peft ``PeftModel``)."""
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in parameters:
        return True
    forwards_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return forwards_kwargs and hasattr(getattr(model, "config", None), "use_cache")


CACHE_ARGUMENTS = ("past_key_values", "cache")  # the cache's keyword: transformers < 5.24, >= 5.24


def _is_cache(key: str, value: Any) -> bool:
    """Whether a call's keyword argument is a key/value cache (by name, or a ``transformers`` Cache)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return value is not None and (key in CACHE_ARGUMENTS or (
        cache_utils is not None and isinstance(value, getattr(cache_utils, "Cache", ()))))


def without_cache(model: nn.Module, kwargs: dict[str, Any], warned: set[str]) -> dict[str, Any]:
    """The keyword arguments of a training call with ``use_cache=False`` and no cache passed in
    (``past_key_values``, ``cache`` or any ``transformers`` Cache object)."""
    asked = kwargs.get("use_cache")
    if asked is None:
        asked = bool(getattr(getattr(model, "config", None), "use_cache", False))
    caches = [key for key, value in kwargs.items() if _is_cache(key, value)]
    if (asked or caches) and "use_cache" not in warned:
        warned.add("use_cache")
        logger.warning("%s: use_cache=True is incompatible with reversible BDIA training (a cache keeps every "
                       "block's activations); setting use_cache=False for training calls, as Hugging Face does "
                       "under gradient checkpointing", type(model).__name__)
    return dict(kwargs, use_cache=False, **{key: None for key in caches})


def turn_off_gradient_checkpointing(blocks: list[tuple[str, nn.Module]], warned: set[str]) -> None:
    """Turn HF gradient checkpointing off on chain blocks that have it on."""
    turned = [path for path, block in blocks if getattr(block, "gradient_checkpointing", False)]
    if not turned:
        return
    for _path, block in blocks:
        if getattr(block, "gradient_checkpointing", False):
            block.gradient_checkpointing = False
    if "gradient_checkpointing" not in warned:
        warned.add("gradient_checkpointing")
        logger.warning("turned Hugging Face gradient checkpointing off on the chain blocks %s: a BDIA chain "
                       "already recomputes each block once in backward, and a second recompute would be pure cost",
                       ", ".join(turned))
