"""Training for real: epochs of SAM (or SGD, rho = 0), evaluation, metrics, checkpoints, resume.

Mirrors sam_jax ``flax_training.train`` / ``train_for_one_epoch`` / ``eval_on_dataset``:

* the learning rate follows ``get_cosine_schedule`` per step, with
  steps_per_epoch = floor(num_train / global_batch) (the remainder is dropped);
* each step is ``sam.train_step`` on every replica's slice of the global batch; on the CPU,
  ``replicas=R`` runs R threads (``parallel.run_replicas``), each with its own model instance
  and its own BN running statistics, exactly like ``jax.pmap`` replicas;
* after every epoch the test set is evaluated with ``sam.eval_step`` using the BN state
  averaged over replicas (the JAX ``eval_step`` pmeans the state) and replica 0's parameters
  (all replicas hold the same ones);
* the trainer keeps replica 0's parameters and momentum and the averaged BN state for
  evaluation and checkpoints, like ``save_checkpoint`` (``x[0]`` / ``mean(x, axis=0)``).

What the JAX code does not have, and why:

* **Exact resume.** Every random choice is a function of (seed, epoch, step)
  (``data.loader``), nothing else holds random state, and a checkpoint stores the
  parameters, momentum, every replica's BN state, the position (epoch, step) and the epoch's
  running metric sums. On the CPU a resumed run therefore ends with parameters bitwise equal
  to an uninterrupted run (tested). The JAX code reshuffles with tf.data and restarts from
  the averaged BN state, so its resumed runs differ.
* **Atomic checkpoints.** ``checkpoint.npz`` is written to a temporary file, fsynced, then
  ``os.replace``-d: a crash at any moment leaves the previous checkpoint loadable.
* **Non-finite loss.** A NaN or inf loss, gradient norm or parameter norm stops the run with
  ``NonFiniteLossError`` before anything is written, so the last good checkpoint survives.
* **Ctrl-C.** ``KeyboardInterrupt`` saves a checkpoint at the last completed step (parameters
  are only replaced once a whole step has finished) and raises ``TrainingInterrupted``;
  ``resume`` continues from that step, still bitwise exact.

Files in a run directory: ``config.json`` (the config it ran with, dataset sizes),
``metrics.jsonl`` (one JSON object per epoch), ``checkpoint.npz`` (arrays, with the
checkpoint's JSON metadata embedded) and ``checkpoint.json`` (a readable copy of that
metadata).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import __version__
from .backend import DEVICES, get_xp, to_numpy, tree_to_device, xp_for
from .data import DATASETS, SOURCES, Augment, Loader, default_augment, load_dataset
from .models import parse_wrn_name, wide_resnet
from .optim import constant_schedule, cosine_schedule, nesterov_init
from .parallel import run_replicas
from .sam import SAMConfig, eval_step, train_step

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"
CHECKPOINT_FILE, CHECKPOINT_META = "checkpoint.npz", "checkpoint.json"
CHECKPOINT_FORMAT = 1
# Per-step metrics of sam.train_step, moved to the host together once per step.
STEP_METRICS = ("train_loss", "train_error_rate", "gradient_norm", "param_norm")


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient or parameter norm) became NaN or inf; nothing was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was saved at the last completed step; ``str(e)`` says where."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Saved in config.json and in every checkpoint.

    Defaults follow the JAX code's flags where it has them (lr 0.1, clipping 5.0, momentum
    0.9, cosine schedule, basic augmentation) and the paper's WRN settings otherwise
    (weight decay 5e-4; the JAX flag default is 1e-3).
    """
    dataset: str = "cifar10"
    data_dir: str | None = None
    data_source: str = "auto"          # CIFAR: "auto", "archive" or "tfds"
    image_size: int | None = None      # digits only (default 16)
    validation: bool = False           # evaluate on the last 10% of train instead of test
    model: str = "wrn28_10"
    epochs: int = 200
    batch_size: int = 128              # global batch, split evenly over replicas
    lr: float = 0.1
    schedule: str = "cosine"           # or "constant"
    weight_decay: float = 5e-4
    rho: float = 0.05                  # 0 = SGD
    label_smoothing: float = 0.0
    gradient_clipping: float = 5.0     # 0 disables
    momentum: float = 0.9
    sync_perturbations: bool = False
    crop: int | None = None            # reflect padding before the crop; None: dataset default
    flip: bool | None = None           # None: dataset default
    cutout: int = 0                    # side of the cutout square (JAX: 16); 0 = off
    label_noise: float = 0.0           # symmetric noise on the training labels
    seed: int = 0
    replicas: int = 1
    device: str = "cpu"
    eval_batch_size: int | None = None  # None: batch_size

    def __post_init__(self):
        def bad(name, what):
            raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        if self.data_source not in SOURCES:
            raise ValueError(f"unknown data source {self.data_source!r}; expected one of {SOURCES}")
        parse_wrn_name(self.model)  # ValueError with the accepted names
        for name in ("epochs", "batch_size", "replicas"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                bad(name, "a positive integer")
        if self.eval_batch_size is not None and (not isinstance(self.eval_batch_size, int)
                                                 or self.eval_batch_size < 1):
            bad("eval_batch_size", "a positive integer or None")
        if self.batch_size % self.replicas:
            raise ValueError(f"batch size {self.batch_size} is not divisible by replicas="
                             f"{self.replicas}; each replica takes batch_size / replicas "
                             "examples, so pick a multiple of the replica count")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "a positive finite number")
        for name in ("rho", "weight_decay", "gradient_clipping"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(name, ">= 0 and finite")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "in [0, 1)")
        if not 0 <= self.momentum < 1:
            bad("momentum", "in [0, 1)")
        if not 0 <= self.label_noise <= 1:
            bad("label_noise", "in [0, 1]")
        if self.schedule not in ("cosine", "constant"):
            bad("schedule", "'cosine' or 'constant'")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {DEVICES}")
        if not isinstance(self.cutout, int) or self.cutout < 0:
            bad("cutout", "a non-negative integer")
        for name in ("crop", "image_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(name, "a non-negative integer or None")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            bad("seed", "an integer in [0, 2**32)")

    def sam_config(self) -> SAMConfig:
        return SAMConfig(rho=self.rho, weight_decay=self.weight_decay,
                         label_smoothing=self.label_smoothing,
                         gradient_clipping=self.gradient_clipping,
                         sync_perturbations=self.sync_perturbations, momentum=self.momentum)

    def augment(self) -> Augment:
        """The dataset's basic augmentation (``data.default_augment`` without cutout: the
        JAX code's ``image_level_augmentations='basic'``, ``batch_level='none'``), with the
        crop/flip overrides, plus cutout of side ``cutout`` if > 0."""
        base = default_augment(self.dataset, cutout_size=0)
        return Augment(crop_pad=base.crop_pad if self.crop is None else self.crop,
                       flip=base.flip if self.flip is None else self.flip, cutout=self.cutout)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------
# Checkpoints: one .npz written atomically, its metadata embedded (and copied to .json).

def _atomic_write(path: str, write):
    """Write ``path`` through ``write(fileobj)`` into a temporary file, fsync, then replace.

    A crash before the replace leaves the old file untouched (and a stray ``.tmp-*`` file
    that loaders ignore); ``os.replace`` is atomic on POSIX and Windows."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_replace = os.replace  # tests inject a crash here


def save_checkpoint(path: str, arrays: dict, meta: dict):
    """Atomically write arrays (flat dict of NumPy arrays) plus JSON ``meta`` to ``path``."""
    blob = json.dumps(meta, sort_keys=True)

    def write(f):
        np.savez(f, __meta__=np.array(blob), **arrays)
    _atomic_write(path, write)
    side = os.path.splitext(path)[0] + ".json"
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(side, lambda f: f.write(text.encode()))


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


def _mean_trees(trees: list) -> dict:
    """Mean over replicas, summed in rank order (the same order as ThreadComm)."""
    if len(trees) == 1:
        return trees[0]
    out = {}
    for k in trees[0]:
        acc = trees[0][k]
        for t in trees[1:]:
            acc = acc + t[k]
        out[k] = acc / len(trees)
    return out


# ---------------------------------------------------------------------------------------

class Trainer:
    """Train one model with SAM or SGD; see the module docstring for what it mirrors.

    config:   a ``TrainConfig``.
    out_dir:  the run directory (config.json, metrics.jsonl, checkpoint.npz); None keeps
              everything in memory (no checkpoints).
    comm:     None: ``config.replicas`` thread replicas in this process. Otherwise an
              external communicator (``rank``, ``size``, ``allreduce_mean(dict)``,
              ``barrier()``; e.g. NCCL, one process per GPU): this process is replica
              ``comm.rank`` of ``comm.size``, and only rank 0 writes files and shows the
              progress bar. ``config.replicas`` must equal ``comm.size`` (1 is taken to
              mean "whatever comm says").
    resume:   continue the run in ``out_dir`` from its checkpoint (the saved config is used;
              ``config`` may be None or must match it).
    max_steps: stop (with a checkpoint) once this many global steps are done; the schedule
              still spans ``config.epochs``. For smoke tests and for splitting a run.
    data:     optional (train, test) ``Dataset`` pair instead of loading ``config.dataset``
              (label noise is still applied); a resumed run must be given the same data.
    """

    def __init__(self, config: TrainConfig | None = None, out_dir: str | None = None, *,
                 comm=None, resume: bool = False, max_steps: int | None = None,
                 progress: bool = True, data=None):
        ckpt = None
        if resume:
            if out_dir is None:
                raise ValueError("resume needs the run directory (out_dir) to continue")
            ckpt = load_checkpoint(out_dir)
            saved = ckpt.config
            if config is not None and config != saved:
                diff = {f.name: (getattr(saved, f.name), getattr(config, f.name))
                        for f in dataclasses.fields(TrainConfig)
                        if getattr(saved, f.name) != getattr(config, f.name)}
                raise ValueError(f"resume continues {out_dir!r} with its saved config; these "
                                 f"fields differ (saved, given): {diff}")
            config = saved
        if config is None:
            raise ValueError("Trainer needs a TrainConfig (or resume=True with a run directory)")
        if comm is not None and comm.size != config.replicas:
            if config.replicas != 1:
                raise ValueError(f"config.replicas={config.replicas} but the communicator has "
                                 f"{comm.size} ranks; they must agree")
            config = dataclasses.replace(config, replicas=comm.size)
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
            raise ValueError(f"max_steps must be a non-negative integer or None, got {max_steps!r}")
        self.cfg, self.out_dir, self.comm = config, out_dir, comm
        self.max_steps, self.rank = max_steps, (comm.rank if comm is not None else 0)
        # MINISAM_QUIET=1: set by minisam.launch on every rank but 0
        self.progress = progress and self.rank == 0 and os.environ.get("MINISAM_QUIET") != "1"
        self.R = config.replicas
        xp_for(config.device)  # fail early if the GPU is unusable

        train, test = data if data is not None else load_dataset(
            config.dataset, config.data_dir, config.data_source, config.image_size,
            config.validation)
        self.clean_train = train
        if config.label_noise > 0:
            train = train.with_label_noise(config.label_noise, seed=config.seed)
        self.train_data, self.test_data = train, test
        self.loader = Loader(train, config.batch_size, train=True, augment=config.augment(),
                             seed=config.seed, device=config.device,
                             replicas=self.R if self.R > 1 else None)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.lr_fn = (cosine_schedule(config.lr, config.epochs, self.steps_per_epoch)
                      if config.schedule == "cosine" else constant_schedule(config.lr))
        self.sam_cfg = config.sam_config()

        n_models = 1 if (comm is not None or self.R == 1) else self.R
        self.models = [wide_resnet(config.model, num_outputs=train.num_classes,
                                   in_channels=train.image_shape[-1], seed=config.seed)
                       for _ in range(n_models)]
        self.params = tree_to_device(self.models[0].get_params(), config.device)
        self.states = [tree_to_device(self.models[0].get_state(), config.device)
                       for _ in range(n_models)]
        self.momentum = nesterov_init(self.params)
        self.step = self.epoch = self.step_in_epoch = 0
        self._sums = self._zero_sums()
        self.last_record: dict | None = None
        self.elapsed = 0.0
        if ckpt is not None:
            self._restore(ckpt)
        else:
            if comm is not None and comm.size > 1 and hasattr(comm, "broadcast"):
                self.params = comm.broadcast(self.params, 0)  # everyone starts from rank 0's
            if out_dir is not None and self.rank == 0:
                self._start_run_dir()

    # -- run directory ------------------------------------------------------------------
    def _start_run_dir(self):
        d = self.out_dir
        started = os.path.exists(os.path.join(d, METRICS_FILE)) and read_metrics(d)
        if os.path.exists(os.path.join(d, CHECKPOINT_FILE)) or started:
            raise ValueError(f"{d!r} already holds a run; resume it (--resume) or choose "
                             "another output directory (--out)")
        os.makedirs(d, exist_ok=True)
        info = {"config": asdict(self.cfg), "minisam_version": __version__,
                "num_train": len(self.train_data), "num_test": len(self.test_data),
                "test_split": self.test_data.split,
                "image_shape": list(self.train_data.image_shape),
                "num_classes": self.train_data.num_classes, "steps_per_epoch": self.steps_per_epoch,
                "num_params": self.models[0].num_params(),
                "augment": asdict(self.cfg.augment())}
        _atomic_write(os.path.join(d, CONFIG_FILE),
                      lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
        open(os.path.join(d, METRICS_FILE), "w").close()

    def _restore(self, ck: Checkpoint):
        dev = self.cfg.device
        self.params = tree_to_device(ck.params, dev)
        self.momentum = tree_to_device(ck.momentum, dev)
        n = len(self.states)
        if len(ck.replica_states) == n:
            self.states = [tree_to_device(s, dev) for s in ck.replica_states]
        else:  # e.g. one process per GPU: every replica restarts from the mean (as in JAX)
            self.states = [tree_to_device(ck.state, dev) for _ in range(n)]
        m = ck.meta
        self.step, self.epoch, self.step_in_epoch = m["step"], m["epoch"], m["step_in_epoch"]
        self._sums, self.last_record = dict(m["epoch_sums"]), m.get("last_record")
        self.elapsed = m.get("elapsed_s", 0.0)
        if self.rank == 0:  # drop records written after this checkpoint (a crash in between)
            path = os.path.join(self.out_dir, METRICS_FILE)
            if os.path.exists(path):
                keep = [r for r in read_metrics(self.out_dir) if r.get("epoch", 0) <= self.epoch]
                _atomic_write(path, lambda f: f.write("".join(
                    json.dumps(r) + "\n" for r in keep).encode()))
            for name in os.listdir(self.out_dir):  # stale temporaries of a killed writer
                if ".tmp-" in name:
                    os.remove(os.path.join(self.out_dir, name))

    def _log(self, record: dict):
        if self.out_dir is not None and self.rank == 0:
            with open(os.path.join(self.out_dir, METRICS_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- state --------------------------------------------------------------------------
    def _zero_sums(self):
        return {k: 0.0 for k in STEP_METRICS} | {"steps": 0}

    def eval_state(self) -> dict:
        """BN running statistics averaged over replicas (the JAX eval_step's pmean)."""
        if self.comm is not None and self.comm.size > 1:
            return self.comm.allreduce_mean(self.states[0])
        return _mean_trees(self.states)

    def checkpoint_arrays(self, eval_state: dict | None = None) -> dict:
        eval_state = self.eval_state() if eval_state is None else eval_state
        arrays = {"params/" + k: to_numpy(v) for k, v in self.params.items()}
        arrays.update({"state/" + k: to_numpy(v) for k, v in eval_state.items()})
        arrays.update({"momentum/" + k: to_numpy(v) for k, v in self.momentum.items()})
        if len(self.states) > 1:
            for r, s in enumerate(self.states):
                arrays.update({f"replica_state/{r}/{k}": to_numpy(v) for k, v in s.items()})
        return arrays

    def save(self, collective: bool = True):
        """Checkpoint the current step boundary (a no-op without a run directory).

        With an external communicator every rank must call it (the BN mean is a
        collective) and rank 0 writes. ``collective=False`` (Ctrl-C, when the ranks may not
        be at the same point) skips the collective: rank 0 saves its own BN state as
        ``state``."""
        external = self.comm is not None and self.comm.size > 1
        if external and not collective:
            if self.out_dir is None or self.rank != 0:
                return
            arrays = self.checkpoint_arrays(eval_state=self.states[0])
        else:
            arrays = self.checkpoint_arrays()
        if self.out_dir is None or self.rank != 0:
            return
        meta = {"format": CHECKPOINT_FORMAT, "minisam_version": __version__,
                "config": asdict(self.cfg), "step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
                "epoch_sums": self._sums, "last_record": self.last_record,
                "elapsed_s": self.elapsed,
                "saved_replica_states": len(self.states) if len(self.states) > 1 else 0,
                # No generator state to save: order and augmentation are drawn from
                # default_rng([seed, 0, epoch]) and default_rng([seed, 1, epoch, step]).
                "rng": {"seed": self.cfg.seed, "epoch": self.epoch,
                        "step_in_epoch": self.step_in_epoch,
                        "label_noise_seed": self.cfg.seed}}
        save_checkpoint(os.path.join(self.out_dir, CHECKPOINT_FILE), arrays, meta)

    # -- one step -----------------------------------------------------------------------
    def _train_step(self, batch, lr):
        """Run the per-replica train_step everywhere; return new (params, momentum, states,
        host metrics) without committing them."""
        cfg = self.sam_cfg
        if self.comm is not None:
            x, y = batch[self.rank] if self.R > 1 else batch
            p, s, m, met = train_step(self.models[0], self.params, self.states[0],
                                      self.momentum, x, y, lr, cfg, self.comm)
            states, mets = [s], [met]
        elif self.R == 1:
            x, y = batch
            p, s, m, met = train_step(self.models[0], self.params, self.states[0],
                                      self.momentum, x, y, lr, cfg)
            states, mets = [s], [met]
        else:
            def replica(r, comm):
                x, y = batch[r]
                return train_step(self.models[r], self.params, self.states[r], self.momentum,
                                  x, y, lr, cfg, comm)
            results = run_replicas(self.R, replica)
            p, _, m, _ = results[0]   # identical on every replica
            states, mets = [r[1] for r in results], [r[3] for r in results]
        first = mets[0][STEP_METRICS[0]]
        xp = get_xp(first)
        vec = _mean_trees([{"v": xp.stack([xp.asarray(mt[k], dtype=xp.float64)
                                           for k in STEP_METRICS])} for mt in mets])["v"]
        if self.comm is not None and self.comm.size > 1:
            vec = self.comm.allreduce_mean({"v": vec})["v"]
        host = to_numpy(vec)            # the one host sync of the step
        return p, m, states, dict(zip(STEP_METRICS, (float(v) for v in host)))

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, dataset=None, batch_size: int | None = None) -> dict:
        """Loss (with the run's label smoothing, like the JAX eval) and error rate of the
        current parameters on ``dataset`` (default: the test set), BN in eval mode with the
        replica-averaged running statistics. Every rank must call it."""
        dataset = self.test_data if dataset is None else dataset
        bs = batch_size or self.cfg.eval_batch_size or self.cfg.batch_size
        state = self.eval_state()
        loader = Loader(dataset, bs, train=False, device=self.cfg.device)
        size = self.comm.size if self.comm is not None else 1
        model, xp = self.models[0], get_xp(next(iter(self.params.values())))
        loss_sum = err_sum = xp.zeros((), xp.float64)
        n = 0
        for i in range(loader.steps_per_epoch):
            if i % size != self.rank:
                continue
            x, y = loader.batch(0, i)
            _, met = eval_step(model, self.params, state, x, y, self.cfg.label_smoothing)
            loss_sum = loss_sum + met["loss"] * len(y)
            err_sum = err_sum + met["error_rate"] * len(y)
            n += len(y)
        totals = xp.stack([xp.asarray(loss_sum, xp.float64), xp.asarray(err_sum, xp.float64),
                           xp.asarray(float(n), xp.float64)])
        if size > 1:
            totals = self.comm.allreduce_mean({"t": totals})["t"]
        loss, err, count = (float(v) for v in to_numpy(totals))
        return {"loss": loss / count, "error_rate": err / count}

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``config.epochs`` (or ``max_steps``); return the last epoch's record.

        Raises NonFiniteLossError (nothing saved) or TrainingInterrupted (saved)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        total = cfg.epochs * spe
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=os.path.basename(os.path.normpath(self.out_dir)) if self.out_dir
                       else ("sam" if cfg.rho > 0 else "sgd"))
        t_start, epoch_start = time.time() - self.elapsed, time.time()
        try:
            while self.epoch < cfg.epochs:
                while self.step_in_epoch < spe:
                    if self.max_steps is not None and self.step >= self.max_steps:
                        self.elapsed = time.time() - t_start
                        self.save()
                        return {"stopped_at_step": self.step, **(self.last_record or {})}
                    batch = self.loader.batch(self.epoch, self.step_in_epoch)
                    lr = float(self.lr_fn(self.step))
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        p, m, states, host = self._train_step(batch, lr)  # checked just below
                    if not all(math.isfinite(v) for v in host.values()):
                        raise NonFiniteLossError(
                            f"non-finite training values at epoch {self.epoch + 1}, step "
                            f"{self.step_in_epoch + 1} (global step {self.step + 1}, lr "
                            f"{lr:.4g}): loss {host['train_loss']}, gradient norm "
                            f"{host['gradient_norm']}, parameter norm {host['param_norm']}; "
                            + self._last_good() + "; try a lower --lr or --gradient-clipping")
                    self.params, self.momentum, self.states = p, m, states
                    self.step += 1
                    self.step_in_epoch += 1
                    for k, v in host.items():
                        self._sums[k] += v
                    self._sums["steps"] += 1
                    if bar is not None:
                        post = {"ep": f"{self.epoch + 1}/{cfg.epochs}",
                                "loss": f"{host['train_loss']:.3f}",
                                "err": f"{host['train_error_rate']:.3f}"}
                        if self.last_record:
                            post["test_err"] = f"{self.last_record['test_error_rate']:.3f}"
                        bar.set_postfix(post, refresh=False)
                        bar.update(1)
                # end of epoch: evaluate, log, checkpoint
                test = self.evaluate()
                n = max(self._sums["steps"], 1)
                now = time.time()
                self.elapsed = now - t_start
                record = {"epoch": self.epoch + 1, "step": self.step,
                          "lr": float(self.lr_fn(self.step - 1)),
                          **{k: self._sums[k] / n for k in STEP_METRICS},
                          "test_loss": test["loss"], "test_error_rate": test["error_rate"],
                          "epoch_time_s": round(now - epoch_start, 3),
                          "elapsed_s": round(self.elapsed, 3)}
                self._log(record)
                self.last_record = record
                self.epoch += 1
                self.step_in_epoch = 0
                self._sums = self._zero_sums()
                epoch_start = now
                self.save()
        except KeyboardInterrupt:
            self.elapsed = time.time() - t_start
            self.save(collective=False)
            where = os.path.join(self.out_dir, CHECKPOINT_FILE) if self.out_dir else None
            raise TrainingInterrupted(
                f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch} of {spe} "
                f"(global step {self.step}); " +
                (f"checkpoint saved to {where}; continue with `minisam train --resume --out "
                 f"{self.out_dir}`" if where else "no run directory, nothing saved")) from None
        finally:
            if bar is not None:
                bar.close()
        return dict(self.last_record or {})

    def _last_good(self) -> str:
        if self.out_dir is None:
            return "no run directory, nothing was saved"
        path = os.path.join(self.out_dir, CHECKPOINT_FILE)
        if os.path.exists(path):
            m = load_checkpoint(path).meta
            return (f"the last good checkpoint ({path}, epoch {m['epoch']}, step {m['step']}) "
                    "is untouched")
        return "no checkpoint had been written yet"


def train(config: TrainConfig, out_dir: str | None = None, **kwargs) -> dict:
    """``Trainer(config, out_dir, **kwargs).fit()``."""
    return Trainer(config, out_dir, **kwargs).fit()


def model_from_checkpoint(ckpt: Checkpoint, num_classes: int, in_channels: int):
    """A WideResnet of the checkpoint's config, with its parameters and averaged BN state."""
    cfg = ckpt.config
    model = wide_resnet(cfg.model, num_outputs=num_classes, in_channels=in_channels, seed=cfg.seed)
    model.set_params(ckpt.params)
    model.set_state(ckpt.state)
    return model
