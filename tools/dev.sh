#!/usr/bin/env bash
# Set up (or reuse) .venv and run the demo or the tests.
#   bash tools/dev.sh demo   # convert a small GPT-2, train a few steps, print report and memory
#   bash tools/dev.sh test   # the test suite
# The torch==2.13.0 CPU wheel is installed first so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bdia-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,hf,onnx,examples]"
  touch "$stamp"
fi
case "${1:-test}" in
  demo) shift; exec .venv/bin/python examples/gpt2_demo.py "$@" ;;
  test) shift; exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
