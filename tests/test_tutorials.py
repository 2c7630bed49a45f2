"""Every notebook in tutorials/ runs top to bottom without an error, and is in sync with
its source (the jupytext ``py:percent`` file of the same name, see tutorials/execute.py).

Each notebook is executed in memory with nbclient (the committed file is not touched) by a
fresh `python3` kernel, in tutorials/ as working directory, with the repository root on the
kernel's PYTHONPATH so `import minisam` works with or without `pip install -e .`. The
notebooks are picked up by glob, so a new tutorial is tested as soon as it exists.

Needs nbclient, nbformat, ipykernel, jupytext and matplotlib (all in the `dev` extra). Without them
the tests are skipped locally, but fail under CI (the CI environment variable is set).
"""
import glob
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
NOTEBOOKS = sorted(glob.glob(os.path.join(TUTORIALS, "*.ipynb")))
CELL_TIMEOUT = 300   # seconds per cell; each notebook should take under 3 minutes on 2 cores

try:
    import ipykernel  # noqa: F401  (the kernel the notebooks run in)
    import matplotlib  # noqa: F401
    import jupytext  # noqa: F401
    import nbformat
    from nbclient import NotebookClient
except ImportError as exc:  # pragma: no cover
    if os.environ.get("CI"):
        raise
    pytest.skip(f"tutorial tests need the dev extra (pip install -e '.[dev]'): {exc}",
                allow_module_level=True)


def kernel_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("MPLBACKEND", None)          # let the kernel use its inline backend
    env.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    return env


import sys  # noqa: E402

sys.path.insert(0, TUTORIALS)
import execute as pairs  # noqa: E402  (tutorials/execute.py)


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 3, f"expected the tutorial notebooks in {TUTORIALS}"


def test_every_notebook_has_its_source_and_back():
    sources = {os.path.splitext(p)[0] for p in pairs.sources()}
    assert sources == {os.path.splitext(p)[0] for p in NOTEBOOKS}


@pytest.mark.parametrize("source", pairs.sources(), ids=os.path.basename)
def test_pair_in_sync(source):
    assert pairs.out_of_sync(source) is None, pairs.out_of_sync(source)


def test_an_edited_source_is_out_of_sync(tmp_path):
    src = pairs.sources()[0]
    copy = tmp_path / os.path.basename(src)
    text = open(src).read()
    copy.write_text(text)
    (tmp_path / os.path.basename(pairs.notebook_path(src))).write_bytes(
        open(pairs.notebook_path(src), "rb").read())
    assert pairs.out_of_sync(str(copy)) is None
    copy.write_text(text + "\n# %%\nprint('a cell the notebook lacks')\n")
    assert "differs from its source" in pairs.out_of_sync(str(copy))
    copy.write_text(text.replace("# %% [markdown]\n# #", "# %% [markdown]\n# ##", 1))
    assert "from cell 1 on" in pairs.out_of_sync(str(copy))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": TUTORIALS}})
    start = time.perf_counter()
    client.execute(env=kernel_env())     # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    print(f"{os.path.basename(path)}: {elapsed:.1f} s")


# the exercises' grader (tutorials/grading.py)
import grading  # noqa: E402
import numpy as np  # noqa: E402


def test_grader_passes_a_right_answer_and_names_a_wrong_case(capsys):
    ref = lambda g, rho: rho * g / np.linalg.norm(g)   # noqa: E731
    cases = [(np.array([3.0, 4.0]), 0.1), (np.array([1.0, -2.0, 2.0]), 0.5)]
    assert grading.check("dual vector", lambda g, rho: rho * g / np.sqrt(g @ g), ref, cases)
    assert "correct on all 2 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="case 2 of 2: result: off by up to"):
        grading.check("dual vector", lambda g, rho: rho * g / 5.0, ref, cases)
    with pytest.raises(AssertionError, match="got None"):
        grading.check("dual vector", lambda g, rho: None, ref, cases)
    with pytest.raises(AssertionError, match=r"result\['b'\]: shape \(2,\), expected \(3,\)"):
        grading.check("dict", lambda: {"a": 1.0, "b": np.zeros(2)},
                      lambda: {"a": 1.0, "b": np.zeros(3)}, [()])


def test_grader_reports_an_unattempted_exercise_and_lets_the_notebook_run(capsys):
    def todo(g, rho):
        raise NotImplementedError
    assert grading.check("dual vector", todo, lambda g, rho: g, [(np.ones(2), 0.1)]) is False
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize("source", pairs.sources(), ids=os.path.basename)
def test_every_notebook_has_two_graded_exercises_with_tested_solutions(source):
    """At least two exercise cells, and as many solution cells, each graded by check()."""
    import jupytext
    nb = jupytext.read(source)
    tagged = lambda tag: [c for c in nb.cells if tag in c.metadata.get("tags", [])]  # noqa: E731
    exercises, solutions = tagged("exercise"), tagged("solution")
    assert len(exercises) >= 2, f"{os.path.basename(source)}: {len(exercises)} exercises"
    assert len(solutions) >= len(exercises)
    for cell in solutions:
        assert "check(" in cell.source, cell.source[:200]
        assert cell.metadata.get("jupyter", {}).get("source_hidden") is True
