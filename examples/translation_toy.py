"""An encoder–decoder transformer on a generated toy translation task: plain vs bdia_fx, paired seeds.

The source language is English-like (determiner, adjectives, noun, verb, object); the target is
a rule-based invented language: every word has a fixed translation, adjectives follow their
noun, the verb moves to the end (subject–object–verb) and plural nouns take a suffix word. The
model is ``nn.Transformer(norm_first=True)``: two chains for bdia_fx, the encoder and the decoder
(whose blocks read the encoder memory and the masks as side inputs). Reported: exact-match rate
and corpus BLEU-4 of greedy translations of held-out sentences, by the reverted model.

    python examples/translation_toy.py            # 3 seeds x 250 steps, about 4 minutes on 2 CPU cores
    python examples/translation_toy.py --quick    # smoke test: 2 seeds x 20 steps
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import bdia_fx
from bdia_fx.report import write_json

from paired import VARIANTS, PairedDifference, make_variant, plot_curves

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<s>", "</s>"]
DETERMINERS = {"the": "ka", "a": "mi", "every": "tosu", "this": "ren"}
ADJECTIVES = {"red": "vola", "small": "pik", "old": "sena", "quick": "tari", "green": "muna", "happy": "lesi"}
NOUNS = {"cat": "neko", "dog": "inu", "bird": "tori", "child": "ko", "farmer": "nomin", "river": "kawa",
         "tree": "ki", "teacher": "sensi"}
VERBS = {"sees": "miru", "likes": "suki", "follows": "ato", "helps": "tasu", "finds": "mitsu", "paints": "kaku"}
PLURAL = "ra"


def phrase(rng: random.Random) -> tuple[list[str], list[str]]:
    """A noun phrase and its translation: det adj* noun[s] -> det noun [ra] adj*."""
    det = rng.choice(list(DETERMINERS))
    adjectives = rng.sample(list(ADJECTIVES), rng.randint(0, 2))
    noun = rng.choice(list(NOUNS))
    plural = det == "the" and rng.random() < 0.4
    source = [det, *adjectives, noun + ("s" if plural else "")]
    target = [DETERMINERS[det], NOUNS[noun], *([PLURAL] if plural else []), *(ADJECTIVES[a] for a in adjectives)]
    return source, target


def sentence(rng: random.Random) -> tuple[str, str]:
    (subject, subject_t), (obj, obj_t) = phrase(rng), phrase(rng)
    verb = rng.choice(list(VERBS))
    return " ".join([*subject, verb, *obj]), " ".join([*subject_t, *obj_t, VERBS[verb]])


def make_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    unique: dict[str, str] = {}
    while len(unique) < count:
        source, target = sentence(rng)
        unique[source] = target
    return list(unique.items())


class Vocabulary:
    def __init__(self, sentences: list[str]):
        self.words = SPECIALS + sorted({w for s in sentences for w in s.split()})
        self.index = {w: i for i, w in enumerate(self.words)}

    def encode(self, sentences: list[str], length: int) -> torch.Tensor:
        rows = [[BOS, *(self.index[w] for w in s.split()), EOS] for s in sentences]
        return torch.tensor([row + [PAD] * (length - len(row)) for row in rows])

    def decode(self, ids: list[int]) -> str:
        words = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.words[i])
        return " ".join(words)


class Translator(nn.Module):
    """Embeddings + ``nn.Transformer`` (pre-LN, batch first) + output head."""

    def __init__(self, source_vocab: int, target_vocab: int, width: int, layers: int, max_len: int = 32):
        super().__init__()
        self.source_embedding = nn.Embedding(source_vocab, width, padding_idx=PAD)
        self.target_embedding = nn.Embedding(target_vocab, width, padding_idx=PAD)
        self.position = nn.Embedding(max_len, width)
        self.transformer = nn.Transformer(width, 4, layers, layers, 2 * width, dropout=0.1, batch_first=True,
                                          norm_first=True)
        self.head = nn.Linear(width, target_vocab)

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        positions_s = torch.arange(source.shape[1], device=source.device)
        positions_t = torch.arange(target_in.shape[1], device=source.device)
        causal = nn.Transformer.generate_square_subsequent_mask(target_in.shape[1], device=source.device)
        out = self.transformer(
            self.source_embedding(source) + self.position(positions_s),
            self.target_embedding(target_in) + self.position(positions_t),
            tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=source == PAD,
            memory_key_padding_mask=source == PAD)
        return self.head(out)


@torch.no_grad()
def translate(model: nn.Module, source: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy decoding, one token at a time."""
    model.eval()
    out = torch.full((source.shape[0], 1), BOS)
    for _ in range(length - 1):
        next_token = model(source, out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, next_token], 1)
    return out


def corpus_bleu(references: list[str], hypotheses: list[str], order: int = 4) -> float:
    """Corpus BLEU-n (uniform weights, brevity penalty), in [0, 1]."""
    matches, totals = [0] * order, [0] * order
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = ref.split(), hyp.split()
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for n in range(1, order + 1):
            h_grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return brevity * math.exp(log_precision)


def evaluate(model: nn.Module, source: torch.Tensor, references: list[str], vocab: Vocabulary,
             length: int) -> tuple[float, float]:
    hypotheses = [vocab.decode(row) for row in translate(model, source, length).tolist()]
    exact = sum(h == r for h, r in zip(hypotheses, references)) / len(references)
    return exact, corpus_bleu(references, hypotheses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds x 20 steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=Path("results/translation_toy"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every = 2, 20, 10
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(6000)
    train_pairs, test_pairs = pairs[:5500], pairs[5500:]
    source_vocab = Vocabulary([s for s, _ in pairs])
    target_vocab = Vocabulary([t for _, t in pairs])
    length = 2 + max(max(len(s.split()), len(t.split())) for s, t in pairs)
    src_train = source_vocab.encode([s for s, _ in train_pairs], length)
    tgt_train = target_vocab.encode([t for _, t in train_pairs], length)
    src_test = source_vocab.encode([s for s, _ in test_pairs], length)
    references = [t for _, t in test_pairs]
    print(f"toy translation: {len(train_pairs)} training / {len(test_pairs)} held-out sentence pairs, e.g.\n"
          f"  {train_pairs[0][0]!r} -> {train_pairs[0][1]!r}\n"
          f"nn.Transformer {args.layers}+{args.layers} blocks, width {args.width}; {args.seeds} seeds x {args.steps} "
          "steps, plain vs BDIA (paired)")

    runs = []
    with tqdm(total=args.seeds * len(VARIANTS) * args.steps, unit="step") as progress:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            initial = Translator(len(source_vocab.words), len(target_vocab.words), args.width, args.layers)
            order = torch.randint(0, len(src_train), (args.steps, args.batch),
                                  generator=torch.Generator().manual_seed(seed))
            run = {}
            for name in VARIANTS:
                model = make_variant(name, initial, (src_train[:2], tgt_train[:2, :-1]))
                optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
                schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps,
                                                               pct_start=0.1)
                torch.manual_seed(seed + 1000)
                curve = []
                for step, index in enumerate(order, 1):
                    model.train()
                    logits = model(src_train[index], tgt_train[index, :-1])
                    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt_train[index, 1:].flatten(),
                                                       ignore_index=PAD)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    if step % args.eval_every == 0 or step == args.steps:
                        curve.append(evaluate(model, src_test[:200], references[:200], target_vocab, length)[0])
                        progress.set_postfix(seed=seed, variant=name, exact=f"{curve[-1]:.2f}")
                    progress.update()
                reverted = bdia_fx.revert(model) if name == "bdia" else model
                exact, bleu = evaluate(reverted, src_test, references, target_vocab, length)
                run[name] = {"curve": curve, "exact": exact, "bleu": bleu}
            runs.append(run)

    exact = PairedDifference("held-out exact match", [r["plain"]["exact"] for r in runs],
                             [r["bdia"]["exact"] for r in runs])
    bleu = PairedDifference("held-out BLEU-4", [r["plain"]["bleu"] for r in runs], [r["bdia"]["bleu"] for r in runs])
    print()
    print(exact.summary(100, " %", " pp", digits=1))
    print(bleu.summary(100))
    plot_curves({name: [r[name]["curve"] for r in runs] for name in VARIANTS}, "exact match (200 held-out)",
                f"toy translation, {args.seeds} paired seeds", args.out / "exact_match.png",
                xlabel="training step", every=args.eval_every)
    write_json({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "exact_match": exact.as_dict(), "bleu": bleu.as_dict(),
                "curves": {name: [r[name]["curve"] for r in runs] for name in VARIANTS}}, args.out / "results.json")
    print(f"wrote {args.out / 'exact_match.png'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
