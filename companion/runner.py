"""Where a notebook's runs train: in the kernel, in local worker processes, or as SLURM jobs (submitit).

:meth:`companion.train.Experiment.run_all` hands its runs here. Whatever the executor, every run goes
through the same :class:`~companion.store.RunStore`: a stored run is loaded, not trained; a run is trained
under its lock (two workers or two notebooks never train the same run); its result lands on disk as soon
as it finishes; a killed run resumes from its checkpoint. The executor is execution, not science: it is
not part of any run's identity, and on the CPU a run's numbers do not depend on it given the same torch
threads per process (tested bitwise; the thread count itself can change the last bits of CPU results, and
the conditions line of a notebook states it).

Executors (``jobs``/``executor`` on the Experiment, else ``$LOSSGRAD_JOBS``/``$LOSSGRAD_EXECUTOR``; or
``./run_all.sh --jobs N --executor slurm``):

* ``local``, ``jobs=1``: one run after another in this process (the CPU default); also whenever a single
  run is left to train, with every free core.
* ``local``, ``jobs=N``: N runs at once, each in a fresh worker process (the GPU default: one per GPU;
  worker slot i sees only GPU i mod the GPU count, as ``cuda``). A worker that fails or dies (out of memory, a segfault) is reported with its
  run, its reason and its log; the other runs go on, and ``run_all`` raises :class:`RunsFailed` at the
  end naming every failed run.
* ``slurm``: each run is a SLURM job submitted with submitit (``$LOSSGRAD_SLURM``: ``key=value`` items of
  submitit's parameters, one per line or comma-separated, e.g. ``slurm_partition=gpu,timeout_min=240,
  gpus_per_node=1``; ``timeout_min`` is required); the run store must be on a filesystem the nodes share
  (``$LOSSGRAD_RUNS``). The notebook waits for the jobs, then draws. ``cluster=local`` runs the same code
  as local subprocesses (all at once), which is how it is tested.

Threads: a CPU worker gets ``usable cores // workers`` torch threads (workers: ``jobs``, or fewer runs) (``$LOSSGRAD_THREADS`` overrides).
Two processes that both use every core make each other 100x slower (``benchmarks/threads.py``: a
2-thread step beside a second 2-thread training process took 295 ms instead of 1.9 ms on this 2-core
machine; one thread each, 3.1 ms), so the workers never add up to more threads than cores, and the
kernel (``jobs=1``) takes one thread fewer than the cores when other processes already keep a core busy.

Progress: a bar per running run and one for the notebook in JupyterLab (tqdm widgets); under
``./run_all.sh`` (``$LOSSGRAD_PROGRESS_FILE``) one line per run event in the terminal (run, epoch k/n,
latest test metric, runs done/total, ETA), and one line per finished run in the notebook's output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import train
from .profiles import HEADLESS_ENV, headless  # noqa: F401 (runner.HEADLESS_ENV, runner.headless)
from .store import STORED_ONLY_ENV, StoredRunMissing, fcntl

EXECUTORS = ("local", "slurm")
REPO = Path(__file__).resolve().parent.parent


class RunsFailed(RuntimeError):
    """Some runs failed; the others finished and are stored. ``failures``: ``{run name: reason}``."""

    def __init__(self, failures: dict):
        self.failures = failures
        lines = "\n".join(f"  {name}: {why}" for name, why in failures.items())
        super().__init__(f"{len(failures)} run(s) failed (the others finished and are stored; rerunning "
                         f"trains only the missing ones):\n{lines}")


# ----------------------------------------------------------------- settings
@dataclass
class Execution:
    """How runs are executed: ``jobs`` at once, ``threads`` torch threads each, on ``executor``."""

    jobs: int
    threads: Optional[int]  # None: cluster jobs take $SLURM_CPUS_PER_TASK, else torch's default
    executor: str = "local"
    slurm: dict = field(default_factory=dict)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def busy_cores(seconds: float = 0.3) -> int:
    """Of the cores this process may use, how many other processes keep busy now: their CPU time over
    ``seconds`` while this process sleeps, from Linux's per-CPU lines of /proc/stat (0 where it cannot be
    read), half a core or more counting as one."""

    def sample() -> tuple:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        times = {int(row[0][3:]): [int(v) for v in row[1:9]] for row in rows}  # user … steal (not guest)
        return times

    try:
        mine = os.sched_getaffinity(0)
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError, IndexError, AttributeError):
        return 0
    busy = 0.0
    for cpu in mine & set(before) & set(after):
        total = sum(after[cpu]) - sum(before[cpu])
        idle = after[cpu][3] + after[cpu][4] - before[cpu][3] - before[cpu][4]
        busy += (1 - idle / total) if total > 0 else 0.0
    return math.floor(busy + 0.5)


def default_jobs() -> int:
    """One run per GPU on a GPU machine, one at a time on a CPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def execution(jobs: Optional[int] = None, executor: Optional[str] = None, threads: Optional[int] = None,
              slurm: Optional[dict] = None) -> Execution:
    """The execution settings: arguments, else ``$LOSSGRAD_JOBS``, ``$LOSSGRAD_EXECUTOR``,
    ``$LOSSGRAD_THREADS``, ``$LOSSGRAD_SLURM``, else the defaults (see the module docstring)."""
    jobs = _setting("jobs", jobs, "LOSSGRAD_JOBS", int)
    threads = _setting("threads", threads, "LOSSGRAD_THREADS", int)
    executor = executor or os.environ.get("LOSSGRAD_EXECUTOR") or "local"
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if slurm is None:
        slurm = parse_slurm_options(os.environ.get("LOSSGRAD_SLURM", ""))
    if jobs is None:
        jobs = default_jobs()
    if jobs < 1:
        raise ValueError(f"jobs must be a positive number of worker processes, got {jobs}")
    if threads is None:
        # a machine some of whose cores are busy gets fewer threads: two processes both using every core
        # is the 100x case; a training process beside a busy core costs about 2x (benchmarks/threads.py)
        # (cluster jobs: $SLURM_CPUS_PER_TASK where the job runs)
        threads = max(1, (usable_cores() - busy_cores()) // jobs) if executor == "local" else None
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive number, got {threads}")
    return Execution(jobs=jobs, threads=threads, executor=executor, slurm=slurm)


def parse_slurm_options(text: str) -> dict:
    """submitit parameters from ``key=value`` items, one per line (as run_all.sh passes them) or separated by
    commas on one line: ``"slurm_partition=gpu,timeout_min=240"`` -> ``{"slurm_partition": "gpu",
    "timeout_min": 240}``. On separate lines a value may hold commas (``slurm_exclude=n1,n2``)."""
    items = text.splitlines() if "\n" in text.strip() else text.split(",")
    options = {}
    for item in filter(None, (part.strip() for part in items)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"$LOSSGRAD_SLURM takes key=value items, got {item!r}")
        options[key.strip()] = _value(value.strip())
    return options


def _value(text: str):
    """A number (no leading zeros: ``0123`` stays text), true/false, a ``[list]`` (YAML), else the text."""
    if re.fullmatch(r"-?(0|[1-9]\d*)", text):
        return int(text)
    if re.fullmatch(r"-?(0|[1-9]\d*)?\.\d+([eE][-+]?\d+)?|-?[1-9]\d*[eE][-+]?\d+", text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.startswith("["):
        import yaml

        return yaml.safe_load(text)
    return text


def _setting(name, value, env, kind):
    if value is not None:
        return kind(value)
    text = os.environ.get(env, "").strip()
    if not text or text.lower() == "none":
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"${env} must be a whole number ({name}), got {text!r}") from None


# ---------------------------------------------------------------- run_all
@dataclass
class _Run:
    experiment: object
    label: str
    optimizer: str
    seed: int
    options: dict
    name: str
    config: dict
    steps: int  # steps of a whole run: the unit of progress

    @property
    def key(self) -> tuple:
        return str(self.experiment.store.dir), self.name


def run_all(experiment, specs: list, jobs: Optional[int] = None, executor: Optional[str] = None) -> list:
    """Results of ``specs`` (``(label, optimizer, seed, options)`` tuples) in order: stored ones loaded,
    the others trained as :func:`execution` says. Raises :class:`RunsFailed` after the others finished
    when some failed."""
    return _execute([(experiment, specs)], jobs, executor)[0]


def run_together(batches: list, jobs: Optional[int] = None, executor: Optional[str] = None) -> list:
    """The runs of several experiments at once, for one pool of workers: ``batches`` is a list of
    ``(experiment, methods, seeds)`` as :meth:`~companion.train.Experiment.run_all` takes them; returns a
    list of result lists in that order. Keeps N workers busy across experiments (one ``run_all`` per
    experiment waits for its slowest run before the next starts). ``jobs``/``executor`` default to the
    first experiment's."""
    if not batches:
        return []
    first = batches[0][0]
    groups = [(exp, [(label, optimizer, seed, dict(options)) for label, optimizer, options in methods for seed in seeds])
              for exp, methods, seeds in batches]
    return _execute(groups, jobs if jobs is not None else first.jobs, executor or first.executor)


def _execute(groups: list, jobs, executor) -> list:
    execution(jobs, executor, threads=1)  # bad settings fail at once, even when nothing trains
    train.flush_denormals_setting()
    planned = [_plan(experiment, specs) for experiment, specs in groups]
    unique = {}
    for r in (r for runs in planned for r in runs):  # a run asked for twice trains once
        if r.key in unique and unique[r.key].config != r.config:
            raise ValueError(f"two experiments store different runs as {r.name!r} in {r.experiment.store.dir}; "
                             "give them different labels")
        unique[r.key] = r
    unique = list(unique.values())
    stored = {r.key: r.experiment.store.lookup(r.name, r.config) for r in unique}
    pending = [r for r in unique if stored[r.key] is None]
    if pending and os.environ.get(STORED_ONLY_ENV) == "1":
        missing = "; ".join(f"{r.experiment.store.dir / r.name}: {r.experiment.store.why_missing(r.name, r.config)}"
                            for r in pending)
        raise StoredRunMissing(f"{missing}; ${STORED_ONLY_ENV}=1 forbids training "
                               f"{'it' if len(pending) == 1 else 'them'}")
    if not pending:
        return _results(planned, stored)
    how = execution(jobs, executor)  # it measures the busy cores: only when something trains
    if how.executor == "local" and how.jobs > len(pending):  # fewer runs than workers: the cores go to the runs
        how = execution(len(pending), executor)
    display = Display(groups[0][0].notebook, unique, pending, how,
                      bars=all(exp.progress for exp, _ in groups))
    started, tic = time.time(), time.perf_counter()
    try:
        if how.executor == "slurm":
            failures = _run_slurm(pending, how, display)
        elif how.jobs == 1:
            failures = _run_here(pending, how, display, catch=len(unique) > 1)
        else:
            failures = _run_workers(pending, how, display)
    finally:
        display.close()
        _log_wall_clock(pending, how, started, time.perf_counter() - tic)
    if failures:
        raise RunsFailed(failures)
    return _results(planned, stored)


WALL_CLOCK_FILE = "wall_clock.jsonl"


def _log_wall_clock(pending, how, started: float, seconds: float) -> None:
    """Appends one line per run store to ``<store>/wall_clock.jsonl``: when this call started training, its wall
    time, the runs it trained (those of its pending runs now in the store, also when it was interrupted) and those
    it did not, and how. A notebook whose runs trained over several calls (a run stopped and resumed, a session
    that ended) reads its total wall time back with :func:`wall_clock`; a run's own ``seconds`` count only its
    training. Never raises: it runs while another error may be on its way out."""
    try:
        by_store = {}  # one line per folder (experiments copied with dataclasses.replace share one)
        for r in pending:
            by_store.setdefault(str(r.experiment.store.dir), (r.experiment.store, []))[1].append(r.name)
        for store, names in by_store.values():
            trained = sorted(n for n in names if _written_since(store.path(n), started))
            entry = dict(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), seconds=round(seconds, 3),
                         trained=trained, failed=sorted(set(names) - set(trained)), executor=how.executor,
                         jobs=how.jobs, threads=how.threads, host=platform.node())
            with open(store.dir / WALL_CLOCK_FILE, "a") as f:  # one short append per call: whole lines (not on NFS)
                f.write(json.dumps(entry) + "\n")
    except Exception as err:  # a read-only store loses the record, not the runs
        print(f"could not record the wall time in the run store: {err}", file=sys.stderr)


def _written_since(path: Path, started: float) -> bool:
    try:
        return path.stat().st_mtime >= started - 1.0  # a run stored before this call (then found stale) is not its
    except OSError:
        return False


def wall_clock(experiment, results: list) -> dict:
    """The wall time spent training ``results`` (dicts with ``label`` and ``seed``, as ``run_all`` returns them),
    from the store's ``wall_clock.jsonl``: ``seconds`` summed over every call that trained at least one of them,
    ``calls``, ``covered`` (how many of them those calls trained; runs trained before the record existed, or
    copied in, are not covered) and ``runs``. Two kernels training into one store at the same time would both be
    counted."""
    names = {experiment.run_name(r["label"], r["seed"]) for r in results}
    seconds, calls, covered = 0.0, 0, set()
    try:
        lines = (experiment.store.dir / WALL_CLOCK_FILE).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            continue
        mine = names & set(entry.get("trained", []))
        if mine:
            seconds, calls = seconds + float(entry["seconds"]), calls + 1
            covered |= mine
    return dict(seconds=seconds, calls=calls, covered=len(covered), runs=len(names))


def wall_clock_line(experiment, results: list) -> str:
    """:func:`wall_clock` as the sentence a notebook prints beside its conditions."""
    clock = wall_clock(experiment, results)
    line = (f"wall time of every call that trained these runs ({WALL_CLOCK_FILE} in the run store): "
            f"{clock['seconds'] / 60:.1f} min over {clock['calls']} call(s), covering {clock['covered']} of "
            f"{clock['runs']} runs")
    return line if clock["covered"] == clock["runs"] else line + " (the calls that trained the others left no record)"


def _results(planned: list, stored: dict) -> list:
    results = []
    for runs in planned:
        results.append([])
        for r in runs:
            result = stored[r.key] or r.experiment.store.lookup(r.name, r.config)
            if result is None:
                raise RuntimeError(f"{r.name} finished but its result is not in {r.experiment.store.dir}")
            results[-1].append(dict(result, label=r.label, optimizer=r.optimizer, options=r.options, seed=r.seed))
    return results


def _plan(experiment, specs) -> list:
    runs, seen = [], {}
    steps = experiment.epochs * -(-len(experiment.train_data[0]) // experiment.batch_size)
    for label, optimizer, seed, options in specs:
        experiment.check(optimizer, options)  # bad options fail before anything trains
        name = experiment.run_name(label, seed)
        config = experiment.identity(optimizer, seed, **options)
        if name in seen and seen[name] != config:
            raise ValueError(f"two runs are named {name!r} (label {label!r}, seed {seed}) with different "
                             "settings; give them different labels")
        seen[name] = config
        runs.append(_Run(experiment, label, optimizer, seed, dict(options), name, config, steps))
    return runs


@contextlib.contextmanager
def _torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_here(pending, how, display, catch: bool = True) -> dict:
    """In this process, one run after another; with ``catch``, a run that raises is reported and the
    others go on (a single run's error propagates as it is)."""
    failures = {}
    with _torch_threads(how.threads):
        for r in pending:
            display.started(r.key)
            try:
                r.experiment._run(r.label, r.optimizer, r.seed, r.options, config=r.config,
                                  report=lambda info, key=r.key: display.update(key, info))
            except Exception as err:  # the other runs go on; KeyboardInterrupt stops everything
                if not catch:
                    raise
                failures[r.name] = f"{type(err).__name__}: {err}"
                display.finished(r.key, failures[r.name])
                traceback.print_exc()
            else:
                display.finished(r.key)
    return failures


# ---------------------------------------------------------- local workers
def _payload(pending) -> tuple:
    """The experiments of ``pending`` (data, model and task code, even when defined in a notebook) pickled
    together once for the workers, so that data they share (``dataclasses.replace`` copies) is stored once;
    their identities are computed first, so that workers do not hash the data again. Returns the file and
    each experiment's index in it (by ``id``)."""
    import cloudpickle

    experiments = list({id(r.experiment): r.experiment for r in pending}.values())
    folder = _work_dir(pending[0].experiment)
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder, prefix="experiments-", suffix=".pkl")
    with os.fdopen(fd, "wb") as f:
        cloudpickle.dump(experiments, f)
    return Path(path), {id(exp): i for i, exp in enumerate(experiments)}


def _worker_gpus(experiment, jobs: int) -> list:
    """The GPU each worker slot sees as its only one (``CUDA_VISIBLE_DEVICES``), or None on the CPU:
    then the notebook's ``cuda`` tensors and devices (an augmentation's constants) mean that GPU."""
    device = torch.device(experiment.device)
    if device.type != "cuda" or device.index is not None or not torch.cuda.is_available():
        return [None] * jobs  # the CPU, or the one GPU the notebook chose (cuda:1): every worker uses it
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    return [ids[i % len(ids)] for i in range(jobs)]


_WORK: dict = {}  # (this process, store folder) -> (its scratch folder, the open file holding its .owner lock)


def _work_dir(experiment) -> Path:
    """This process's scratch folder beside the run store (jobs, logs, progress, the pickled experiments), named by
    host, process and a random tag: two notebooks running the same store (run_all.sh and JupyterLab, two nodes on a
    shared filesystem, two containers) never share a file; the runs' locks keep them apart. The process holds a
    lock on the folder's ``.owner`` file while it lives: :func:`_remove_stale_payloads` tells a dead owner by it."""
    key = (os.getpid(), str(experiment.store.dir))
    if key not in _WORK:
        folder = experiment.store.dir / ".work" / f"{platform.node()}-{os.getpid()}-{secrets.token_hex(3)}"
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".owner", "a")
        if fcntl is not None:
            with contextlib.suppress(OSError):  # no locks on this filesystem: its leftovers are never removed
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _WORK[key] = (folder, handle)
    folder = _WORK[key][0]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remove_stale_payloads(experiment) -> None:
    """Deletes the pickled experiments (data included: hundreds of MB) and jobs that a kernel left in its scratch
    folder when it died without cleaning up (SIGTERM, SIGKILL, a crash); logs stay. A folder is stale when its
    ``.owner`` lock can be taken (flock: its process is gone, wherever it ran); a folder whose lock is held, that
    has no ``.owner`` or whose filesystem has no locks is left alone, and so is one that submitted SLURM jobs
    (queued jobs outlive their kernel and still need its payload)."""
    if fcntl is None:
        return
    mine = _work_dir(experiment)
    for folder in (experiment.store.dir / ".work").iterdir():
        owner = folder / ".owner"
        if folder == mine or not owner.exists() or (folder / "submitit").exists():
            continue
        try:
            with open(owner, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its owner is gone
                for leftover in [*folder.glob("experiments-*.pkl"), *folder.glob("*.job.pkl"), owner]:
                    leftover.unlink(missing_ok=True)  # without .owner, later calls pass the logs by
        except OSError:  # held by a live process, or no locks here
            continue
        with contextlib.suppress(OSError):
            folder.rmdir()  # when empty


def _run_workers(pending, how, display) -> dict:
    _remove_stale_payloads(pending[0].experiment)  # local workers only: a dead kernel's SLURM jobs may be queued
    payload, index = _payload(pending)
    gpus = _worker_gpus(pending[0].experiment, how.jobs)
    queue, running, failures = list(pending), {}, {}
    env = dict(os.environ, OMP_NUM_THREADS=str(how.threads), MKL_NUM_THREADS=str(how.threads),
               PYTHONPATH=_import_path(), LOSSGRAD_PARENT_PID=str(os.getpid()))
    env.pop(HEADLESS_ENV, None)
    try:
        while queue or running:
            while queue and len(running) < how.jobs:
                slot = min(set(range(how.jobs)) - {s for s, *_ in running.values()})
                r = queue.pop(0)
                work = _work_dir(r.experiment)
                progress, log = work / f"{r.name}.progress.json", work / f"{r.name}.log"
                progress.unlink(missing_ok=True)
                job = work / f"{r.name}.job.pkl"
                _dump(job, dict(payload=str(payload), experiment=index[id(r.experiment)], label=r.label,
                                optimizer=r.optimizer, seed=r.seed, options=r.options, config=r.config,
                                threads=how.threads, progress=str(progress)))
                worker_env = env if gpus[slot] is None else dict(env, CUDA_VISIBLE_DEVICES=gpus[slot])
                with open(log, "w") as out:
                    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(job)], env=worker_env,
                                            stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd())
                running[r.key] = (slot, proc, progress, log, r)
                display.started(r.key)
            time.sleep(0.5)
            for key, (slot, proc, progress, log, r) in list(running.items()):
                info = _read_json(progress)
                if info:
                    display.update(key, info)
                if proc.poll() is None:
                    continue
                del running[key]
                if proc.returncode == 0:
                    display.finished(key)
                    log.unlink(missing_ok=True)
                    progress.unlink(missing_ok=True)
                else:
                    failures[r.name] = f"{_exit_reason(proc.returncode)}: {_last_error(log)} (log: {log})"
                    display.finished(key, failures[r.name])
    finally:
        for _, proc, *_ in running.values():  # interrupted: stop the workers; checkpoints stay
            proc.terminate()
        for _, proc, *_ in running.values():
            proc.wait()
        payload.unlink(missing_ok=True)  # the folder stays (its .owner lock); logs of failed runs with it
    return failures


def _import_path() -> str:
    """This process's module search path, for workers and jobs: they unpickle the experiment, whose
    functions from importable modules (the companion, a user's own) are pickled by reference."""
    return os.pathsep.join(dict.fromkeys([str(REPO)] + [p or os.getcwd() for p in sys.path]))


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"the worker exited with status {code}"


def _last_error(log: Path) -> str:
    try:
        return _exception_line(log.read_text(errors="replace")) or "(empty log)"
    except OSError:
        return "(no log)"


def _exception_line(text: str) -> str:
    """The last ``SomeError: message`` line of a log or traceback, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Missing|Failed)\b(:|$)", line):
            return line
    return lines[-1] if lines else ""


def _dump(path: Path, obj) -> None:
    import cloudpickle

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        cloudpickle.dump(obj, f)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def train_one(job: dict) -> str:
    """Trains (or loads) one run in this process, as a worker or a cluster job; returns its name.

    Progress goes to ``job['progress']`` as JSON, at most every few seconds and after each epoch."""
    import cloudpickle

    threads = job["threads"] or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        torch.set_num_threads(int(threads))
    with open(job["payload"], "rb") as f:
        experiment = cloudpickle.load(f)[job["experiment"]]
    if torch.device(experiment.device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the experiment trains on CUDA and this job sees no GPU (ask for one: gpus_per_node)")
    experiment.progress = False
    progress = Path(job["progress"])
    experiment._run(job["label"], job["optimizer"], job["seed"], job["options"],
                    report=lambda info: _write_json(progress, info), config=job.get("config"))
    return experiment.run_name(job["label"], job["seed"])


# ------------------------------------------------------------------- slurm
def _run_slurm(pending, how, display) -> dict:
    """One submitit job per run (a SLURM job array); waits for all of them, showing their progress."""
    import shutil

    import submitit

    experiment = pending[0].experiment
    options = dict(how.slurm)
    cluster = options.pop("cluster", None)
    if cluster not in (None, "slurm", "local"):
        raise ValueError(f"cluster={cluster!r}: the slurm executor runs on SLURM, or on submitit's 'local' "
                         "cluster (subprocesses on this machine) to try it out")
    if cluster is None and shutil.which("sbatch") is None:
        raise ValueError("--executor slurm: no SLURM here (sbatch is not on PATH). Run it on a login node, or pass "
                         "--slurm cluster=local to try the same code path on this machine")
    if "timeout_min" not in options:  # submitit's default kills a run after a few minutes
        raise ValueError("--executor slurm needs the longest time a run may take: --slurm timeout_min=MINUTES")
    payload, index = _payload(pending)
    work = _work_dir(experiment)
    threads = how.threads or (max(1, usable_cores() // len(pending)) if cluster == "local" else None)
    executor = submitit.AutoExecutor(folder=work / "submitit" / "%j", cluster=cluster)
    options.setdefault("name", f"lossgrad-{experiment.notebook}")
    if how.threads and cluster != "local":
        options.setdefault("cpus_per_task", how.threads)
    if cluster != "local":
        options.setdefault("slurm_setup", [f"export PYTHONPATH={shlex.quote(_import_path())}"])
    executor.update_parameters(**options)
    jobs, failures, submitted = {}, {}, []
    with _environ(PYTHONPATH=_import_path()):  # local jobs start at submission and inherit the environment
        with executor.batch():  # one job array on SLURM
            for r in pending:
                progress = work / f"{r.name}.progress.json"
                progress.unlink(missing_ok=True)
                submitted.append((r, progress, executor.submit(train_one, dict(
                    payload=str(payload), experiment=index[id(r.experiment)], label=r.label, optimizer=r.optimizer,
                    seed=r.seed, options=r.options, config=r.config, threads=threads,
                    progress=str(progress)))))
    for r, progress, job in submitted:
        jobs[r.key] = (job, progress, r)
        display.started(r.key, f"job {job.job_id}")
    try:
        while jobs:
            time.sleep(1.0)
            for key, (job, progress, r) in list(jobs.items()):
                info = _read_json(progress)
                if info:
                    display.update(key, info)
                try:
                    if not job.done():
                        continue
                    del jobs[key]
                    job.result()
                except Exception as err:
                    jobs.pop(key, None)
                    failures[r.name] = f"job {job.job_id}: {_exception_line(str(err))} (logs: {job.paths.folder})"
                    display.finished(key, failures[r.name])
                else:
                    display.finished(key)
    finally:
        for job, *_ in jobs.values():  # interrupted: cancel what is still queued or running
            with contextlib.suppress(Exception):
                job.cancel()
        payload.unlink(missing_ok=True)
    return failures


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- progress
class Display:
    """Progress of a notebook's runs: tqdm bars (widgets in JupyterLab), or text lines when headless.
    Runs are keyed by ``_Run.key`` (store folder, name) and shown by name."""

    def __init__(self, notebook: str, runs: list, pending: list, how: Execution, bars: bool = True):
        self.notebook, self.how = notebook, how
        self.total, self.pending = len({r.key for r in runs}), {r.key: r for r in pending}
        self.done = self.total - len(pending)
        self.failed = 0
        self.start = time.monotonic()
        self.work = {}  # key -> (steps done when this training started, steps done now)
        self.bars = {}
        self.epochs_told = {}
        self.file = os.environ.get(HEADLESS_ENV)
        self.headless = headless()
        self.overall = None
        if how.executor != "local":
            where = f"{how.executor}: one job per run"
        else:
            where = f"{how.jobs} worker processes" if how.jobs > 1 else "one at a time in this process"
            where += f", {how.threads} torch thread(s) each"
        if pending:
            self._line(f"{notebook}: {_plural(self.total, 'run')}, {self.done} stored, {len(pending)} to train "
                       f"({where})", notebook_too=True)
        if pending and bars and not self.headless:
            from tqdm.auto import tqdm

            self.overall = tqdm(total=self.total, initial=self.done, desc=f"{notebook} runs", unit="run")

    def started(self, key: tuple, where: str = "") -> None:
        name = self.pending[key].name
        self._line(f"{name}: started{' (' + where + ')' if where else ''}")
        if self.overall is not None:
            from tqdm.auto import tqdm

            self.bars[key] = tqdm(total=self.pending[key].steps, desc=name, unit="step", leave=False, mininterval=1.0)

    def update(self, key: tuple, info: dict) -> None:
        self.work[key] = (info.get("start_step", info["step"]), info["step"])
        bar = self.bars.get(key)
        if bar is not None:
            bar.update(info["step"] - bar.n)
            bar.set_postfix_str(f"epoch {info['epoch']}/{info['epochs']}" + _metrics(info), refresh=False)
        if self.headless and info["epoch"] > self.epochs_told.get(key, 0):  # a line per finished epoch
            self.epochs_told[key] = info["epoch"]
            self._line(f"{self.pending[key].name}: epoch {info['epoch']}/{info['epochs']}{_metrics(info)}  "
                       f"[{self._summary()}]")

    def finished(self, key: tuple, error: str = "") -> None:
        bar = self.bars.pop(key, None)
        if bar is not None:
            bar.close()
        r = self.pending[key]
        self.work[key] = (self.work.get(key, (0, 0))[0], r.steps)
        if error:
            self.failed += 1
            self._line(f"{r.name}: FAILED: {error}", notebook_too=True)
        else:
            self.done += 1
            self._line(f"{r.name}: done  [{self._summary()}]", notebook_too=self.headless)
        if self.overall is not None:
            self.overall.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.overall is not None:
            self.overall.close()

    def _summary(self) -> str:
        text = f"runs {self.done}/{self.total} done" + (f", {self.failed} failed" if self.failed else "")
        eta = self.eta()
        return text + (f", ETA {_duration(eta)}" if eta is not None else "")

    def eta(self) -> Optional[float]:
        """Seconds left: the steps still to train over the rate at which this call has trained them."""
        trained = sum(now - first for first, now in self.work.values())
        elapsed = time.monotonic() - self.start
        if trained <= 0 or elapsed < 1:
            return None
        remaining = sum(r.steps - self.work.get(key, (0, 0))[1] for key, r in self.pending.items())
        return max(0.0, remaining) * elapsed / trained

    def _line(self, text: str, notebook_too: bool = False) -> None:
        if self.file:
            with open(self.file, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        if notebook_too or (self.headless and not self.file):
            print(text, flush=True)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _metrics(info: dict) -> str:
    return "".join(f", {k} {v:.4g}" for k, v in info.get("metrics", {}).items())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# A local worker's entry: it asks to die with its parent (Linux's PR_SET_PDEATHSIG) before the slow imports, so
# that a kernel killed outright (SIGKILL, a crash: no ``finally`` runs) takes its workers with it instead of
# leaving them training unseen; a worker's checkpoint stays and its lock goes with it. Then it trains its job.
WORKER = """
import ctypes, os, signal, sys
parent = int(os.environ["LOSSGRAD_PARENT_PID"])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux; elsewhere it fails)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:  # the parent died before prctl
    sys.exit(1)
from companion.runner import work
work(sys.argv[1])
"""


def work(job_file: str) -> None:
    """Trains the job pickled in ``job_file`` (a local worker; see ``WORKER``)."""
    import cloudpickle

    with open(job_file, "rb") as handle:
        job = cloudpickle.load(handle)
    Path(job_file).unlink(missing_ok=True)
    train_one(job)


train.register_executor(run_all)  # Experiment.run / run_all train through here; train never imports this module
