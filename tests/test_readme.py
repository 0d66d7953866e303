"""Every command the README and the docs pages show runs: the bdia-inspect lines (docs/guide.md), the
README's Python snippet, the set-up commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = README + "".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
INSPECT_LINES = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", PAGES, re.S)
                 for line in block.splitlines() if line.startswith(".venv/bin/bdia-inspect")]

FACTORY = '''import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Model(nn.Module):
    def __init__(self, vocab=1000, d=32, layers=4):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model():
    return Model()
'''


def test_the_docs_show_inspect_commands():
    assert len(INSPECT_LINES) == 6


@pytest.mark.parametrize("command", INSPECT_LINES)
def test_each_bdia_inspect_command_of_the_readme_runs(command, tmp_path):
    """Run from a fresh directory; ``mypkg.models:make_model`` is a package there, imported from the
    current directory as ``python -m`` would."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(FACTORY)
    arguments = command.split()[1:]
    done = subprocess.run([str(Path(sys.executable).parent / "bdia-inspect"), *arguments], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BDIA chain report" in done.stdout
    if "--draw" in arguments:
        assert (tmp_path / "pictures" / "after.png").exists()


def test_the_python_snippet_of_the_readme_runs(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    (snippet,) = PYTHON_BLOCKS
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"torch": torch, "ids": torch.randint(0, 64, (2, 8)),
                 "model": GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                                                     bos_token_id=0, eos_token_id=0))}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / "gpt2.onnx").stat().st_size > 0
    assert type(namespace["plain"]) is GPT2LMHeadModel


def test_the_set_up_commands_are_the_demo_and_the_test_suite():
    setup = BASH_BLOCKS[0]
    assert "bash tools/dev.sh demo" in setup and "bash tools/dev.sh test" in setup
    dev = (ROOT / "tools" / "dev.sh").read_text()
    assert "demo) shift; exec .venv/bin/python examples/vit_digits.py --quick" in dev  # run by tests/examples
    assert "test) shift; exec .venv/bin/python -m pytest" in dev
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("bash tools/dev.sh test")
