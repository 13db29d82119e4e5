#!/usr/bin/env bash
# Runs the test suite (set-up included). Extra arguments go to pytest, e.g. ./run_tests.sh -k lossgrad
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/tools/env.sh"
ensure_env
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the tests' models are tiny: one thread each is fastest
exec "$PY" -m pytest "$@"
