"""Small models used across the tests (built from configs, no downloads)."""

from __future__ import annotations

import random

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """The smallest pre-LN residual block: x + lin(ln(x))."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.ln(x))


class PythonRandomBlock(ResidualMLP):
    """Draws from Python's ``random``, which torch.utils.checkpoint does not replay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.ln(x)) * (1.0 + 0.1 * random.random())


class Stack(nn.Module):
    """Blocks in a ModuleList called in a loop on the stream."""

    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class PreLNBlock(nn.Module):
    """A hand-written pre-LN GPT block: x + attn(ln1 x), then + mlp(ln2 x)."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, K pre-LN blocks taking a causal mask, final LN and head."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 4, max_len: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(PreLNBlock(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = torch.triu(torch.full((t, t), float("-inf"), device=ids.device), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def encoder(layers: int = 4, d: int = 32, batch_first: bool = True, norm_first: bool = True,
            dropout: float = 0.0) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def gpt2(layers: int = 3, d: int = 32, dropout: float = 0.1):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=64, n_positions=64,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def vit(layers: int = 3, d: int = 32):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=d, num_hidden_layers=layers,
                    num_attention_heads=4, intermediate_size=2 * d, num_labels=10)
    return ViTForImageClassification(cfg)


def bert(layers: int = 2, d: int = 32):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=64, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=2 * d, max_position_embeddings=64))


def llama(layers: int = 3, d: int = 32):
    """Rotary embeddings (cos/sin side inputs), grouped-query attention, RMSNorm."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def neox(layers: int = 3, d: int = 32):
    """Parallel residual blocks (x + attn(ln1 x) + mlp(ln2 x)) with rotary embeddings and dropout."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=d, intermediate_size=2 * d,
                                            num_hidden_layers=layers,
                                            num_attention_heads=4, max_position_embeddings=64,
                                            use_parallel_residual=True, hidden_dropout=0.1))


def opt(layers: int = 3, d: int = 32):
    """The MLP residual add runs on the stream reshaped to (tokens, d) and is viewed back after."""
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=d, ffn_dim=2 * d, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=d,
                                    dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=1))


def gptj(layers: int = 3, d: int = 32):
    """Parallel residual blocks that also return their attention weights (unused by the parent)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=d, n_layer=layers, n_head=4, n_positions=64,
                                      rotary_dim=4, resid_pdrop=0.1, bos_token_id=0, eos_token_id=0))


def t5(layers: int = 3, d: int = 32):
    """Encoder–decoder; block 0 of each stack computes the relative position bias the later blocks
    share (eager attention: torch.onnx cannot export HF T5's sdpa path, plain or converted)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=layers, num_decoder_layers=layers,
                   num_heads=4, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return T5ForConditionalGeneration(cfg)


def swin(depths: tuple[int, ...] = (2, 2), attention: str = "sdpa"):
    """A hierarchical vision transformer: stages of residual blocks joined by patch merging
    (``attention="eager"``: the attention torch.onnx 2.13 can export; its SDPA path it cannot)."""
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16,
                                                 depths=list(depths), num_heads=[2, 4, 8][:len(depths)],
                                                 window_size=4, num_labels=5, drop_path_rate=0.1,
                                                 attn_implementation=attention))


class PreAndPostLN(nn.Module):
    """A pre-LN encoder stack (convertible) feeding a post-LN one (refused: LN after the add)."""

    def __init__(self, layers: int = 3, d: int = 32):
        super().__init__()
        self.pre, self.post = encoder(layers, d, dropout=0.1), encoder(layers, d, norm_first=False, dropout=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.pre(x))


class PreNorm(nn.Module):
    """x-transformers style: ``fn(LayerNorm(x))``, the residual add left to the caller."""

    def __init__(self, d: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(d), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, d: int, dropout: float = 0.1):
        super().__init__()
        self.attention = nn.MultiheadAttention(d, 4, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def feed_forward(d: int, dropout: float = 0.1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))


class ParentLoopViT(nn.Module):
    """Residual adds in the parent's loop over (attention, feed-forward) pairs: ``x = attn(x) + x``
    (or ``x + attn(x)`` with ``skip_first``); ``scale_skip`` (set after conversion) changes the loop."""

    def __init__(self, depth: int = 3, d: int = 32, skip_first: bool = False):
        super().__init__()
        self.skip_first, self.scale_skip = skip_first, 1.0
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList(nn.ModuleList([PreNorm(d, SelfAttention(d)), PreNorm(d, feed_forward(d))])
                                    for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.embed(rows)
        for attention, ff in self.layers:
            for branch in (attention, ff):
                skip = x if self.scale_skip == 1.0 else x * self.scale_skip
                x = skip + branch(x) if self.skip_first else branch(x) + skip
        return self.head(x.mean(1))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def residual_sequential(depth: int = 3, d: int = 32) -> nn.Sequential:
    """An ``nn.Sequential`` of residual wrappers, attention and feed-forward alternating."""
    wrappers = [Residual(PreNorm(d, module)) for _ in range(depth)
                for module in (SelfAttention(d), feed_forward(d))]
    return nn.Sequential(nn.Linear(8, d), *wrappers)


class NanoGPTBlock(nn.Module):
    """nanoGPT's block: x + attn(ln_1 x), then + mlp(ln_2 x), causal attention by SDPA."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.c_attn(x).split(d, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                       is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def flat_sequential_lm(layers: int = 3, d: int = 32, vocab: int = 64) -> nn.Sequential:
    """A whole language model as one flat ``nn.Sequential``: embedding, blocks, final norm, head (as some
    packages write it: the final norm reads the last block's residual add, but is not a block)."""
    return nn.Sequential(nn.Embedding(vocab, d), *(NanoGPTBlock(d, 4) for _ in range(layers)), nn.LayerNorm(d),
                         nn.Linear(d, vocab))


class NanoGPT(nn.Module):
    """nanoGPT's model: token and position embeddings, a ModuleList ``h`` of blocks, ``ln_f``, a tied head."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 4, max_len: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.h = nn.ModuleList(NanoGPTBlock(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class TopKMoE(nn.Module):
    """A top-k mixture of experts that, as auxiliary-loss-free load balancing does, counts each expert's
    load and nudges a routing bias in its forward, under ``torch.no_grad()``."""

    def __init__(self, d: int, experts: int = 4, k: int = 2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.register_buffer("load", torch.zeros(experts))
        self.register_buffer("route_bias", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top = (logits + self.route_bias).topk(self.k, dim=-1).indices
        with torch.no_grad():
            load = torch.zeros_like(self.load).scatter_add_(0, top.flatten(), torch.ones(top.numel()))
            self.load += load
            self.route_bias += 0.01 * (load.mean() - load).sign()
        weights = torch.softmax(logits.gather(-1, top), dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * ((top == e).to(x.dtype) * weights).sum(-1, keepdim=True)
        return out


class MoEStack(nn.Module):
    """Pre-LN blocks x + moe(ln(x)) in a ModuleList."""

    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(_MoEBlock(d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _MoEBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.moe = nn.LayerNorm(d), TopKMoE(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.ln(x))


class ResidualHelper(nn.Module):
    """A residual add as its own module, called with the branch's output and the stream."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class HelperResidualStack(nn.Module):
    """x-transformers' layout: per layer a ModuleList [norms, branch, residual helper], and the parent's loop
    does ``x = residual(branch(norm(x)), x)``, so a layer is never called as one module. With ``sandwich``
    a second norm runs on the branch's output before the add (x-transformers' ``sandwich_norm``)."""

    def __init__(self, d: int = 16, layers: int = 3, sandwich: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d) if sandwich else None]),
                           feed_forward(d, dropout=0.0), ResidualHelper()])
            for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (norm, after), branch, residual in self.layers:
            out = branch(norm(x))
            x = residual(after(out) if after is not None else out, x)
        return x


class BlockWithAModuleArgument(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x, shared):
        return x + self.lin(self.ln(x)) + shared(x)  # a module passed in: its weight is outside the block


class SharedModuleStack(nn.Module):
    """x-transformers' relative position bias: one module the parent passes to every block."""

    def __init__(self, layers: int = 3, d: int = 16):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.layers = nn.ModuleList(BlockWithAModuleArgument(d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, self.shared)
        return x
