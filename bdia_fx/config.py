"""User-facing configuration of the BDIA rewrite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bdia_fx.schemes import BDIA, SCHEMES, ChainScheme

__all__ = ["BDIAConfig"]

_ALLOWED_GAMMAS = (-0.5, 0.5)


@dataclass(frozen=True)
class BDIAConfig:
    """How a residual chain is turned into a BDIA chain.

    Args:
        frac_bits: fractional bits ``l`` of the fixed-point grid (values are multiples of 2^-l).
        gammas: the set γ is drawn from, uniformly, per sample per block. Only ±½ keep the
            update exactly invertible with one side bit; ``(0.5,)`` or ``(-0.5,)`` fix γ.
        granularity: ``"block"`` (one step per repeated block module, the paper's choice) or
            ``"sublayer"`` (every sequential residual add its own step: attention and MLP of a
            pre-LN block are two steps; a parallel-residual block stays one). Sublayer steps run
            from each block's exported training graph, exported once per call pattern and
            input shapes.
        mode: ``"reversible"`` (store x_K, x_{K-1} and side bits, recompute on backward) or
            ``"stored"`` (the same forward under ordinary autograd: the reference).
        verify: store a checksum of every step's update codes in forward and check the
            recompute against it in backward, raising :class:`ReversibilityError` naming the block
            (on by default: it catches randomness checkpoint does not replay and state edits no
            version counter shows; ``False`` opts out of its two reductions per step).
        quantize_eval: in ``.eval()`` run x_{k+1} = Q[f_k(x_k)]; ``False`` runs the original blocks.
        batch_dim: dim of the stream tensor that indexes samples (γ is drawn per sample);
            ``None`` infers it (1 when a block has ``batch_first=False``, else 0).
        residual_only: ``False`` (experimental) also accepts blocks that are not x + h(x), such as
            post-LN blocks LN(x + h(x)): the update x_{k+1} = Q[γx_{k-1}] + Q[(1+γ)f_k(x_k) − 2γx_k]
            is exactly invertible for any block map f_k and γ = 0 is the original model, but
            whether such a chain trains as well is a measured question (``benchmarks/post_ln.py``).
        scheme: ``"bdia"`` (default, :data:`bdia_fx.schemes.BDIA`), a shear scheme of
            :mod:`bdia_fx.schemes` (its name, e.g. ``"alf"``, or a :class:`~bdia_fx.schemes.Scheme`), or any
            :class:`~bdia_fx.schemes.ChainScheme` (the stepping interface; one defined outside bdia_fx
            too). For a shear scheme block k is the vector field of step k
            (step size 1) and the chain is integrated with that scheme, exactly invertible with no side
            bits. Its inference form is the scheme's own step, which *changes the model* (unlike BDIA
            at γ = 0); ``revert`` and ``export_onnx`` emit that form.
            Block granularity only; ``gammas`` do not apply.
    """

    frac_bits: int = 9
    gammas: tuple[float, ...] = (-0.5, 0.5)
    granularity: Literal["block", "sublayer"] = "block"
    mode: Literal["reversible", "stored"] = "reversible"
    verify: bool = True
    quantize_eval: bool = True
    batch_dim: int | None = None
    residual_only: bool = True
    scheme: str | ChainScheme = "bdia"

    def __post_init__(self) -> None:
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 20:
            raise ValueError(f"BDIAConfig.frac_bits must be an int in [0, 20], got {self.frac_bits!r}")
        gammas = tuple(dict.fromkeys(float(g) for g in self.gammas))  # each value once, in order
        if not gammas or any(g not in _ALLOWED_GAMMAS for g in gammas):
            raise ValueError(
                f"BDIAConfig.gammas must be a non-empty subset of {_ALLOWED_GAMMAS}, got {self.gammas!r}: "
                "only γ = ±½ make Q[γx] exact with one side bit per element"
            )
        object.__setattr__(self, "gammas", gammas)
        if self.granularity not in ("block", "sublayer"):
            raise ValueError(f"BDIAConfig.granularity must be 'block' or 'sublayer', got {self.granularity!r}")
        if self.mode not in ("reversible", "stored"):
            raise ValueError(f"BDIAConfig.mode must be 'reversible' or 'stored', got {self.mode!r}")
        if self.scheme is BDIA:
            object.__setattr__(self, "scheme", "bdia")
        if not (self.scheme == "bdia" or isinstance(self.scheme, ChainScheme) or self.scheme in SCHEMES):
            raise ValueError(f"BDIAConfig.scheme must be 'bdia', a bdia_fx.schemes.ChainScheme or one of "
                             f"{sorted(SCHEMES)}, got {self.scheme!r}")
        if self.scheme != "bdia" and self.granularity != "block":
            raise ValueError(f"BDIAConfig.scheme={self.scheme!r} runs whole blocks as steps: granularity must be "
                             f"'block', got {self.granularity!r}")
        if self.batch_dim is not None and self.batch_dim not in (0, 1):
            raise ValueError(f"BDIAConfig.batch_dim must be 0, 1 or None, got {self.batch_dim!r}")
