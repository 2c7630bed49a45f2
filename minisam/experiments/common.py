"""What every experiment does the same way: take a trainer's weights to the host in float64
for measuring, give SGD its fair budget, and write its record as NAME.json and its figure
as NAME.png."""
from __future__ import annotations

import json
import os

import numpy as np

from ..backend import to_numpy


def float64_weights(trainer):
    """(params, BN state averaged over replicas) of a ``Trainer``, host float64 copies."""
    return ({k: to_numpy(v).astype(np.float64) for k, v in trainer.params.items()},
            {k: to_numpy(v).astype(np.float64) for k, v in trainer.eval_state().items()})


def save(out_dir: str, record: dict, plot) -> dict:
    """Write ``record`` to out_dir/NAME.json (NAME: ``record["experiment"]``) and
    ``plot(record, out_dir/NAME.png)``; returns the record with the PNG's path added."""
    name = record["experiment"]
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    record["png"] = plot(record, os.path.join(out_dir, f"{name}.png"))
    return record


FAIR_SGD = ("also train SGD for twice the epochs and report the better run, the paper's "
            "fair baseline (sec. 3.1: a SAM step costs two gradient evaluations, an SGD step one)")


def sgd_epochs(epochs: int, fair: bool) -> tuple:
    """The epoch budgets SGD trains with: SAM's, and with ``fair`` also twice that."""
    return (epochs, 2 * epochs) if fair else (epochs,)
