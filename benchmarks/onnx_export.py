"""ONNX export of a converted GPT-2: export time, file size, onnxruntime vs PyTorch eval latency.

A GPT-2 config (default 12 layers, n_embd 256, 4 heads) is converted, trained one step with
BDIA, then exported with ``bdia_fx.export_onnx`` (plain and quantized γ = 0 graph). Latency is
the median of ``--repeats`` eval forwards of batch × tokens, PyTorch (no grad) and onnxruntime
interleaved in this one process, after one warm-up each. The table also gives how many logits
differ by more than 1e-4 between onnxruntime and PyTorch and, for scale, the largest change the
quantization nodes themselves make to the logits (quantized vs unquantized PyTorch).

    python benchmarks/onnx_export.py [--layers 12] [--embd 256] [--batch 8] [--tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bdia_fx
from bdia_fx.report import write_json


def build(layers: int, embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=embd, n_head=4, vocab_size=1024, n_positions=256,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def measure(args: argparse.Namespace) -> list[dict]:
    import onnxruntime

    model = build(args.layers, args.embd)
    ids = torch.randint(0, 1024, (args.batch, args.tokens))
    conv = bdia_fx.convert(model, (ids[:2, :16],), {"use_cache": False})
    conv.train()
    conv(ids[:2, :16], labels=ids[:2, :16], use_cache=False).loss.backward()
    unquantized = bdia_fx.revert(conv).eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for quantize in (False, True):
            path = Path(folder) / f"gpt2_q{int(quantize)}.onnx"
            result = bdia_fx.export_onnx(conv, path, (ids[:2, :16],), {"use_cache": False}, quantize=quantize)
            reference = bdia_fx.revert(conv, quantize=quantize).eval()
            with torch.no_grad():  # how much the quantization nodes themselves move the logits
                effect = (reference(ids, use_cache=False).logits - unquantized(ids, use_cache=False).logits).abs().max()
            check = bdia_fx.verify_onnx(path, reference, (ids,), {"use_cache": False}, max_mismatch=1.0)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {"input_ids": ids.numpy()}
            torch_times, ort_times = [], []
            with torch.no_grad():
                reference(ids, use_cache=False)
                session.run(None, feed)
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    reference(ids, use_cache=False)
                    torch_times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    session.run(None, feed)
                    ort_times.append(time.perf_counter() - start)
            torch_ms, ort_ms = 1e3 * statistics.median(torch_times), 1e3 * statistics.median(ort_times)
            rows.append({"quantize": quantize, "export_s": result.export_seconds, "file_mib": result.file_bytes / 2**20,
                         "max_abs_diff": check.max_abs_diff, "mismatched": check.mismatched, "elements": check.total,
                         "quantization_effect": float(effect),
                         "torch_ms": torch_ms, "ort_ms": ort_ms, "ort_over_torch": ort_ms / torch_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = measure(args)
    print(f"GPT-2 {args.layers} layers, n_embd {args.embd}; latency: batch {args.batch} x {args.tokens} tokens, "
          f"median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'graph':10} {'export s':>9} {'file MiB':>9} {'max|diff|':>10} {'>1e-4':>9} {'Q effect':>9} "
          f"{'torch ms':>9} "
          f"{'ort ms':>8} {'ort/torch':>9}")
    for r in rows:
        print(f"{'quantized' if r['quantize'] else 'plain':10} {r['export_s']:9.1f} {r['file_mib']:9.2f} "
              f"{r['max_abs_diff']:10.2e} {r['mismatched']:>9} {r['quantization_effect']:9.2e} "
              f"{r['torch_ms']:9.1f} {r['ort_ms']:8.1f} "
              f"{r['ort_over_torch']:9.2f}")
    if args.json:
        write_json({"config": vars(args) | {"json": str(args.json)}, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
