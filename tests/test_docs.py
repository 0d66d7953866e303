"""The documentation: a README a newcomer reads in three minutes, links that resolve, and an API
reference that names exactly the public API and builds from the docstrings without a warning."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bdia_fx
import bdia_fx.pam

from models import gpt2

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_PAGE = ROOT / "docs" / "api" / "index.rst"


def public_api() -> set[str]:
    """The public names, listed in one place each: the two front doors' ``__all__``."""
    top = {f"bdia_fx.{name}" for name in bdia_fx.__all__ if name != "pam"}
    return top | {f"bdia_fx.pam.{name}" for name in bdia_fx.pam.__all__}


def test_the_readme_is_at_most_10_kb():
    assert len(README.read_bytes()) <= 10 * 1024


def test_the_api_reference_names_exactly_the_public_api():
    documented = re.findall(r"^\.\. auto(?:function|class|exception|data):: (\S+)", API_PAGE.read_text(), re.M)
    assert len(documented) == len(set(documented))
    assert set(documented) == public_api()


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = [(page.name, target) for page in pages
              for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []


def test_the_readme_links_every_docs_page():
    readme = README.read_text()
    unlinked = [page.name for page in sorted((ROOT / "docs").glob("*.md")) if f"docs/{page.name}" not in readme]
    assert unlinked == []


@pytest.mark.slow
def test_the_api_reference_builds_with_the_readme_command(tmp_path):
    (command,) = re.findall(r"`(\.venv/bin/python -m sphinx [^`]+)`", README.read_text())
    arguments = shlex.split(command)[1:]
    assert arguments[:3] == ["-m", "sphinx", "-W"] and arguments[-2] == "docs/api"
    done = subprocess.run([sys.executable, *arguments[:-1], str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    html = (tmp_path / "index.html").read_text()
    assert all(f'id="{name}"' in html for name in public_api())


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, t, z):
        return self.net(z)


def test_the_python_snippets_of_the_pam_and_schemes_pages_run():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    (pam_snippet,) = _python_blocks("pam.md")
    namespace = {"model": gpt2(2), "ids": ids}
    exec(compile(pam_snippet, "docs/pam.md", "exec"), namespace)
    assert bdia_fx.pam.is_pam(namespace["everything"]) and bdia_fx.pam.report_of(namespace["pam_model"]).replaced

    odeint_snippet, scheme_snippet = _python_blocks("schemes.md")
    field = _Field().double()
    z0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    namespace = {"f": field, "z0": z0, "t": torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)}
    exec(compile(odeint_snippet, "docs/schemes.md", "exec"), namespace)
    assert z0.grad is not None and field.net[0].weight.grad is not None
    namespace = {"bdia_fx": bdia_fx, "model": gpt2(2), "ids": ids}
    exec(compile(scheme_snippet, "docs/schemes.md", "exec"), namespace)
    assert bdia_fx.is_converted(namespace["model"])
