"""One evaluation routine, shared by the Trainer (every epoch) and ``minisam eval``."""
from __future__ import annotations

from .backend import get_xp, to_numpy
from .data import Loader
from .distributed.replicas import Replicas
from .sam import eval_step


def evaluate(replicas: Replicas, models: list, params: dict, state: dict, dataset,
             batch_size: int, label_smoothing: float = 0.0, device: str = "cpu") -> dict:
    """Loss and error rate of ``params`` on ``dataset``, BN in eval mode with ``state``
    (sam_jax ``eval_on_dataset``): the loss with the run's label smoothing, like the JAX
    eval. Batch i is evaluated by replica i mod size, each with its own model in
    ``models``; the sums meet in one mean, so the host waits once. Every rank must call it.
    """
    loader = Loader(dataset, batch_size, train=False, device=device)

    def replica(i, comm):
        xp = get_xp(next(iter(params.values())))
        loss = err = xp.zeros((), xp.float64)
        n = 0
        for step in range(replicas.ranks[i], loader.steps_per_epoch, replicas.size):
            x, y = loader.batch(0, step)
            _, met = eval_step(models[i], params, state, x, y, label_smoothing)
            loss, err, n = loss + met["loss"] * len(y), err + met["error_rate"] * len(y), n + len(y)
        return {"t": xp.stack([loss, err, xp.asarray(float(n), xp.float64)])}

    loss, err, count = (float(v) for v in to_numpy(replicas.mean(replicas.run(replica))["t"]))
    return {"loss": loss / count, "error_rate": err / count}


def evaluate_checkpoint(path: str, split: str = "test", device=None, dataset=None,
                        data_dir=None, data_source=None, batch_size=None):
    """``minisam eval``: a checkpoint (or run directory) on a split of its dataset (or of
    ``dataset``), each ``None`` argument taken from the run's config. Returns
    (``evaluate``'s dict, the Dataset, the checkpoint's meta)."""
    from .backend import tree_to_device
    from .data import load_dataset
    from .rundir import load_checkpoint
    ck = load_checkpoint(path)
    cfg = ck.config
    device = device or cfg.device
    dataset = dataset or cfg.dataset
    image_size = cfg.image_size if dataset == cfg.dataset else None
    train, test = load_dataset(dataset, data_dir or cfg.data_dir,
                               data_source or cfg.data_source, image_size, cfg.validation)
    data = train if split == "train" else test
    model = model_from_checkpoint(ck, data.num_classes, data.image_shape[-1])
    res = evaluate(Replicas(), [model], tree_to_device(ck.params, device),
                   tree_to_device(ck.state, device), data,
                   batch_size or cfg.eval_batch_size or cfg.batch_size, cfg.label_smoothing,
                   device)
    return res, data, ck.meta


def model_from_checkpoint(ckpt, num_classes: int, in_channels: int):
    """A WideResnet of the checkpoint's (``rundir.Checkpoint``) config, with its parameters
    and averaged BN state: what ``minisam eval`` evaluates."""
    from .models import wide_resnet
    cfg = ckpt.config
    model = wide_resnet(cfg.model, num_outputs=num_classes, in_channels=in_channels,
                        seed=cfg.seed, batch_norm=cfg.batch_norm)
    model.set_params(ckpt.params)
    model.set_state(ckpt.state)
    return model
