"""Model cases and gradient helpers shared by the test modules (no test in here)."""

from __future__ import annotations

import torch

from bdia_fx.run.frame import ChainObserver

from models import (
    HelperResidualStack,
    ParentLoopViT,
    TinyGPT,
    encoder,
    flat_sequential_lm,
    gpt2,
    gptj,
    llama,
    neox,
    opt,
    residual_sequential,
    swin,
    t5,
    vit,
)

# name -> (build model, example args, example kwargs): one training call per case
TRAINING_CASES = {
    "encoder-batch-first": (lambda: encoder(4, batch_first=True, dropout=0.1), lambda: (torch.randn(3, 7, 32),), {}),
    "encoder-seq-first": (lambda: encoder(4, batch_first=False, dropout=0.1), lambda: (torch.randn(7, 3, 32),), {}),
    "tiny-gpt-dropout": (lambda: TinyGPT(layers=5, dropout=0.1), lambda: (torch.randint(0, 50, (3, 9)),), {}),
    "hf-gpt2": (lambda: gpt2(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-vit": (lambda: vit(3), lambda: (torch.randn(2, 1, 16, 16),), {}),
    "hf-llama-rotary": (lambda: llama(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-neox-parallel-residual": (lambda: neox(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-opt-reshaped-residual": (lambda: opt(3), lambda: (torch.randint(2, 64, (2, 8)),), {"use_cache": False}),
    "hf-gptj-parallel-returns-weights": (lambda: gptj(3),
                                         lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-t5-both-stacks-after-block-0": (lambda: t5(3), lambda: _t5_inputs(2, 8), {"use_cache": False}),
    "hf-swin-one-chain-per-stage": (lambda: swin(), lambda: (torch.randn(2, 3, 32, 32),), {}),
    "parent-loop-h-plus-x": (lambda: ParentLoopViT(), lambda: (torch.randn(3, 8, 8),), {}),
    "parent-loop-x-plus-h": (lambda: ParentLoopViT(skip_first=True), lambda: (torch.randn(3, 8, 8),), {}),
    "sequential-of-residual-wrappers": (lambda: residual_sequential(), lambda: (torch.randn(3, 8, 8),), {}),
    "flat-sequential-with-final-norm": (lambda: flat_sequential_lm(), lambda: (torch.randint(0, 64, (2, 8)),), {}),
    "layer-parts-x-transformers-style": (lambda: HelperResidualStack(), lambda: (torch.randn(3, 5, 16),), {}),
}

# name -> (build model, inputs of (batch, length), example kwargs): models revert and export
SIZED_CASES = {
    "encoder-batch-first": (lambda: encoder(3, batch_first=True, dropout=0.1),
                            lambda b, t: (torch.randn(b, t, 32),), {}),
    "encoder-seq-first": (lambda: encoder(3, batch_first=False, dropout=0.1),
                          lambda b, t: (torch.randn(t, b, 32),), {}),
    "tiny-gpt": (lambda: TinyGPT(dropout=0.1), lambda b, t: (torch.randint(0, 50, (b, t)),), {}),
    "gpt2": (lambda: gpt2(3), lambda b, t: (torch.randint(0, 64, (b, t)),), {"use_cache": False}),
    "vit": (lambda: vit(3), lambda b, t: (torch.randn(b, 1, 16, 16),), {}),
    "t5": (lambda: t5(3), lambda b, t: _t5_inputs(b, t), {"use_cache": False}),
    "parent-loop": (lambda: ParentLoopViT(), lambda b, t: (torch.randn(b, t, 8),), {}),
    "sequential-of-residual-wrappers": (lambda: residual_sequential(), lambda b, t: (torch.randn(b, t, 8),), {}),
    "flat-sequential-with-final-norm": (lambda: flat_sequential_lm(), lambda b, t: (torch.randint(0, 64, (b, t)),), {}),
    "layer-parts-x-transformers-style": (lambda: HelperResidualStack(), lambda b, t: (torch.randn(b, t, 16),), {}),
}


def _t5_inputs(batch: int, length: int) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask, decoder_input_ids (positional, as T5ForConditionalGeneration takes them;
    one length for both, so that export_onnx finds the decoder's sequence axis too)."""
    return (torch.randint(1, 64, (batch, length)), torch.ones(batch, length, dtype=torch.long),
            torch.randint(1, 64, (batch, length)))


def logits(out):
    """The tensor a model output's loss is taken of: HF ``.logits``, else the output itself."""
    return out.logits if hasattr(out, "logits") else out


def mean_square_loss(out):
    return logits(out).pow(2).mean()


def grads(model, args, kwargs, seed, loss_of=mean_square_loss, extra=()):
    """One training-mode forward from ``seed`` and the gradients of its loss (parameters, then ``extra``)."""
    model.train()
    torch.manual_seed(seed)
    loss = loss_of(model(*args, **kwargs))
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, [*params, *extra])


def assert_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def train_a_few_steps(conv, make_inputs, kwargs, steps=3):
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    conv.train()
    for _ in range(steps):
        opt.zero_grad()
        logits(conv(*make_inputs(2, 8), **kwargs)).square().mean().backward()
        opt.step()


class FramesSeen(ChainObserver):
    """The frames of the chain calls made while observed."""

    def __init__(self):
        self.frames = []

    def forward_finished(self, frame):
        self.frames.append(frame)
