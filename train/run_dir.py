"""The run directory's guards: one trainer at a time (`RunLock`), and one configuration per directory
(`check_run_dir`).

The lock is `train.lock` in the run directory, held with `flock` for as long as the trainer runs and holding
{"host", "pid", "since"} so that a refused trainer can name the holder. The kernel drops the lock when its process
dies, however it dies: a lock file left by a dead process (a stale lock) is simply taken over. On a file system
without `flock`, the file's contents decide: a live process on this host, or any process on another host (whose
liveness cannot be checked from here), holds it; a dead process on this host does not."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from train.config import RunConfig

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunDirInUse(RuntimeError):
    """Another trainer holds the run directory's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "one that is just starting"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{since}"


class RunLock:
    """An exclusive lock on run directory `directory` (created if missing). `acquire` raises RunDirInUse naming the
    holder; use as a context manager or call `release`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def _read(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict[str, Any]) -> RunDirInUse:
        return RunDirInUse(f"{self.directory} is in use by another trainer ({_describe(holder)}); wait for it to "
                           f"finish, stop it, or use another --out")

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._read()) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = self._read()  # no flock here: the contents decide
                if holder and (holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", 0)))):
                    os.close(fd)
                    raise self._refuse(holder) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # a releasing holder unlinked the file between our open and our lock: try again
        previous = self._read()
        if previous.get("pid"):
            log.warning("taking over the stale lock of %s (that trainer is no longer running)", _describe(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go (unlink first, so no one can lock the file being removed)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


FREE_ON_RESUME = frozenset({"extend_steps"})  # train fields a resume may change: they leave every step's math alone


def check_run_dir(out: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run directory that holds a run with a different configuration. The mesh may differ:
    it changes how the run is spread, not what it computes; so may `train.extend_steps` (the steps past the
    schedule's end, all at its final learning rate). `train.steps` may not: it is the cosine schedule's length,
    so changing it changes every step's learning rate (the refusal points to --extend)."""
    saved = out / "config.json"
    if not saved.exists():
        return
    old = RunConfig.from_dict(json.loads(saved.read_text()))
    changed = [(section, k, v, getattr(getattr(cfg, section), k)) for section in ("model", "train")
               for k, v in getattr(old, section).__dict__.items()
               if getattr(getattr(cfg, section), k) != v and not (section == "train" and k in FREE_ON_RESUME)]
    if changed:
        diffs = "; ".join(f"{section}.{k}: {v!r} -> {new!r}" for section, k, v, new in changed)
        hint = ""
        if any(section == "train" and k == "steps" for section, k, _, _ in changed):
            hint = (f"; train.steps is the length of the learning-rate schedule: to train on past step "
                    f"{old.train.steps} at its final rate keep --steps {old.train.steps} and add --extend N "
                    f"(N more steps; = --set train.extend_steps=N)")
        raise ValueError(f"{out} holds a run with a different config ({diffs}); "
                         f"use a new --out, or the same settings to resume it{hint}")
