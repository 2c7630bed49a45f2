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
