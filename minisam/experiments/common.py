"""What every experiment does the same way: its settings (digits by default, CIFAR with a
flag), take a trainer's weights to the host in float64 for measuring, give SGD its fair
budget, and write its record as NAME.json and its figure as NAME.png."""
from __future__ import annotations

import json
import os

import numpy as np

from ..backend import to_numpy


DATASETS = ("digits", "cifar10", "cifar100")


def settings(full: dict, quick_setting: dict, *, quick: bool = False, epochs=None,
             dataset: str = "digits", data_dir=None, model=None, batch_size=None) -> dict:
    """The experiment's settings: its quick or full setting with the command line's
    overrides. On CIFAR the images keep their 32x32 (``image_size`` None) and the rest of
    the setting is the experiment's own unless ``model``, ``epochs`` or ``batch_size`` say
    otherwise: the same command, a flag, and a larger budget for a GPU."""
    if dataset not in DATASETS:
        raise ValueError(f"experiments run on {', '.join(DATASETS)}, got {dataset!r}")
    s = dict(quick_setting if quick else full, dataset=dataset, data_dir=data_dir)
    for key, value in (("epochs", epochs), ("model", model), ("batch_size", batch_size)):
        if value is not None:
            s[key] = value
    if dataset != "digits":
        s["image_size"] = None
    return s


def data_label(s: dict) -> str:
    """'8x8 digits' or 'CIFAR-10': what a figure's title says the data were (records
    written before the dataset was a setting are digits)."""
    name = s.get("dataset", "digits")
    if name == "digits":
        return f"{s['image_size']}x{s['image_size']} digits"
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]


def train_config(s: dict, **fields) -> dict:
    """The TrainConfig fields every experiment's runs share: the data, model and batch of
    the settings ``s``, then ``fields``."""
    return dict(dataset=s["dataset"], data_dir=s["data_dir"], image_size=s["image_size"],
                model=s["model"], batch_size=s["batch_size"], **fields)


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
