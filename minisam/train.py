"""Training for real: epochs of SAM (or SGD, rho = 0), evaluation, metrics, checkpoints, resume.

Mirrors sam_jax ``flax_training.train`` / ``train_for_one_epoch`` / ``eval_on_dataset``:

* the learning rate follows ``get_cosine_schedule`` per step, with
  steps_per_epoch = floor(num_train / global_batch) (the remainder is dropped);
* each step is ``sam.train_step`` (or a variant: ``config.step_function``) on every
  replica's slice of the global batch, each replica with its own model instance and its
  own BN running statistics, exactly like ``jax.pmap`` replicas. Where the replicas run
  (this thread, R threads, one GPU each) is decided once, in a ``distributed.Replicas``;
* after every epoch the test set is evaluated with ``sam.eval_step`` using the BN state
  averaged over replicas (the JAX ``eval_step`` pmeans the state) and the parameters (all
  replicas hold the same ones);
* checkpoints hold the parameters, momentum and the averaged BN state, like
  ``save_checkpoint`` (``x[0]`` / ``mean(x, axis=0)``).

What the JAX code does not have, and why:

* **Exact resume.** Every random choice is a function of (seed, epoch, step)
  (``data.loader``), nothing else holds random state, and a checkpoint also stores every
  replica's BN state, the position (epoch, step) and the epoch's running metric sums. On
  the CPU a resumed run therefore ends with parameters bitwise equal to an uninterrupted
  run (tested). The JAX code reshuffles with tf.data and restarts from the averaged BN
  state, so its resumed runs differ.
* **Atomic checkpoints** (``rundir``): a crash at any moment leaves the previous one loadable.
* **Non-finite loss.** A NaN or inf loss, gradient norm or parameter norm stops the run with
  ``NonFiniteLossError`` before anything is written, so the last good checkpoint survives.
* **Ctrl-C.** ``KeyboardInterrupt`` saves a checkpoint at the last completed step (parameters
  are only replaced once a whole step has finished) and raises ``TrainingInterrupted``;
  ``resume`` continues from that step, still bitwise exact.
"""
from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, replace

import numpy as np

from . import __version__
from . import rundir
from .backend import get_xp, set_tf32, to_numpy, tree_to_device, xp_for
from .config import TrainConfig, resume_conflicts
from .data import Loader, load_dataset
from .evaluate import evaluate
from .distributed.replicas import Replicas
from .models import wide_resnet
from .optim import nesterov_init
from .tree import flat_tree

# Per-step metrics of sam.train_step, moved to the host together once per step.
STEP_METRICS = ("train_loss", "train_error_rate", "gradient_norm", "param_norm")


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient or parameter norm) became NaN or inf; nothing was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the last completed step; ``str(e)`` says
    where, ``signum`` which signal (SIGINT for a KeyboardInterrupt raised in code)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM (what a cluster sends before pre-emption)
    only raise a flag, acted on at the next step boundary: a step is never cut in half and a
    second signal cannot abort the checkpoint being written. Only the main thread can
    install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._old = None, {}

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"minisam: {signal.Signals(signum).name}: saving a checkpoint after this "
                  "step, then stopping", file=sys.stderr, flush=True)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


class Trainer:
    """Train one model with SAM or SGD; see the module docstring for what it mirrors.

    config:   a ``TrainConfig``. With ``resume``: None (use the saved one), the saved
              config itself, or a dict of fields that must agree with it.
    out_dir:  the run directory (``rundir``); None keeps everything in memory.
    comm:     None: ``config.replicas`` replicas in this process (threads if more than
              one). Otherwise a communicator across processes (``distributed.Communicator``,
              e.g. NCCL, one process per GPU): this process is replica ``comm.rank`` of
              ``comm.size``, and only rank 0 writes files and shows the progress bar.
              ``config.replicas`` must equal ``comm.size`` (1 is taken to mean "whatever
              comm says").
    resume:   continue the run in ``out_dir`` from its checkpoint.
    max_steps: stop (with a checkpoint) once this many global steps are done; the schedule
              still spans ``config.epochs``. For smoke tests and for splitting a run.
    data:     optional (train, test) ``Dataset`` pair instead of loading ``config.dataset``
              (label noise is still applied); a resumed run must be given the same data.
    """

    def __init__(self, config: TrainConfig | dict | None = None, out_dir: str | None = None,
                 *, comm=None, resume: bool = False, max_steps: int | None = None,
                 progress: bool = True, data=None):
        self._lock = None
        if out_dir is not None and (comm is None or comm.rank == 0):
            if resume and not rundir.is_run(out_dir):
                rundir.load_checkpoint(out_dir)   # says there is none, and where it looked
            self._lock = rundir.RunLock(out_dir)  # one process trains in a directory
        try:
            self._setup(config, out_dir, comm, resume, max_steps, progress, data)
        except BaseException:
            self.close()
            raise

    def _setup(self, config, out_dir, comm, resume, max_steps, progress, data):
        ckpt = None
        if resume:
            if out_dir is None:
                raise ValueError("resume needs the run directory (out_dir) to continue")
            if os.path.exists(os.path.join(out_dir, rundir.CHECKPOINT_FILE)):
                ckpt = rundir.load_checkpoint(out_dir)
                saved = ckpt.config
            else:  # stopped before its first checkpoint: the run starts again from step 0
                saved = TrainConfig.from_dict(rundir.read_config(out_dir))
            given = asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
            conflict = resume_conflicts(saved, given)
            if conflict:
                raise ValueError(f"{out_dir!r}: {conflict}")
            config = saved
        if not isinstance(config, TrainConfig):
            raise ValueError("Trainer needs a TrainConfig (or resume=True with a run directory)")
        if comm is not None and comm.size != config.replicas:
            if config.replicas != 1:
                raise ValueError(f"config.replicas={config.replicas} but the communicator has "
                                 f"{comm.size} ranks; they must agree")
            config = replace(config, replicas=comm.size)
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
            raise ValueError(f"max_steps must be a non-negative integer or None, got {max_steps!r}")
        xp_for(config.device)  # fail early if the GPU is unusable
        set_tf32(config.tf32)  # explicitly, either way (CUPY_TF32 does not decide)
        if getattr(comm, "device", config.device) != config.device:
            raise ValueError(f"the communicator's arrays live on {comm.device!r} but the run's "
                             f"device is {config.device!r}; use --device {comm.device}")
        self.cfg, self.out_dir, self.max_steps = config, out_dir, max_steps
        self.replicas = Replicas(config.replicas if comm is None else 1, comm)
        self.progress = progress and self.replicas.main

        train, test = data if data is not None else load_dataset(
            config.dataset, config.data_dir, config.data_source, config.image_size,
            config.validation)
        self.clean_train = train
        if config.label_noise > 0:
            train = train.with_label_noise(config.label_noise, seed=config.seed)
        self.train_data, self.test_data = train, test
        self.loader = Loader(train, config.batch_size, train=True, augment=config.augment(),
                             seed=config.seed, device=config.device, replicas=config.replicas)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.lr_fn = config.lr_schedule(self.steps_per_epoch)
        self.sam_cfg = config.sam_config()
        self.step_fns = [config.step_function(self.steps_per_epoch)   # LookSAM's hold state
                         for _ in self.replicas.ranks]

        self.models = [wide_resnet(config.model, num_outputs=train.num_classes,
                                   in_channels=train.image_shape[-1], seed=config.seed,
                                   batch_norm=config.batch_norm)
                       for _ in self.replicas.ranks]
        self.params = tree_to_device(self.models[0].get_params(), config.device)
        self.states = [tree_to_device(self.models[0].get_state(), config.device)
                       for _ in self.replicas.ranks]
        self.step = self.epoch = self.step_in_epoch = 0
        self._stop_by = None    # the signal that stops training, once every process knows
        self._sums = self._zero_sums()
        self.last_record: dict | None = None
        self.elapsed = 0.0
        if ckpt is not None:
            self._restore(ckpt)
        else:
            self.params = flat_tree(self.replicas.comm.broadcast(self.params, 0))  # rank 0's
            self.momentum = nesterov_init(self.params)
            if out_dir is not None and self.replicas.main:
                if resume:
                    rundir.rewind(out_dir, 0)
                else:
                    rundir.start_run(out_dir, self._run_info())

    def close(self):
        """Release the run directory's lock (``fit`` takes it again when it starts)."""
        if self._lock is not None:
            self._lock.release()

    @property
    def rank(self) -> int:
        """This process's rank among the processes of the run (0 without a communicator)."""
        return self.replicas.comm.rank

    def _run_info(self) -> dict:
        return {"config": asdict(self.cfg), "minisam_version": __version__,
                "num_train": len(self.train_data), "num_test": len(self.test_data),
                "test_split": self.test_data.split,
                "image_shape": list(self.train_data.image_shape),
                "num_classes": self.train_data.num_classes, "steps_per_epoch": self.steps_per_epoch,
                "num_params": self.models[0].num_params(), "augment": asdict(self.cfg.augment())}

    def _restore(self, ck: rundir.Checkpoint):
        self.models[0].set_params(ck.params)     # the checkpoint fits this model (or a
        for state in [ck.state, *ck.replica_states]:   # one-line error names what does not)
            self.models[0].set_state(state)
        dev = self.cfg.device
        self.params = flat_tree(tree_to_device(ck.params, dev))
        self.momentum = flat_tree(tree_to_device(ck.momentum, dev), like=self.params)
        if len(ck.replica_states) == self.replicas.size:   # every replica's own BN state
            self.states = [tree_to_device(ck.replica_states[r], dev) for r in self.replicas.ranks]
        else:  # e.g. one process per GPU: every replica restarts from the mean (as in JAX)
            self.states = [tree_to_device(ck.state, dev) for _ in self.replicas.ranks]
        m = ck.meta
        self.step, self.epoch, self.step_in_epoch = m["step"], m["epoch"], m["step_in_epoch"]
        if hasattr(self.step_fns[0], "load"):   # LookSAM: step count and g_v (else a full step)
            saved = ck.replica_carry if len(ck.replica_carry) == self.replicas.size else None
            for f, r in zip(self.step_fns, self.replicas.ranks):
                f.load(self.step, {} if saved is None else tree_to_device(saved[r], dev))
        self._sums, self.last_record = dict(m["epoch_sums"]), m.get("last_record")
        self.elapsed = m.get("elapsed_s", 0.0)
        if self.replicas.main:
            rundir.rewind(self.out_dir, self.epoch)

    # -- state --------------------------------------------------------------------------
    def _zero_sums(self):
        return {k: 0.0 for k in STEP_METRICS} | {"steps": 0}

    def eval_state(self, collective: bool = True) -> dict:
        """BN running statistics averaged over replicas (the JAX eval_step's pmean)."""
        return self.replicas.mean(self.states, collective)

    def save(self, collective: bool = True):
        """Checkpoint the current step boundary (a no-op without a run directory).

        Every process must call it (the BN mean is a collective) and rank 0 writes.
        ``collective=False`` (Ctrl-C, when processes may not be at the same point) skips
        what crosses processes: the saved ``state`` is then this process's mean."""
        state = self.eval_state(collective)
        if self.out_dir is None or not self.replicas.main:
            return
        keep_all = self.replicas.holds_all and self.replicas.size > 1
        meta = {"minisam_version": __version__, "config": asdict(self.cfg),
                "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "epoch_sums": self._sums,
                "last_record": self.last_record, "elapsed_s": self.elapsed,
                # No generator state to save: order and augmentation are drawn from
                # default_rng([seed, 0, epoch]) and default_rng([seed, 1, epoch, step]).
                "rng": {"seed": self.cfg.seed, "epoch": self.epoch,
                        "step_in_epoch": self.step_in_epoch, "label_noise_seed": self.cfg.seed}}
        carry = [f.carry() for f in self.step_fns] if hasattr(self.step_fns[0], "carry") \
            and self.replicas.holds_all else []
        rundir.save_checkpoint(self.out_dir, rundir.Checkpoint(
            self.params, state, self.momentum, self.states if keep_all else [], meta, carry))

    # -- one step -----------------------------------------------------------------------
    def _train_step(self, shards, lr):
        """Run the per-replica train_step on every replica computed here; return new
        (params, momentum, states, host metrics) without committing them."""
        def replica(i, comm):
            x, y = shards[i]
            return self.step_fns[i](self.models[i], self.params, self.states[i],
                                    self.momentum, x, y, lr, self.sam_cfg, comm)
        results = self.replicas.run(replica)
        p, _, m, _ = results[0]   # identical on every replica
        xp = get_xp(p[next(iter(p))])
        signum = getattr(getattr(self, "_signals", None), "signum", None)
        flag = xp.asarray(float(signum or 0), dtype=xp.float64)   # which signal, if any
        vec = self.replicas.mean([{"v": xp.stack([xp.asarray(r[3][k], dtype=xp.float64)
                                                  for k in STEP_METRICS] + [flag])}
                                  for r in results])["v"]
        host = to_numpy(vec)            # the one host sync of the step
        if host[-1] > 0 and self._stop_by is None:
            self._stop_by = signum or signal.SIGTERM
        return p, m, [r[1] for r in results], dict(zip(STEP_METRICS, map(float, host)))

    def evaluate(self, dataset=None, batch_size: int | None = None) -> dict:
        """``evaluate`` of the current parameters on ``dataset`` (default: the test set)
        with the replica-averaged BN state. Every rank must call it."""
        return evaluate(self.replicas, self.models, self.params, self.eval_state(),
                        self.test_data if dataset is None else dataset,
                        batch_size or self.cfg.eval_batch_size or self.cfg.batch_size,
                        self.cfg.label_smoothing, self.cfg.device)

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``config.epochs`` (or ``max_steps``); return the last epoch's record.

        Raises NonFiniteLossError (nothing saved) or TrainingInterrupted (saved)."""
        if self.out_dir is not None and self.replicas.main and not self._lock.held:
            self._lock = rundir.RunLock(self.out_dir)
        bar = self._progress_bar()
        t_start = time.time() - self.elapsed
        self._epoch_start = time.time()
        try:
            with StopSignals() as self._signals:
                while self.epoch < self.cfg.epochs:
                    self.elapsed = time.time() - t_start
                    if self._stopping(self._signals.signum):
                        self.save()
                        raise TrainingInterrupted(self._interrupted_message(), self._stop_by)
                    if self.step_in_epoch == self.steps_per_epoch:
                        self._end_epoch(bar)
                        continue
                    if self.max_steps is not None and self.step >= self.max_steps:
                        self.save()
                        return {"stopped_at_step": self.step, **(self.last_record or {})}
                    shards = self.loader.shards(self.epoch, self.step_in_epoch, self.replicas.ranks)
                    lr = float(self.lr_fn(self.step))
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        p, m, states, host = self._train_step(shards, lr)  # checked below
                    self._check_finite(host, lr)
                    self._commit(p, m, states, host, bar)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:   # raised in code, not by our handlers: processes may differ
            self.elapsed = time.time() - t_start
            with StopSignals():
                self.save(collective=False)
            raise TrainingInterrupted(self._interrupted_message()) from None
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return dict(self.last_record or {})

    def _stopping(self, local_signum) -> bool:
        """Stop here? Every process learns of a signal to any of them through the step's
        metrics (``_train_step``), so all stop at the same step boundary; a lone process
        stops at once."""
        if local_signum is not None and self.replicas.comm.size == 1:
            self._stop_by = local_signum
        return self._stop_by is not None

    def _commit(self, params, momentum, states, host: dict, bar):
        """Make a finished step the trainer's state."""
        self.params, self.momentum, self.states = params, momentum, states
        self.step += 1
        self.step_in_epoch += 1
        for k, v in host.items():
            self._sums[k] += v
        self._sums["steps"] += 1
        if bar is not None:
            post = {"ep": f"{self.epoch + 1}/{self.cfg.epochs}",
                    "loss": f"{host['train_loss']:.3f}", "err": f"{host['train_error_rate']:.3f}"}
            if self.last_record:
                post["test_err"] = f"{self.last_record['test_error_rate']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    def _end_epoch(self, bar=None):
        """Evaluate, log the epoch's record, checkpoint (only a finite evaluation is logged
        and checkpointed: the last checkpoint stays the last good one)."""
        test = self.evaluate()
        if not all(math.isfinite(v) for v in test.values()):
            raise NonFiniteLossError(
                f"non-finite {self.test_data.split} loss {test['loss']} or error "
                f"{test['error_rate']} after epoch {self.epoch + 1} (global step {self.step}); "
                + self._last_good() + self._advice())
        n, now = max(self._sums["steps"], 1), time.time()
        record = {"epoch": self.epoch + 1, "step": self.step,
                  "lr": float(self.lr_fn(self.step - 1)),
                  **{k: self._sums[k] / n for k in STEP_METRICS},
                  "test_loss": test["loss"], "test_error_rate": test["error_rate"],
                  "epoch_time_s": round(now - self._epoch_start, 3),
                  "elapsed_s": round(self.elapsed, 3)}
        if self.out_dir is not None and self.replicas.main:
            rundir.append_metrics(self.out_dir, record)
        if bar is not None:         # the final frame shows the final test error
            bar.set_postfix({"ep": f"{self.epoch + 1}/{self.cfg.epochs}",
                             "test_err": f"{record['test_error_rate']:.3f}"})
        elif self.log_epochs:       # a log file, not a terminal: one line per epoch
            print(f"epoch {record['epoch']}/{self.cfg.epochs}: train loss "
                  f"{record['train_loss']:.4f}, {self.test_data.split} loss "
                  f"{record['test_loss']:.4f}, error {record['test_error_rate']:.2%}",
                  file=sys.stderr, flush=True)
        self.last_record = record
        self.epoch += 1
        self.step_in_epoch = 0
        self._sums = self._zero_sums()
        self._epoch_start = now
        self.save()

    def _progress_bar(self):
        """tqdm on a terminal; redirected to a file, one line per epoch instead (no frames)."""
        notebook = type(sys.stderr).__module__.startswith("ipykernel")   # tqdm draws a widget
        self.log_epochs = self.progress and not sys.stderr.isatty() and not notebook
        if not self.progress or self.log_epochs:
            return None
        from tqdm.auto import tqdm
        name = (os.path.basename(os.path.normpath(self.out_dir)) if self.out_dir
                else ("sam" if self.cfg.rho > 0 else "sgd"))
        return tqdm(total=self.cfg.epochs * self.steps_per_epoch, initial=self.step,
                    unit="step", dynamic_ncols=True, desc=name)

    def _check_finite(self, host: dict, lr: float):
        if all(math.isfinite(v) for v in host.values()):
            return
        raise NonFiniteLossError(
            f"non-finite training values in epoch {self.epoch + 1}, step "
            f"{self.step_in_epoch + 1} of {self.steps_per_epoch} (global step {self.step + 1}, "
            f"lr {lr:.4g}): loss "
            f"{host['train_loss']}, gradient norm {host['gradient_norm']}, parameter norm "
            f"{host['param_norm']}; " + self._last_good() + self._advice())

    def _advice(self) -> str:
        return ("; --resume would continue with the same settings: start a new run (another "
                "--out) with a lower --lr or --gradient-clipping")

    def _interrupted_message(self) -> str:
        where = (f"checkpoint saved to {os.path.join(self.out_dir, rundir.CHECKPOINT_FILE)}; "
                 f"continue with `minisam train --resume --out {shlex.quote(self.out_dir)}`"
                 if self.out_dir else "no run directory, nothing saved")
        return (f"interrupted in epoch {self.epoch + 1} after step {self.step_in_epoch} of "
                f"{self.steps_per_epoch} (global step {self.step}); {where}")

    def _last_good(self) -> str:
        if self.out_dir is None:
            return "no run directory, nothing was saved"
        path = os.path.join(self.out_dir, rundir.CHECKPOINT_FILE)
        if os.path.exists(path):
            m = rundir.load_checkpoint(path).meta
            return (f"the last good checkpoint ({path}, epoch {m['epoch']}, step {m['step']}) "
                    "is untouched")
        return "no checkpoint had been written yet"


def train(config: TrainConfig, out_dir: str | None = None, **kwargs) -> dict:
    """``Trainer(config, out_dir, **kwargs).fit()``."""
    return Trainer(config, out_dir, **kwargs).fit()
