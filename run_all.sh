#!/usr/bin/env bash
# Executes the companion's numbered notebooks headlessly with papermill. ./run_all.sh --help
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/tools/env.sh"
set +e  # go on past a failing notebook

usage() {
  cat <<'EOF'
Usage: ./run_all.sh [--profile smoke|quick|paper] [-p NAME VALUE]... [--jobs N] [--threads N]
                   [--executor local|slurm] [--slurm KEY=VALUE]... [NOTEBOOK...]

Executes the numbered notebooks in notebooks/ in order with papermill, headless, and ends with a
table (notebook, status, minutes, outputs). Set-up is automatic: the first run creates .venv,
installs requirements.txt; the notebooks run on its own kernel, python3.

Profiles (each notebook's "parameters" cell takes `profile`; the cell after it says what it changes):
  smoke   synthetic stand-in data, tiny sizes, CPU, seconds per notebook (what the tests run)
  quick   real data, fewer epochs and seeds: a laptop CPU in about an hour for what it can get
  paper   the paper's settings; meant for a GPU
  Default: paper when CUDA is available, else quick.

NOTEBOOK   a number or name prefix (03, 04_fmnist); default: every notebook.
-p NAME VALUE
           change one setting on top of the profile (VALUE is read as YAML: 5, 1e-3, [1, 2]);
           such runs go to runs/custom/, never over real results.

Execution (not part of any run's identity: the same runs, the same numbers):
--jobs N   train N runs at once in worker processes. Default: one per GPU, 1 on a CPU.
--threads N
           torch threads per worker. Default: the free cores shared out (cores // jobs), so
           that workers never add up to more threads than cores (oversubscribed, a step can be
           100x slower: benchmarks/threads.py).
--executor slurm --slurm KEY=VALUE...
           one SLURM job per run through submitit, e.g. --slurm slurm_partition=gpu
           --slurm timeout_min=240 --slurm gpus_per_node=1 (any submitit parameter). The
           run store (LOSSGRAD_RUNS, default runs/) must be on a filesystem the nodes share.
Progress: one line per run and epoch (latest test metric, runs done, ETA) in the terminal.

Outputs:
  paper   figures and tables in figures/, the executed notebook in place in notebooks/
  quick   figures, tables and executed notebooks in figures/quick/
  smoke   runs/smoke/ (figures/ and notebooks/ are left untouched)
  Per-run results: runs/<profile>/<notebook>/; a rerun skips finished runs, and a killed run
  resumes from its last epoch. Logs: runs/<profile>/logs/.
Exit status: 0 when every notebook ran, 1 when any failed.
EOF
}

profile="" ; overrides=() ; selected=() ; slurm=()
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 needs a positive whole number, got '$2'" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) [ $# -ge 2 ] || { echo "error: --jobs needs a number" >&2; exit 2; }
            positive --jobs "$2"; export LOSSGRAD_JOBS="$2"; shift 2 ;;
    --threads) [ $# -ge 2 ] || { echo "error: --threads needs a number" >&2; exit 2; }
               positive --threads "$2"; export LOSSGRAD_THREADS="$2"; shift 2 ;;
    --executor) [ $# -ge 2 ] || { echo "error: --executor needs local or slurm" >&2; exit 2; }
                case "$2" in local|slurm) export LOSSGRAD_EXECUTOR="$2" ;;
                  *) echo "error: --executor must be local or slurm, got '$2'" >&2; exit 2 ;; esac
                shift 2 ;;
    --slurm) [ $# -ge 2 ] && [[ "$2" == *=* ]] || { echo "error: --slurm needs KEY=VALUE, e.g. --slurm timeout_min=240" >&2; exit 2; }
             slurm+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --profile) [ $# -ge 2 ] || { echo "error: --profile needs a value (smoke, quick or paper)" >&2; exit 2; }
               profile="$2"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    -p) [ $# -ge 3 ] || { echo "error: -p needs NAME and VALUE, e.g. -p epochs 5" >&2; exit 2; }
        overrides+=("$2: $3"); shift 3 ;;
    -*) echo "error: unknown option $1 (see ./run_all.sh --help)" >&2; exit 2 ;;
    *) selected+=("$1"); shift ;;
  esac
done

ensure_env || exit 1
cd "$REPO"

if [ -z "$profile" ]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    profile=paper; echo "profile: paper (CUDA is available; --profile quick for the short version)"
  else
    profile=quick; echo "profile: quick (no CUDA here; --profile paper runs the paper's settings on the CPU, slowly)"
  fi
fi
case "$profile" in smoke|quick|paper) ;; *) echo "error: --profile must be smoke, quick or paper, got '$profile'" >&2; exit 2 ;; esac

notebooks=()
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  [ -e "$nb" ] || continue
  name="$(basename "$nb" .ipynb)"
  if [ ${#selected[@]} -eq 0 ]; then notebooks+=("$nb"); continue; fi
  for s in "${selected[@]}"; do
    case "$name" in "$s"*) notebooks+=("$nb"); break ;; esac
  done
done
if [ ${#notebooks[@]} -eq 0 ]; then
  echo "error: no notebook matches '${selected[*]:-}'; available: $(ls notebooks/[0-9][0-9]_*.ipynb 2>/dev/null | xargs -n1 basename | tr '\n' ' ')" >&2
  exit 2
fi

if [ "$profile" = smoke ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: one thread is faster and shares the machine well
  export LOSSGRAD_THREADS="${LOSSGRAD_THREADS:-1}"
fi
if [ ${#slurm[@]} -gt 0 ]; then
  export LOSSGRAD_SLURM="$(printf '%s\n' "${slurm[@]}")"  # one per line: a value may hold commas
  [ "${LOSSGRAD_EXECUTOR:-}" = slurm ] || echo "note: --slurm options apply with --executor slurm" >&2
fi

yaml="overrides: {}"
tag="$profile"
if [ ${#overrides[@]} -gt 0 ]; then
  yaml="overrides: {$(IFS=,; echo "${overrides[*]}")}"
  tag=custom
fi
runs="${LOSSGRAD_RUNS:-$REPO/runs}/$tag"
mkdir -p "$runs/notebooks" "$runs/logs"

rows=() ; failed=0 ; i=0
for nb in "${notebooks[@]}"; do
  i=$((i + 1)); name="$(basename "$nb" .ipynb)"
  executed="$runs/notebooks/$name.ipynb" ; log="$runs/logs/$name.log"
  echo "[$i/${#notebooks[@]}] $name (profile $profile${overrides:+, overrides: ${overrides[*]}})"
  start=$(date +%s)
  progress="$runs/logs/$name.progress" ; : > "$progress"
  tail -n +1 -F "$progress" 2>/dev/null &   # the runs' progress lines, as the kernel writes them
  follower=$!
  trap 'kill "$follower" 2>/dev/null' EXIT  # Ctrl-C too: no tail left printing
  LOSSGRAD_PROGRESS_FILE="$progress" "$PY" tools/execute_notebook.py "$nb" "$executed" --cwd notebooks \
      --kernel python3 --parameters "{profile: $profile, $yaml}" --no-progress-bar 2> >(tee "$log" >&2)
  status=$?
  sleep 0.3; kill "$follower" 2>/dev/null; wait "$follower" 2>/dev/null
  minutes=$(awk -v s="$(( $(date +%s) - start ))" 'BEGIN { printf "%.1f", s / 60 }')
  where="$executed"
  if [ $status -eq 0 ] && [ "$tag" = paper ]; then
    cp "$executed" "$nb" && "$PY" tools/tidy_notebook.py "$nb" >/dev/null; where="$nb, figures/"
  elif [ $status -eq 0 ] && [ "$tag" = quick ]; then
    mkdir -p figures/quick; cp "$executed" "figures/quick/$name.ipynb"; where="figures/quick/"
  fi
  if [ $status -eq 0 ]; then state=ok; else state=FAILED; failed=1; where="$executed (log: $log)"; fi
  rows+=("$name|$state|$minutes|$where")
done

echo
printf '%-28s %-7s %8s  %s\n' notebook status minutes outputs
for row in "${rows[@]}"; do
  IFS='|' read -r a b c d <<<"$row"
  printf '%-28s %-7s %8s  %s\n' "$a" "$b" "$c" "$d"
done
exit $failed
