"""run_all.sh: its help, its refusals, notebook selection and where smoke outputs go."""

import os
import subprocess
from pathlib import Path

import pytest
from notebook_checks import reproducible_env

REPO = Path(__file__).resolve().parent.parent


def run_all(*args, env=None, check=False):
    """run_all.sh with the threads and code paths that make its runs' numbers the same on any machine."""
    return subprocess.run([str(REPO / "run_all.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **reproducible_env(), **(env or {})}, timeout=600, check=check)


def test_help_explains_profiles_selection_and_overrides():
    out = run_all("--help", check=True).stdout
    for word in ("--profile", "smoke", "quick", "paper", "-p NAME VALUE", "NOTEBOOK", "Exit status"):
        assert word in out


@pytest.mark.parametrize("args, message", [
    (["--profile", "fast"], "--profile must be smoke, quick or paper"),
    (["--bogus"], "unknown option"),
    (["99_none"], "no notebook matches"),
    (["-p", "epochs"], "-p needs NAME and VALUE"),
    (["--jobs", "0"], "--jobs needs a positive whole number"),
    (["--threads", "two"], "--threads needs a positive whole number"),
    (["--executor", "ray"], "--executor must be local or slurm"),
    (["--slurm", "partition"], "--slurm needs KEY=VALUE"),
])
def test_bad_arguments_are_refused_with_a_reason(args, message):
    result = run_all(*args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
def test_smoke_run_of_one_notebook_reports_a_table_and_keeps_outputs_out_of_the_repo(tmp_path):
    nb = sorted((REPO / "notebooks").glob("00_*.ipynb"))[0]
    before = nb.read_bytes()
    result = run_all("--profile", "smoke", "00", env={"LOSSGRAD_RUNS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "00_quadratic_theory" in result.stdout and " ok " in result.stdout
    assert (tmp_path / "smoke" / "notebooks" / nb.name).exists()
    assert (tmp_path / "smoke" / "figures").iterdir()
    assert nb.read_bytes() == before


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
def test_parallel_smoke_run_streams_per_run_progress_without_kernel_warnings(tmp_path):
    """--jobs 2: a line per run event in the terminal (run, epoch, metric, runs done, ETA); the kernel
    talks over IPC, so no 'running over TCP without encryption' warning."""
    result = run_all("--profile", "smoke", "--jobs", "2", "04", env={"LOSSGRAD_RUNS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "04_fmnist_autoencoder: 8 runs, 0 stored, 8 to train (2 worker processes, 1 torch thread(s) each)" in out
    assert "LOSSGRAD-seed0: epoch 2/2, test_loss" in out and "ETA" in out
    assert "L4-seed0: done  [runs" in out
    assert "TCP" not in out and "Warning" not in out
    stored = {p.stem for p in (tmp_path / "smoke" / "04_fmnist_autoencoder").glob("*.pt")}
    assert {"LOSSGRAD-seed0", "L4-seed0", "SGD_lr=2-seed0", "WNGrad-seed0"} <= stored


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
def test_a_failing_notebook_gives_a_non_zero_exit_and_the_table_says_so(tmp_path):
    result = run_all("--profile", "smoke", "-p", "no_such_setting", "1", "00", env={"LOSSGRAD_RUNS": str(tmp_path)})
    assert result.returncode == 1
    assert "FAILED" in result.stdout and (tmp_path / "custom" / "logs").exists()
