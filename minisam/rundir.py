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
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field

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
    """Append one record; strict JSON (a NaN is an error here, never a bare ``NaN``)."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.write(line)


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
    replica_carry: list = field(default_factory=list)   # a variant's per-replica state
                                                        # (LookSAM's g_v); [] if none

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
    for r, c in enumerate(ck.replica_carry):
        arrays.update({f"replica_carry/{r}/{k}": to_numpy(v) for k, v in c.items()})
    meta = dict(ck.meta, format=CHECKPOINT_FORMAT, saved_replica_states=len(ck.replica_states),
                saved_replica_carry=len(ck.replica_carry))
    blob = np.array(json.dumps(meta, sort_keys=True, allow_nan=False))
    atomic_write(os.path.join(run_dir, CHECKPOINT_FILE),
                 lambda f: np.savez(f, __meta__=blob, **arrays))
    atomic_write(os.path.join(run_dir, CHECKPOINT_META),
                 (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def read_npz(path: str, what: str) -> dict:
    """Every array of the .npz at ``path`` ("a minisam checkpoint", "a reference case"):
    one clear ValueError for a file that is not an .npz, is truncated or corrupt, holds
    objects, or declares an array larger than the bytes it holds (never a huge allocation)."""
    def bad(why):
        return ValueError(f"{path!r} is not {what}: {why}")
    if not zipfile.is_zipfile(path):
        raise bad("not an .npz (zip) file")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = header(f)
                    need = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or need > info.file_size:
                        raise bad(f"member {name!r} declares {dtype} {shape} ({need} bytes) "
                                  f"but holds {info.file_size} bytes")
                with zf.open(info) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except ValueError as e:
        raise e if str(e).startswith(repr(path)) else bad(f"corrupt ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise bad(f"truncated or corrupt ({e})") from None
    return arrays


# Checkpoint metadata: key -> (type, lowest value), checked on load.
META_FIELDS = {"step": (int, 0), "epoch": (int, 0), "step_in_epoch": (int, 0),
               "steps_per_epoch": (int, 1), "saved_replica_states": (int, 0),
               "elapsed_s": ((int, float), 0), "epoch_sums": (dict, None),
               "config": (dict, None)}


def _check_meta(meta, arrays: dict, path: str) -> dict:
    def bad(why):
        return ValueError(f"{path!r} is not a usable minisam checkpoint: {why}")
    if not isinstance(meta, dict):
        raise bad("its metadata is not a JSON object")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise bad(f"checkpoint format {meta.get('format')!r}, this minisam reads format "
                  f"{CHECKPOINT_FORMAT}")
    for key, (kind, low) in META_FIELDS.items():
        v = meta.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or (low is not None and v < low):
            raise bad(f"metadata field {key!r} is {v!r}")
    try:
        cfg = TrainConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise bad(f"its config: {e}") from None
    spe, step, epoch, pos = (meta[k] for k in ("steps_per_epoch", "step", "epoch",
                                               "step_in_epoch"))
    if pos > spe or epoch > cfg.epochs or step != epoch * spe + pos:
        raise bad(f"position epoch {epoch}, step {pos} of {spe}, global step {step} is "
                  f"inconsistent (a run of {cfg.epochs} epochs)")
    if not all(isinstance(meta["epoch_sums"].get(k), (int, float)) for k in ("steps",)):
        raise bad("metadata field 'epoch_sums' lacks its step count")
    if not any(k.startswith("params/") for k in arrays) or \
            {k[7:] for k in arrays if k.startswith("params/")} != \
            {k[9:] for k in arrays if k.startswith("momentum/")}:
        raise bad("its parameter and momentum arrays do not match")
    return meta


def load_checkpoint(path: str) -> Checkpoint:
    """Load ``checkpoint.npz`` (or the run directory that holds one), checked."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}; a run directory holds "
                                f"{CHECKPOINT_FILE} after its first epoch")
    arrays = read_npz(path, "a minisam checkpoint")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, ValueError):
        raise ValueError(f"{path!r} is not a usable minisam checkpoint: no readable "
                         "metadata") from None
    meta = _check_meta(meta, arrays, path)

    def group(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    n, c = meta["saved_replica_states"], meta.get("saved_replica_carry", 0)
    return Checkpoint(group("params/"), group("state/"), group("momentum/"),
                      [group(f"replica_state/{r}/") for r in range(n)], meta,
                      [group(f"replica_carry/{r}/") for r in range(c)])
