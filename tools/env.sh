# Sourced by run_all.sh and run_tests.sh: makes the virtual environment on first use and installs the
# pinned requirements when requirements.txt changed. The Jupyter kernel is the environment's own "python3"
# (ipykernel installs it): the name the notebooks give, so a JupyterLab started from the environment
# (.venv/bin/jupyter lab notebooks/) opens them with it, and run_all.sh runs them with it.
# LOSSGRAD_VENV moves the environment (default: .venv in the repository).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOSSGRAD_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

ensure_env() {
  if [ ! -x "$PY" ]; then
    local base
    base="$(command -v python3 || command -v python || true)"
    if [ -z "$base" ]; then
      echo "error: no python3 found; install Python 3.10 or newer" >&2; return 1
    fi
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
      echo "error: $base is Python $("$base" -c 'import sys; print(sys.version.split()[0])'); 3.10 or newer is needed" >&2; return 1; }
    echo "setting up: creating the virtual environment $VENV" >&2
    "$base" -m venv "$VENV"
  fi
  local want have
  want="$(sha256sum "$REPO/requirements.txt" | cut -d' ' -f1)"
  have="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    echo "setting up: installing requirements.txt into $VENV (the first time takes a few minutes)" >&2
    "$PY" -m pip install --disable-pip-version-check -q -r "$REPO/requirements.txt" >&2
    echo "$want" > "$VENV/.requirements.sha256"
  fi
  # Earlier versions of this script registered the same Python a second time, as "lossgrad-companion"
  # ("Python (lossgrad companion)"); no notebook names it, and JupyterLab's launcher would offer two kernels.
  if [ -f "$VENV/share/jupyter/kernels/lossgrad-companion/kernel.json" ]; then
    rm -rf "$VENV/share/jupyter/kernels/lossgrad-companion"
  fi
}
