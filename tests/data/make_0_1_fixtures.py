"""Writes tests/data/bdia_fx_0_1/: what a user saved with bdia_fx 0.1 (commit 7536aa5).

Run it with bdia_fx 0.1 importable (an old checkout on PYTHONPATH, its passes/ and tools/ linked as
bdia_fx/passes and bdia_fx/tools) and that checkout's tests/ on PYTHONPATH for ``models``:
``PYTHONPATH=old:old/tests python tests/data/make_0_1_fixtures.py tests/data/bdia_fx_0_1``.
"""

import pathlib
import sys

import torch

import bdia_fx

from models import TinyGPT, gpt2

out = pathlib.Path(sys.argv[1])
torch.manual_seed(0)
ids = torch.randint(0, 50, (2, 8))

model = TinyGPT(vocab=50, d=16, heads=2, layers=2, max_len=16)
conv = bdia_fx.convert(model, (ids,))
conv.train()
torch.nn.functional.cross_entropy(conv(ids).flatten(0, 1), ids.flatten()).backward()
conv.eval()
with torch.no_grad():
    converted_eval = conv(ids)
    reverted_eval = bdia_fx.revert(conv)(ids)
torch.save({"state_dict": conv.state_dict(), "ids": ids, "converted_eval": converted_eval,
            "reverted_eval": reverted_eval}, out / "tinygpt_state_dict.pt")
torch.save(conv, out / "tinygpt_converted_whole.pt")
torch.save(bdia_fx.pam(TinyGPT(vocab=50, d=16, heads=2, layers=2, max_len=16)), out / "tinygpt_pam_whole.pt")

hf = gpt2(layers=2, d=16, dropout=0.0)
hf_ids = torch.randint(0, 64, (2, 8))
hf_conv = bdia_fx.convert(hf, (hf_ids,))
hf_conv.save_pretrained(out / "gpt2_converted_save_pretrained")
hf_conv.eval()
with torch.no_grad():
    torch.save({"ids": hf_ids, "reverted_eval": bdia_fx.revert(hf_conv)(hf_ids, use_cache=False).logits},
               out / "gpt2_outputs.pt")
print(bdia_fx.__file__, "->", out)
