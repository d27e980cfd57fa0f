#!/usr/bin/env bash
# One entry point for a fresh Linux machine with Python 3.11+.
#   bash run.sh        set up, then execute the notebook headless (outputs land in outputs/)
#   bash run.sh test   set up, then run the test suite and the notebook in smoke mode
# Setting up makes .venv/ and installs requirements.txt. torch is installed only when missing,
# and then as the CPU build: a plain `pip install torch` would pull several GB of CUDA.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  if ! python -c "import torch" 2>/dev/null; then
    pip install --retries 1 --timeout 20 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
      || pip install "torch==2.13.0"
  fi
  pip install --quiet -r requirements.txt
  python -m ipykernel install --sys-prefix --name python3 >/dev/null
}

case "${1:-run}" in
  run)
    setup
    mkdir -p outputs
    python -m papermill SLM_movie_scripts.ipynb outputs/SLM_movie_scripts.ipynb -p OUT_DIR outputs
    echo "Executed notebook, figures and checkpoints are in outputs/"
    ;;
  test)
    setup
    SLM_SMOKE=1 python -m pytest -q tests SLM_movie_scripts.ipynb --nbval-lax
    ;;
  *)
    echo "usage: bash run.sh [run|test]" >&2
    exit 2
    ;;
esac
