"""The module names of bdia_fx 0.1, so that what it pickled fails with the version to use.

``torch.save(model)`` of a converted (or PAM) model pickles the bdia_fx classes it holds by module
path. bdia_fx 0.2 moved those modules (the run into :mod:`bdia_fx.run`, PAM into :mod:`bdia_fx.pam`)
and changed what their objects hold, so a 0.1 pickle cannot be rebuilt; importing one of its module
names raises a ``ModuleNotFoundError`` that says so and how to carry the model over. ``state_dict``
and ``save_pretrained`` files hold only the model's own tensors under the original keys: they load
unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["MOVED_IN_0_2", "install"]

MOVED_IN_0_2 = {  # module of bdia_fx 0.1 -> where its contents are in 0.2
    "bdia_fx.runtime": "bdia_fx.run.runtime",
    "bdia_fx.chain_step": "bdia_fx.run.chain_step",
    "bdia_fx.block_maps": "bdia_fx.run.block_maps",
    "bdia_fx.frame": "bdia_fx.run.frame",
    "bdia_fx.guards": "bdia_fx.run.guards",
    "bdia_fx.observe": "bdia_fx.converted and bdia_fx.run.frame",
    "bdia_fx.scheme_chain": "bdia_fx.schemes and bdia_fx.run.chain_step",
    "bdia_fx.scheme_form": "bdia_fx.schemes",
    "bdia_fx.pam_math": "bdia_fx.pam.arithmetic",
    "bdia_fx.pam_ops": "bdia_fx.pam.ops",
    "bdia_fx.pam_model": "bdia_fx.pam.model",
}


class _EarlierLayout(importlib.abc.MetaPathFinder):
    """Consulted after every other finder: only a name that exists nowhere else reaches it."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_IN_0_2:
            return None
        raise ModuleNotFoundError(
            f"No module named '{fullname}': a module of bdia_fx 0.1, moved in 0.2 to {MOVED_IN_0_2[fullname]}. "
            "A model saved whole with bdia_fx 0.1 (torch.save(model), pickle) loads only with the bdia_fx 0.1 "
            "that saved it (0.1.0, e.g. commit 7536aa5): load it there and save model.state_dict() (or "
            "save_pretrained); "
            "with 0.2, convert the original model again and load that state dict (its keys are unchanged)",
            name=fullname)


def install() -> None:
    """Add the finder (once) at the end of ``sys.meta_path``."""
    if not any(isinstance(finder, _EarlierLayout) for finder in sys.meta_path):
        sys.meta_path.append(_EarlierLayout())
