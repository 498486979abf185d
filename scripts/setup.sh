#!/usr/bin/env bash
# Create or refresh the project-local virtual environment (idempotent) and install every package
# editable, plus the dev group. Torch: an importable torch is kept; otherwise the CPU build 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LATENTFORGE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    # Keep the torch the machine already has (a GPU user's CUDA build, for instance).
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

stamp="$VENV/.latentforge-installed"
want=$(cat pyproject.toml packages/*/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  # On this kind of machine the CPU wheel lies on local disk; a bare `torch` would pull CUDA.
  pip_install "torch==2.13.0" || pip_install torch
fi
# torchvision only for peers in tests (pytorch-fid, lpips, torch-fidelity): match the torch minor.
tv=$("$VPY" -c "import torch; v=torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1])+15}.*')")
dev=$("$VPY" - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["dependency-groups"]["dev"]))
PY
)
mapfile -t dev_reqs <<<"$dev"
pip_install "torchvision==$tv" "${dev_reqs[@]}" editables
pip_install --no-build-isolation --no-deps \
  -e packages/core -e packages/encoders -e packages/tokenizers \
  -e packages/generators -e packages/metrics -e packages/runner
# Runtime dependencies of the packages themselves (resolved once, torch already satisfied).
pip_install --no-build-isolation \
  -e packages/core -e packages/encoders -e "packages/tokenizers[faiss]" \
  -e packages/generators -e packages/metrics -e "packages/runner[tensorboard]"
echo "$want" > "$stamp"
