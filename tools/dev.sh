#!/usr/bin/env bash
# Set up (or reuse) .venv and run the demo or the tests.
#   bash tools/dev.sh demo   # examples/vit_digits.py --quick: plain vs BDIA ViT on digits, memory, plots, ONNX
#   bash tools/dev.sh test   # the test suite, in 2 pytest-xdist workers of one torch thread each (BDIA_TEST_WORKERS)
# The torch==2.13.0 CPU wheel is installed first so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bdia-installed
zoo=benchmarks/zoo-requirements.txt  # third-party transformers, pinned; --no-deps (see the file)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$zoo" -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,hf,onnx,viz,examples,docs]"
  .venv/bin/python -m pip install -q --no-deps -r "$zoo"
  touch "$stamp"
fi
# graphviz's `dot` draws the pictures of `bdia-inspect --draw` (and its test); install it where we can.
if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q graphviz >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q graphviz >/dev/null; }
  else
    echo "note: graphviz (dot) not found; install it for bdia-inspect --draw (e.g. sudo apt-get install graphviz)" >&2
  fi
fi
case "${1:-test}" in
  demo) shift; exec .venv/bin/python examples/vit_digits.py --quick "$@" ;;
  test) shift; exec .venv/bin/python -m pytest -q -n "${BDIA_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
