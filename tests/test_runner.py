"""The runner (companion.runner): parallel workers, locks, crash isolation, the submitit executor, progress."""

import os
import threading
import time

import pytest
import torch
from torch import nn

import companion as C
from companion import runner
from companion.train import Classification, Experiment

# This module is importable by the workers (pytest puts tests/ on the path, the runner passes its path on),
# so cloudpickle ships its functions by reference; a notebook's go by value: see notebook_function().


def small_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))


class FailingTask(Classification):
    """Cross entropy, except in the runs of seed 1, which raise (a bug that hits one run)."""

    def loss_and_step_metrics(self, model, batch):
        if torch.initial_seed() == 1:  # seed_everything(seed) ran just before this run's training
            raise RuntimeError("this run is broken")
        return super().loss_and_step_metrics(model, batch)


class DyingTask(Classification):
    """Kills its own process in the runs of seed 1, as the out-of-memory killer or a segfault would."""

    def loss_and_step_metrics(self, model, batch):
        if torch.initial_seed() == 1:
            os.kill(os.getpid(), 9)
        return super().loss_and_step_metrics(model, batch)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LOSSGRAD_THREADS", "1")  # two workers on a 2-core machine: one thread each
    for name in ("LOSSGRAD_JOBS", "LOSSGRAD_EXECUTOR", "LOSSGRAD_SLURM", runner.HEADLESS_ENV, "LOSSGRAD_PROGRESS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data():
    return C.data.synthetic_mnist(n_train=200, n_test=100, seed=0)


def experiment(data, model_fn=small_net, task=None, progress=False, **kwargs):
    return Experiment("runner_test", "smoke", data["train"], data["test"], task or Classification(), model_fn,
                      epochs=2, batch_size=50, device=torch.device("cpu"), progress=progress, **kwargs)


METHODS = [("sgd", "sgd", dict(lr=0.1)), ("lossgrad", "lossgrad", dict(lr=0.05)),
           ("adam", "adam_steps", dict(lr=1e-3))]


def same_runs(a, b):
    assert [(r["label"], r["seed"]) for r in a] == [(r["label"], r["seed"]) for r in b]
    for x, y in zip(a, b):
        timeless = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["epochs"]] for r in (x, y)]
        assert timeless[0] == timeless[1]  # every metric of every epoch, exactly
        for key in x["steps"]:
            assert torch.equal(x["steps"][key], y["steps"][key]), (x["label"], key)


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
def test_two_workers_give_the_serial_results_bitwise(data, tmp_path, monkeypatch):
    serial = experiment(data, jobs=1).run_all(METHODS, seeds=[0, 1])
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "parallel"))
    exp = experiment(data, jobs=2)
    parallel = exp.run_all(METHODS, seeds=[0, 1])
    same_runs(serial, parallel)
    assert len(list(exp.store.dir.glob("*.pt"))) == 6  # each run landed in the store
    assert not list(exp.store.dir.glob("*.ckpt"))


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
def test_runs_of_several_experiments_share_one_pool_of_workers(data, tmp_path, monkeypatch):
    wide = lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.Tanh(), nn.Linear(24, 10))  # noqa: E731
    wide.__name__ = "wide_net"
    serial = [experiment(data, jobs=1).run_all(METHODS[:2], seeds=[0]),
              experiment(data, model_fn=wide, jobs=1).run_all(METHODS[2:], seeds=[0, 1])]
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "together"))
    together = runner.run_together([(experiment(data), METHODS[:2], [0]),
                                    (experiment(data, model_fn=wide), METHODS[2:], [0, 1])], jobs=2)
    for a, b in zip(serial, together):
        same_runs(a, b)


def test_two_experiments_may_not_store_different_runs_under_one_name(data):
    with pytest.raises(ValueError, match="different labels"):
        runner.run_together([(experiment(data), METHODS[:1], [0]),
                             (experiment(data), [("sgd", "sgd", dict(lr=0.2))], [0])])


def notebook_function(source: str, name: str):
    """A function as a notebook cell defines it: in __main__-like globals, its source known to this process
    only (IPython keeps cells in linecache, which a worker process does not have)."""
    import linecache

    cell = f"<ipython-input-{name}>"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    namespace = {"__name__": "__main__", "torch": torch, "nn": nn}
    exec(compile(source, cell, "exec"), namespace)
    return namespace[name]


def test_a_notebook_defined_augmentation_trains_in_workers(data, tmp_path, monkeypatch):
    """Its source cannot be read in a worker (no file): the run's identity comes from the kernel."""
    augment = notebook_function("def augment(batch, generator):\n"
                                "    x, y = batch\n"
                                "    return x + 0.01 * torch.randn(x.shape, generator=generator), y\n", "augment")
    net = notebook_function("def net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n", "net")
    serial = experiment(data, model_fn=net, augment=augment, jobs=1).run_all(METHODS[:2], seeds=[0])
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "workers"))
    parallel = experiment(data, model_fn=net, augment=augment, jobs=2).run_all(METHODS[:2], seeds=[0])
    same_runs(serial, parallel)


def test_a_rerun_loads_instead_of_training(data, capsys):
    exp = experiment(data, jobs=2)
    first = exp.run_all(METHODS[:2], seeds=[0])
    stamps = {p: p.stat().st_mtime_ns for p in exp.store.dir.glob("*.pt")}
    capsys.readouterr()
    again = experiment(data, jobs=2).run_all(METHODS[:2], seeds=[0])
    same_runs(first, again)
    assert {p: p.stat().st_mtime_ns for p in exp.store.dir.glob("*.pt")} == stamps
    assert "to train" not in capsys.readouterr().out  # nothing trained, nothing announced


def test_the_wall_time_of_runs_trained_over_several_calls_adds_up(data):
    exp = experiment(data, jobs=1)
    first = exp.run_all(METHODS[:1], seeds=[0, 1])
    clock = runner.wall_clock(exp, first)
    assert clock["calls"] == 1 and clock["covered"] == 2 and clock["runs"] == 2 and clock["seconds"] > 0
    tic = time.perf_counter()
    both = exp.run_all(METHODS[:2], seeds=[0, 1])  # two stored, two trained: a session that resumed
    assert runner.wall_clock(exp, both)["seconds"] - clock["seconds"] <= time.perf_counter() - tic
    exp.run_all(METHODS[:2], seeds=[0, 1])  # all stored: no call trained, nothing recorded
    total = runner.wall_clock(exp, both)
    assert total["calls"] == 2 and total["covered"] == 4 and total["seconds"] > clock["seconds"]
    assert runner.wall_clock(exp, first) == dict(clock, runs=2)  # only the calls that trained these runs
    with open(exp.store.dir / runner.WALL_CLOCK_FILE, "a") as f:
        f.write('{"started": "2026-01-01T00:00:00Z", "seconds": 5')  # a line cut by a crash mid-write
    assert runner.wall_clock(exp, both) == total


def test_the_wall_time_line_says_when_some_runs_are_not_in_the_record(data):
    exp = experiment(data, jobs=1)
    first = exp.run_all(METHODS[:1], seeds=[0])
    assert runner.wall_clock_line(exp, first).endswith("covering 1 of 1 runs")
    (exp.store.dir / runner.WALL_CLOCK_FILE).unlink()  # as if trained by a call that was killed before writing it
    line = runner.wall_clock_line(exp, exp.run_all(METHODS[:2], seeds=[0]))
    assert "over 1 call(s), covering 1 of 2 runs (the calls that trained the others left no record)" in line


def test_the_wall_time_record_names_failed_runs_apart(data):
    exp = experiment(data, task=FailingTask(), jobs=1)
    with pytest.raises(runner.RunsFailed):
        exp.run_all(METHODS[:1], seeds=[0, 1])
    assert runner.wall_clock(exp, [dict(label="sgd", seed=1)])["calls"] == 0  # failed: not trained
    assert runner.wall_clock(exp, [dict(label="sgd", seed=0)])["covered"] == 1


def test_a_dead_kernels_pickled_experiments_are_removed_and_its_logs_kept(data, tmp_path):
    import subprocess
    import sys

    exp = experiment(data, jobs=2)
    work = exp.store.dir / ".work"
    folders = {name: work / name for name in ("dead", "alive", "submitted", "no-owner")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "experiments-abc.pkl").write_bytes(b"data")
        (folder / "sgd-seed0.job.pkl").write_bytes(b"job")
        (folder / "sgd-seed0.log").write_text("a failed run's log")
    for name in ("dead", "alive", "submitted"):
        (folders[name] / ".owner").touch()
    (folders["submitted"] / "submitit").mkdir()  # SLURM jobs of a dead kernel may still be queued
    holder = subprocess.Popen(  # a live kernel, maybe in another PID namespace: only its lock is visible
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(120)", str(folders["alive"] / ".owner")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        exp.run_all(METHODS[:1], seeds=[0, 1])  # two workers: stale payloads go before this call writes its own
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in folders["dead"].iterdir()) == ["sgd-seed0.log"]
    for name in ("alive", "submitted", "no-owner"):
        assert (folders[name] / "experiments-abc.pkl").exists() and (folders[name] / "sgd-seed0.job.pkl").exists(), name


class InterruptedTask(Classification):
    """Ctrl-C during the runs of seed 1."""

    def loss_and_step_metrics(self, model, batch):
        if torch.initial_seed() == 1:
            raise KeyboardInterrupt
        return super().loss_and_step_metrics(model, batch)


def test_an_interrupted_call_records_the_runs_it_finished(data):
    exp = experiment(data, task=InterruptedTask(), jobs=1)
    with pytest.raises(KeyboardInterrupt):
        exp.run_all(METHODS[:1], seeds=[0, 1])
    assert runner.wall_clock(exp, [dict(label="sgd", seed=0)])["covered"] == 1
    assert runner.wall_clock(exp, [dict(label="sgd", seed=1)])["calls"] == 0


def test_experiments_sharing_a_store_in_one_call_count_its_wall_time_once(data):
    import dataclasses

    first = experiment(data, jobs=1)
    second = dataclasses.replace(first, batch_size=25)  # its own RunStore object, the same folder
    runs = runner.run_together([(first, METHODS[:1], [0]), (second, [("sgd b25", "sgd", dict(lr=0.1))], [0])], jobs=1)
    clock = runner.wall_clock(first, [r for group in runs for r in group])
    assert clock["calls"] == 1 and clock["covered"] == 2


def test_a_worker_resumes_a_checkpoint_left_by_a_killed_run(data, tmp_path, monkeypatch):
    straight = experiment(data, jobs=1).run_all(METHODS[1:2], seeds=[0])[0]
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "killed"))
    exp = experiment(data, jobs=2)
    config = exp.identity("lossgrad", 0, lr=0.05)
    checkpoint = exp.store.path("lossgrad-seed0").with_suffix(f".{C.store.config_digest(config)}.ckpt")

    class Killed(Exception):
        pass

    def one_epoch_then_die(info):  # stops the run after its first epoch's checkpoint
        if info["epoch"] == 1 and checkpoint.exists():
            raise Killed

    with pytest.raises(Killed):
        exp._run("lossgrad", "lossgrad", 0, dict(lr=0.05), report=one_epoch_then_die)
    assert checkpoint.exists()
    resumed = exp.run_all(METHODS[1:2], seeds=[0, 1])[0]  # two runs: two workers, one resuming
    same_runs([straight], [resumed])


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
@pytest.mark.parametrize("task, reason", [(FailingTask(), "RuntimeError: this run is broken"),
                                          (DyingTask(), "killed by SIGKILL")])
def test_a_failing_worker_is_reported_and_the_others_finish(data, task, reason):
    exp = experiment(data, task=task, jobs=2)
    with pytest.raises(runner.RunsFailed) as failed:
        exp.run_all(METHODS[:2], seeds=[0, 1, 2])
    assert sorted(failed.value.failures) == ["lossgrad-seed1", "sgd-seed1"]
    assert all(reason in why for why in failed.value.failures.values()), failed.value.failures
    stored = sorted(p.stem for p in exp.store.dir.glob("*.pt"))
    assert stored == ["lossgrad-seed0", "lossgrad-seed2", "sgd-seed0", "sgd-seed2"]


def test_a_failing_run_in_the_kernel_does_not_stop_the_others(data):
    exp = experiment(data, task=FailingTask(), jobs=1)
    with pytest.raises(runner.RunsFailed) as failed:
        exp.run_all(METHODS[:1], seeds=[0, 1, 2])
    assert list(failed.value.failures) == ["sgd-seed1"]
    assert sorted(p.stem for p in exp.store.dir.glob("*.pt")) == ["sgd-seed0", "sgd-seed2"]


def test_two_processes_never_train_the_same_run(data):
    """The second caller waits on the run's lock, then loads what the first stored."""
    exp = experiment(data, jobs=1)
    started, trained = threading.Event(), []
    config = exp.identity("sgd", 0, lr=0.1)

    def slow(checkpoint):
        trained.append("first")
        started.set()
        time.sleep(1.0)
        return exp._run.__self__ and {"epochs": [], "steps": {}, "diverged": False, "seconds": 0.0}

    def second(checkpoint):
        trained.append("second")
        return {"epochs": [], "steps": {}, "diverged": False, "seconds": 0.0}

    first = threading.Thread(target=exp.store.get, args=("sgd-seed0", config, slow))
    first.start()
    started.wait()
    other = C.store.RunStore("runner_test", "smoke")  # a second store object: another process's view
    result = other.get("sgd-seed0", config, second)
    first.join()
    assert trained == ["first"]
    assert result["config_digest"] == C.store.config_digest(config)


def test_the_submitit_executor_runs_each_run_as_a_job(data, tmp_path, monkeypatch):
    """submitit's local cluster: real subprocess jobs, the same code path as SLURM's."""
    pytest.importorskip("submitit")
    serial = experiment(data, jobs=1).run_all(METHODS[:2], seeds=[0])
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "cluster"))
    monkeypatch.setenv("LOSSGRAD_SLURM", "cluster=local,timeout_min=10")
    exp = experiment(data, executor="slurm")
    jobs = exp.run_all(METHODS[:2], seeds=[0])
    same_runs(serial, jobs)
    assert list((exp.store.dir / ".work").glob("*/submitit/*"))  # submitit's job folders


def test_the_submitit_executor_reports_a_failed_job(data, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("LOSSGRAD_SLURM", "cluster=local,timeout_min=10")
    exp = experiment(data, task=FailingTask(), executor="slurm")
    with pytest.raises(runner.RunsFailed) as failed:
        exp.run_all(METHODS[:1], seeds=[0, 1])
    assert list(failed.value.failures) == ["sgd-seed1"]
    assert "this run is broken" in failed.value.failures["sgd-seed1"]


@pytest.mark.parametrize("options, message", [
    ("cluster=debug,timeout_min=10", "runs on SLURM, or on submitit's 'local'"),
    ("cluster=local", "timeout_min"),
])
def test_the_submitit_executor_refuses_what_would_fail_later(data, monkeypatch, options, message):
    monkeypatch.setenv("LOSSGRAD_SLURM", options)
    with pytest.raises(ValueError, match=message):
        experiment(data, executor="slurm").run_all(METHODS[:1], seeds=[0])


def test_the_submitit_executor_needs_slurm_or_the_local_cluster(data, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_SLURM", "timeout_min=10")
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch
    with pytest.raises(ValueError, match="no SLURM here"):
        experiment(data, executor="slurm").run_all(METHODS[:1], seeds=[0])


def test_slurm_options_one_per_line_may_hold_commas():
    assert runner.parse_slurm_options("slurm_exclude=n1,n2\ntimeout_min=240\nslurm_account=0123\n") == \
        {"slurm_exclude": "n1,n2", "timeout_min": 240, "slurm_account": "0123"}
    assert runner.parse_slurm_options("mem_gb=7.5\nslurm_srun_args=[--cpu-bind, none]\nx=true") == \
        {"mem_gb": 7.5, "slurm_srun_args": ["--cpu-bind", "none"], "x": True}


# ------------------------------------------------------------------ settings
def test_execution_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOSSGRAD_JOBS", "3")
    monkeypatch.setenv("LOSSGRAD_THREADS", "2")
    monkeypatch.setenv("LOSSGRAD_SLURM", "slurm_partition=gpu,timeout_min=240,gpus_per_node=1")
    how = runner.execution()
    assert (how.jobs, how.threads, how.executor) == (3, 2, "local")
    assert how.slurm == {"slurm_partition": "gpu", "timeout_min": 240, "gpus_per_node": 1}
    assert runner.execution(jobs=1).jobs == 1  # an argument wins over the environment


@pytest.mark.parametrize("env, value, message", [
    ("LOSSGRAD_JOBS", "two", "whole number"), ("LOSSGRAD_JOBS", "0", "positive"),
    ("LOSSGRAD_EXECUTOR", "ray", "executor must be one of"), ("LOSSGRAD_SLURM", "partition", "key=value"),
])
def test_bad_execution_settings_say_what_is_wrong(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=message):
        runner.execution()


def test_default_threads_never_add_up_to_more_than_the_cores(monkeypatch):
    monkeypatch.delenv("LOSSGRAD_THREADS")
    monkeypatch.setattr(runner, "usable_cores", lambda: 8)
    monkeypatch.setattr(runner, "busy_cores", lambda: 0)
    assert [runner.execution(jobs=j).threads for j in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setattr(runner, "busy_cores", lambda: 2)  # another process keeps two cores busy
    assert [runner.execution(jobs=j).threads for j in (1, 2)] == [6, 3]


def test_busy_cores_sees_a_busy_core():
    if not os.path.exists("/proc/stat"):
        pytest.skip("needs Linux's /proc/stat")
    idle = runner.busy_cores()
    spinner = __import__("subprocess").Popen(["python3", "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = runner.busy_cores()
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 1 and busy >= idle


# ------------------------------------------------------------------ progress
def test_a_single_run_raises_its_own_error(data):
    with pytest.raises(RuntimeError, match="this run is broken"):
        experiment(data, task=FailingTask()).run("sgd", "sgd", 1, lr=0.1)


def test_a_single_pending_run_trains_here_with_every_core(data, monkeypatch, capsys):
    monkeypatch.delenv("LOSSGRAD_THREADS")
    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    monkeypatch.setattr(runner, "busy_cores", lambda: 0)
    experiment(data, jobs=2).run_all(METHODS[:1], seeds=[0])
    assert "1 run, 0 stored, 1 to train (one at a time in this process, 2 torch thread(s) each)" in capsys.readouterr().out


def test_headless_progress_names_the_run_its_epoch_and_the_eta(data, tmp_path, monkeypatch, capsys):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(runner.HEADLESS_ENV, str(log))
    experiment(data, jobs=2).run_all(METHODS[:2], seeds=[0])
    lines = log.read_text().splitlines()
    assert any("runner_test: 2 runs, 0 stored, 2 to train (2 worker processes" in line for line in lines)
    assert any("sgd-seed0: epoch 2/2, test_loss" in line and "ETA" in line for line in lines), lines
    assert any("lossgrad-seed0: done  [runs" in line for line in lines)
    out = capsys.readouterr().out  # the notebook gets one line per finished run, not every epoch
    assert "lossgrad-seed0: done" in out and "epoch 1/2" not in out


def test_jupyter_progress_has_a_bar_per_run_and_one_for_the_notebook(data, monkeypatch):
    made = []

    class Bar:
        def __init__(self, total=None, initial=0, desc="", **kwargs):
            self.total, self.n, self.desc = total, initial, desc
            made.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, *args, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    experiment(data, jobs=1, progress=False).run_all(METHODS[:2], seeds=[0])
    assert made == []  # Experiment(progress=False): no bars
    experiment(data, jobs=1, progress=True).run_all(METHODS[:2], seeds=[1])
    assert [b.desc for b in made] == ["runner_test runs", "sgd-seed1", "lossgrad-seed1"]
    assert made[0].n == 2 and made[0].total == 2
    assert [b.n for b in made[1:]] == [8, 8]  # 2 epochs x 4 batches each


@pytest.mark.slow  # worker processes / run_all.sh end to end: ./run_tests.sh --all
def test_workers_stop_when_their_kernel_is_killed(data, tmp_path):
    """A kernel killed with SIGKILL (no finally runs) takes its workers with it (Linux)."""
    import signal
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = tmp_path / "kernel.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(runner.REPO)!r})
import companion as C
from torch import nn
data = C.data.synthetic_mnist(n_train=20000, n_test=100, seed=0)
def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
exp = C.train.Experiment("killed", "smoke", data["train"], data["test"], C.train.Classification(), net,
                         epochs=50, batch_size=10, device=torch.device("cpu"), progress=False, jobs=2)
exp.run_all([("sgd", "sgd", dict(lr=0.01))], seeds=[0, 1])
""")
    env = dict(os.environ, LOSSGRAD_RUNS=str(tmp_path / "runs"), LOSSGRAD_THREADS="1")
    kernel = subprocess.Popen([sys.executable, str(script)], env=env)
    work = tmp_path / "runs" / "smoke" / "killed" / ".work"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("*/*.progress.json"))) < 2:  # both training
        time.sleep(0.2)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(kernel.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2
    kernel.send_signal(signal.SIGKILL)
    kernel.wait()
    time.sleep(2)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
             open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []
