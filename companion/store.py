"""The run store: each finished run on disk under its identity, loaded instead of trained on a rerun.

* :class:`RunStore` writes each finished run to disk at once (atomically) and returns it on a rerun made
  with the same identity; an exclusive lock per run keeps two processes from training the same run.
* :func:`config_digest`, :func:`tensors_digest` and :func:`identity_changes`: the digests that key stored
  runs, and what changed when a stored run no longer matches.
* ``$LOSSGRAD_STORED_ONLY=1`` turns a run that would train into :class:`StoredRunMissing` (a dry check that
  re-executing a notebook only loads).

The lowest layer of the run machinery: ``store`` <- ``train`` <- ``runner`` <- notebooks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import fcntl  # run locks (POSIX)
except ImportError:  # pragma: no cover - Windows: runs are not locked
    fcntl = None

from . import profiles
from .data import atomic_save

# Set to 1, a run that is not stored under its identity raises StoredRunMissing instead of training: a
# dry check that re-executing a notebook only loads (see RunStore.get).
STORED_ONLY_ENV = "LOSSGRAD_STORED_ONLY"


class StoredRunMissing(RuntimeError):
    """``$LOSSGRAD_STORED_ONLY`` is set and a run would be trained (it is absent, or its identity changed)."""


class RunStore:
    """Finished runs of one notebook and profile, one file each, under ``runs/<tag>/<notebook>/``.

    ``store.get(name, config, compute)`` returns the stored result when one with the same
    config exists, else calls ``compute(checkpoint_path)``, writes its result, removes the
    checkpoint and returns it."""

    def __init__(self, notebook: str, profile: str, overrides: Optional[dict] = None, root: Optional[Path] = None):
        self.dir = Path(root or profiles.runs_dir()) / profiles.results_tag(profile, overrides) / notebook
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        if not name or any(ch in name for ch in "/\\"):
            raise ValueError(f"a run name must be a non-empty file name, got {name!r}")
        return self.dir / f"{name}.pt"

    def lookup(self, name: str, config: dict) -> Optional[dict]:
        """The stored result of run ``name`` when it was made with this ``config``, else None."""
        path = self.path(name)
        if path.exists():
            result = torch.load(path, weights_only=False)
            if result.get("config_digest") == config_digest(config):
                return result
        return None

    def why_missing(self, name: str, config: dict) -> str:
        """Why run ``name`` is not stored under ``config`` (absent, or which entries of its identity changed)."""
        path = self.path(name)
        if not path.exists():
            return "it is not stored"
        old = torch.load(path, weights_only=False)
        return "its identity changed since it was stored: " + identity_changes(old.get("config", {}), config)

    def get(self, name: str, config: dict, compute: Callable[[Path], dict]) -> dict:
        """Under the run's lock: two processes (workers, notebooks) never train the same run; the
        second waits and then loads what the first stored."""
        with self.lock(name):
            return self._get(name, config, compute)

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive lock on run ``name`` held while the block runs (an advisory ``flock`` on a file
        beside the result; the system releases it when the process dies, so a crash leaves no stale lock)."""
        if fcntl is None:
            yield
            return
        with open(self.dir / f".{self.path(name).stem}.lock", "a") as handle:
            lock = _lock_exclusively(handle, name)
            try:
                yield
            finally:
                lock(handle, fcntl.LOCK_UN)

    def _get(self, name: str, config: dict, compute: Callable[[Path], dict]) -> dict:
        path, digest = self.path(name), config_digest(config)
        why = "it is not stored"
        if path.exists():
            result = torch.load(path, weights_only=False)
            if result.get("config_digest") == digest:
                return result
            why = "its identity changed since it was stored: " + identity_changes(result.get("config", {}), config)
            print(f"{name}: {why}; running it again")
        if os.environ.get(STORED_ONLY_ENV) == "1":
            raise StoredRunMissing(f"{self.dir / name}: {why}; ${STORED_ONLY_ENV}=1 forbids training it")
        checkpoint = path.with_suffix(f".{digest}.ckpt")
        result = compute(checkpoint)
        result.update(name=name, config=config, config_digest=digest)
        atomic_save(result, path)
        checkpoint.unlink(missing_ok=True)
        return result


def _lock_exclusively(handle, name: str):
    """Takes an exclusive lock on ``handle``, waiting (and saying so) while another process holds it; returns
    the locking function used: ``flock``, or POSIX record locks on filesystems without it (Lustre, some NFS)."""
    for lock in (fcntl.flock, fcntl.lockf):
        try:
            lock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                continue  # this kind of lock is not supported here
            print(f"{name}: another process is training it; waiting for it to finish", flush=True)
            lock(handle, fcntl.LOCK_EX)
            return lock
    raise OSError(f"{name}: no file locking works in {os.path.dirname(handle.name)}")


def identity_changes(old: dict, new: dict) -> str:
    """The entries of a run's identity that differ, as ``key: old -> new`` (for messages)."""
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
                     for k in keys if old.get(k) != new.get(k)) or "(none)"


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tensors_digest(tensors, extra=None) -> str:
    """sha256 (first 16 hex digits) of tensors' dtypes, shapes and bytes, plus ``extra`` (JSON)."""
    h = hashlib.sha256(json.dumps(extra, default=str).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
