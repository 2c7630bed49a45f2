"""The shape of the package: short modules, no import cycle, the SAM step free of
multi-process code, the figures free of the trainer, one replica path in the trainer."""
import ast
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from minisam.cli import build_parser
from minisam.config import DEFAULTS, FIELDS
from minisam.distributed.local import ReplicaThreads, run_replicas
from minisam.distributed.replicas import Replicas
from minisam.models import WideResnet
from minisam.nn import AvgPool, GlobalAvgPool, ReLU, Shortcut
from minisam.optim import nesterov_init
from minisam.sam import SAMConfig, train_step

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "minisam"
MAX_LINES = 450


def modules() -> dict:
    """{dotted module name: path} for every .py file of the package."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set:
    """Every minisam module ``name`` imports, at module level or inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minisam")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("minisam"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(known)
            # `from pkg import submodule` imports the submodule; `from pkg import name`, pkg
            found |= subs if subs else {target}
    # a module may always rely on its own parent packages having been imported
    return {m for m in found if m in known and not name.startswith(m + ".") and m != name}


def test_no_module_is_longer_than_450_lines():
    long = {name: n for name, p in modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_minisam_has_no_import_cycle():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
    # the analysis sees imports: cli reaches train, train reaches rundir
    assert "minisam.train" in graph["minisam.cli"] and "minisam.rundir" in graph["minisam.train"]


def test_the_package_uses_relative_imports():
    absolute = [f"{p.relative_to(REPO)}:{node.lineno}" for p in PKG.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if (isinstance(node, ast.ImportFrom) and not node.level
                    and (node.module or "").startswith("minisam"))
                or (isinstance(node, ast.Import) and any(a.name.startswith("minisam")
                                                         for a in node.names))]
    assert not absolute, absolute


def loaded_after_import(module: str) -> set:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('minisam')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_the_sam_step_reaches_no_multi_process_code():
    loaded = loaded_after_import("minisam.sam")
    assert "minisam.sam" in loaded and "minisam.distributed.local" in loaded
    multi = {"minisam.distributed.nccl", "minisam.distributed.rendezvous",
             "minisam.distributed.launch", "minisam.train",
             "minisam.rundir", "minisam.data"}
    assert not loaded & multi, loaded & multi


def test_plots_stand_on_the_run_directory_not_the_trainer():
    loaded = loaded_after_import("minisam.plots")
    assert "minisam.rundir" in loaded and "minisam.train" not in loaded


# --------------------------------------------------------------------- one home for facts
def test_every_config_field_is_a_train_flag_with_the_dataclass_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(FIELDS) <= dests, set(FIELDS) - dests
    helps = {a.dest: a.help or "" for a in train._actions}
    for name in ("lr", "rho", "epochs", "batch_size", "weight_decay", "gradient_clipping",
                 "momentum", "replicas", "seed", "schedule", "device", "cutout"):
        assert f"(default {DEFAULTS[name]})" in helps[name], (name, helps[name])


def test_train_choices_come_from_the_library():
    from minisam.backend import DEVICES
    from minisam.config import SCHEDULES
    from minisam.data import DATASETS, SOURCES
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = {a.dest: a.choices for a in sub.choices["train"]._actions}
    assert (choices["dataset"], choices["data_source"], choices["schedule"], choices["device"]) \
        == (DATASETS, SOURCES, SCHEDULES, DEVICES)
    for cmd in ("eval", "verify", "bench"):
        acts = {a.dest: a.choices for a in sub.choices[cmd]._actions}
        assert acts["device"] == DEVICES


def test_named_layers_walks_every_layer_and_adds_no_parameters():
    model = WideResnet(2, 1, 10)
    layers = dict(model.named_layers())
    relus = [p for p, layer in layers.items() if isinstance(layer, ReLU)]
    assert len(relus) == 3 * 2 * 2 + 1          # two per block, one before the pool
    assert "WideResnetGroup_2/WideResnetBlock_0/relu1" in relus and "relu" in relus
    assert isinstance(layers["pool"], GlobalAvgPool)
    assert isinstance(layers["WideResnetGroup_1/WideResnetBlock_0/shortcut"], Shortcut)
    assert isinstance(layers["WideResnetGroup_1/WideResnetBlock_0/shortcut/pool"], AvgPool)
    assert "WideResnetGroup_0/WideResnetBlock_1/shortcut" not in layers   # same width: identity
    assert layers[""] is model
    with_params = {p for p, layer in layers.items() if layer.params}
    assert {k.rsplit("/", 1)[0] for k in model.get_params()} == with_params


# --------------------------------------------------------------------- replica threads
def test_replica_threads_are_made_once_and_rank_0_runs_in_the_caller():
    idents = []
    with ReplicaThreads(3) as rt:
        for _ in range(3):
            idents.append(rt.run(lambda r, comm: (r, comm.rank, threading.get_ident())))
    assert [[(r, c) for r, c, _ in step] for step in idents] == [[(0, 0), (1, 1), (2, 2)]] * 3
    assert idents[0][0][2] == threading.get_ident()
    assert idents[0] == idents[1] == idents[2]           # the same threads every step


def test_replica_threads_survive_an_error_and_an_interrupt():
    with ReplicaThreads(2) as rt:
        def fail_on_1(r, comm):
            if r == 1:
                raise ValueError("replica 1 broke")
            comm.barrier()                               # would hang without the abort
        with pytest.raises(ValueError, match="replica 1 broke"):
            rt.run(fail_on_1)

        def interrupt_0(r, comm):
            if r == 0:
                raise KeyboardInterrupt
            return comm.allreduce_mean({"a": np.ones(2)})
        with pytest.raises(KeyboardInterrupt):
            rt.run(interrupt_0)
        out = rt.run(lambda r, comm: comm.allreduce_mean({"a": np.full(2, float(r))}))
        np.testing.assert_array_equal(out[1]["a"], [0.5, 0.5])


def test_replicas_topologies():
    one = Replicas()
    assert (one.size, one.ranks, one.main, one.holds_all) == (1, [0], True, True)
    three = Replicas(3)
    assert (three.size, three.ranks, three.holds_all) == (3, [0, 1, 2], True)
    trees = [{"w": np.full(2, float(r))} for r in range(3)]
    np.testing.assert_array_equal(three.mean(trees)["w"], [1.0, 1.0])
    three.close()

    def as_rank(r, comm):
        rep = Replicas(1, comm)
        return rep.size, rep.ranks, rep.main, rep.holds_all, rep.mean([{"w": np.full(1, r)}])
    out = run_replicas(2, as_rank)
    assert [o[:4] for o in out] == [(2, [0], True, False), (2, [1], False, False)]
    assert [float(o[4]["w"][0]) for o in out] == [0.5, 0.5]
    with pytest.raises(ValueError, match="one replica"):
        run_replicas(2, lambda r, comm: Replicas(2, comm))


@pytest.mark.parametrize("sync", [False, True])
def test_two_replicas_on_the_same_shard_equal_one_replica_bitwise(sync):
    """JAX semantics: each replica's BN, gradient and perturbation are its own, then the SAM
    gradients are pmean-ed. Two replicas fed the same images must therefore land exactly
    where one replica does: (g + g) / 2 == g in float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, 6).astype(np.int32)
    cfg = SAMConfig(rho=0.1, sync_perturbations=sync, label_smoothing=0.1)

    def step(r, comm):
        model = WideResnet(1, 1, 4, seed=3)
        p, s = model.get_params(), model.get_state()
        m = nesterov_init(p)
        for _ in range(2):
            p, s, m, met = train_step(model, p, s, m, x, y, 0.05, cfg, comm)
        return p, s, m, met
    alone = run_replicas(1, step)[0]
    pair = run_replicas(2, step)
    for part in range(3):
        for k, v in alone[part].items():
            np.testing.assert_array_equal(pair[0][part][k], v, err_msg=k)
            np.testing.assert_array_equal(pair[1][part][k], v, err_msg=k)


def test_ctrl_c_while_the_caller_waits_stops_the_other_replicas_and_keeps_them_usable():
    """SIGINT reaching the caller while it waits for replica 1 must not leave replica 1 stuck
    in a collective (the next step would then hang): it is stopped and collected first."""
    import signal
    import time
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    try:
        with ReplicaThreads(2) as rt:
            def fn(r, comm):
                if r == 1:
                    signal.pthread_kill(main, signal.SIGINT)   # Ctrl-C, while rank 0 waits
                    time.sleep(0.2)
                    comm.barrier()                             # rank 0 never comes
                return r
            with pytest.raises(KeyboardInterrupt):
                rt.run(fn)
            done = []
            t = threading.Thread(target=lambda: done.append(rt.run(lambda r, comm: r)))
            t.start()
            t.join(10)
            assert done == [[0, 1]]
    finally:
        signal.signal(signal.SIGINT, old)
