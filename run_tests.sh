#!/usr/bin/env bash
# Runs the test suite (set-up included): the fast tier by default, every tier with --all (as CI does).
#   ./run_tests.sh                 # the optimizer, the package, every notebook in the smoke profile
#   ./run_tests.sh --all           # also the slow tier: real loaders at quick/paper scale, JupyterLab in a browser,
#                                  # the executed notebooks' outputs, worker processes and run_all.sh end to end
# Other arguments go to pytest, e.g. ./run_tests.sh -k lossgrad
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/tools/env.sh"
args=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then args+=(--all-tiers); else args+=("$arg"); fi
done
ensure_env
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the tests' models are tiny: one thread each is fastest
exec "$PY" -m pytest ${args[@]+"${args[@]}"}
