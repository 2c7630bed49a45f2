"""The run directory: the one place that knows its files and their format.

    config.json      the config it ran with, dataset sizes, steps per epoch, augmentation
    metrics.jsonl    one JSON object per epoch, appended
    checkpoint.npz   parameters, BN state averaged over replicas, momentum, every replica's
                     own BN state (for exact resume), and the JSON metadata (``__meta__``)
    checkpoint.json  a readable copy of that metadata
    .lock            held (``fcntl.flock``) by the one process that trains in the directory

config.json and the checkpoint files are written atomically (a temporary file, fsynced, then
``os.replace``d), so a crash at any moment leaves the previous version loadable and at most
a stray ``.tmp-*`` file; metrics.jsonl is appended one line per epoch (a torn last line is
skipped on reading). ``rewind`` clears both kinds of leftover when a run is resumed.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass

import numpy as np

from .backend import to_numpy
from .config import TrainConfig

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"
CHECKPOINT_FILE, CHECKPOINT_META = "checkpoint.npz", "checkpoint.json"
CHECKPOINT_FORMAT = 1
LOCK_FILE = ".lock"
_replace = os.replace  # tests inject a crash here


def atomic_write(path: str, data):
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``path``
    through a temporary file, fsync, then replace.

    A crash before the replace leaves the old file untouched; ``os.replace`` is atomic on
    POSIX and Windows; the directory is fsynced too, so the rename itself is durable."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class RunLock:
    """An exclusive lock on a run directory, so that two processes never train in one: an
    ``fcntl.flock`` on ``RUN_DIR/.lock``, which holds the owner's pid. The kernel drops it
    when the process ends, however it ends (even ``kill -9``), so a stale lock cannot stay."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, LOCK_FILE), "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ValueError(f"{run_dir!r} is in use by another minisam process (pid {holder}); "
                             "wait for it to finish, or choose another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self):
        if self._file is not None:
            self._file.close()      # closing the descriptor drops the flock
            self._file = None


def is_run(run_dir: str) -> bool:
    """True if ``run_dir`` holds a run (its config.json), finished or not."""
    return os.path.isfile(os.path.join(run_dir, CONFIG_FILE))


def start_run(run_dir: str, info: dict):
    """Make ``run_dir`` a new run: config.json holds ``info``, metrics.jsonl starts empty.
    Refuses a directory that already holds a run, and one that holds anything else."""
    if is_run(run_dir) or os.path.exists(os.path.join(run_dir, CHECKPOINT_FILE)):
        raise ValueError(f"{run_dir!r} already holds a run; resume it (--resume) or choose "
                         "another output directory (--out)")
    others = sorted(set(os.listdir(run_dir)) - {LOCK_FILE}) if os.path.isdir(run_dir) else []
    if others:
        raise ValueError(f"{run_dir!r} is not empty and holds no run ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); a new run needs an empty or "
                         "new directory: choose another --out")
    os.makedirs(run_dir, exist_ok=True)
    atomic_write(os.path.join(run_dir, CONFIG_FILE), (json.dumps(info, indent=2) + "\n").encode())
    open(os.path.join(run_dir, METRICS_FILE), "w").close()


def read_config(run_dir: str) -> dict:
    """The ``config`` object of ``run_dir/config.json`` (the TrainConfig fields)."""
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        return json.load(f)["config"]


def append_metrics(run_dir: str, record: dict):
    with open(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir!r}; is it a minisam run directory?")
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def rewind(run_dir: str, epochs_done: int):
    """Prepare ``run_dir`` to continue from a checkpoint taken after ``epochs_done`` epochs:
    drop metrics records written after it (a crash in between) and stale temporaries."""
    if os.path.exists(os.path.join(run_dir, METRICS_FILE)):
        keep = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= epochs_done]
        atomic_write(os.path.join(run_dir, METRICS_FILE),
                     "".join(json.dumps(r) + "\n" for r in keep).encode())
    for name in os.listdir(run_dir):
        if ".tmp-" in name:
            os.remove(os.path.join(run_dir, name))


@dataclass
class Checkpoint:
    params: dict
    state: dict            # BN state averaged over replicas (for evaluation)
    momentum: dict
    replica_states: list   # every replica's own BN state (exact resume); [] if not saved
    meta: dict

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.meta["config"])


def save_checkpoint(run_dir: str, ck: Checkpoint):
    """Write ``ck`` (arrays on any device) to ``run_dir/checkpoint.npz`` and its metadata to
    ``checkpoint.json``, each atomically."""
    arrays = {f"{part}/{k}": to_numpy(v) for part in ("params", "state", "momentum")
              for k, v in getattr(ck, part).items()}
    for r, s in enumerate(ck.replica_states):
        arrays.update({f"replica_state/{r}/{k}": to_numpy(v) for k, v in s.items()})
    meta = dict(ck.meta, format=CHECKPOINT_FORMAT, saved_replica_states=len(ck.replica_states))
    blob = np.array(json.dumps(meta, sort_keys=True))
    atomic_write(os.path.join(run_dir, CHECKPOINT_FILE),
                 lambda f: np.savez(f, __meta__=blob, **arrays))
    atomic_write(os.path.join(run_dir, CHECKPOINT_META),
                 (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def load_checkpoint(path: str) -> Checkpoint:
    """Load ``checkpoint.npz`` (or the run directory that holds one)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}; a run directory holds "
                                f"{CHECKPOINT_FILE} after its first epoch")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable minisam checkpoint ({e})") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r}: checkpoint format {meta.get('format')!r}, this minisam "
                         f"reads format {CHECKPOINT_FORMAT}")

    def group(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    n = int(meta.get("saved_replica_states", 0))
    return Checkpoint(group("params/"), group("state/"), group("momentum/"),
                      [group(f"replica_state/{r}/") for r in range(n)], meta)
