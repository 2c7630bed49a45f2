"""ReLU ties: inputs within float32 noise of the kink, whose side depends on rounding.

A ReLU input of, say, -1e-6 is zero up to float32 rounding: JAX's rounding and ours may put
it on different sides, and then one gradient entry flows in one code and not in the other.
The forward values barely change, but the gradients differ at the 1e-2 level. Ties are facts
about float32, not bugs; ``reference.verify`` finds them, tries the other side, and reports
every flip it keeps.

How close to zero is "within noise"? At least ``TIE_TOL`` of the input's scale; and when a
float64 run of the same step is at hand, four times the float32 error that this ReLU's
inputs actually carry (their 99.9th-percentile distance to the float64 inputs): after a
perturbation built from a float32 gradient, that error is well above 1e-6.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy

TIE_TOL = 1e-6     # |relu input| <= TIE_TOL * max(1, max|input|) is always a candidate
NOISE_FACTOR = 4   # ... and so is |input| <= NOISE_FACTOR * (its float32 error)
PASSES = {0: "first", 1: "perturbed"}


def relus(model) -> list:
    """(path, ReLU) for every ReLU in the model, e.g. 'WideResnetGroup_2/WideResnetBlock_0/relu1'."""
    from .nn import ReLU
    return [(path, layer) for path, layer in model.named_layers() if isinstance(layer, ReLU)]


class ReluTies:
    """Watches every ReLU of the models it is installed on, records the candidate ties, and
    sets the side of the sites named in ``sides``.

    A site is ``((sync, rank), step, relu path, call, flat index)``: ``call`` counts the
    ReLU's forward passes within the step (0: the first pass at w, 1: the perturbed pass).
    ``sides`` maps sites to the side to take (True: the input counts as positive, the
    gradient flows); a site is set only while it is a candidate here, or always with
    ``force`` (for a float64 run of the very same step). ``reference`` maps ``site[:4]``
    to the same ReLU call's inputs in a float64 run of the same step, to measure the
    float32 noise; ``record`` keeps every input here (to be such a reference)."""

    def __init__(self, tol: float = TIE_TOL, sides: dict | None = None,
                 reference: dict | None = None, record: bool = False, force: bool = False):
        self.tol, self.sides, self.reference = tol, dict(sides or {}), reference or {}
        self.force = force
        self.found: list = []        # (site, value, band, float64 value or None)
        self.inputs: dict = {} if record else None
        self.where: dict = {}        # the step each model is running: set_step(tag, step)

    def set_step(self, tag, step):
        """Model ``tag`` is about to run ``step`` (None: outside any step)."""
        self.where[tag] = step

    def install(self, model, tag):
        for path, relu in relus(model):
            relu.forward = self._wrap(relu, relu.forward, tag, path)

    def band(self, key, x) -> float:
        """How close to zero an input of this ReLU call must be to count as a tie."""
        band = self.tol * max(1.0, float(np.abs(x).max()))
        ref = self.reference.get(key)
        if ref is not None and ref.shape == x.shape:
            band = max(band, NOISE_FACTOR * float(np.quantile(np.abs(x - ref), 0.999)))
        return band

    def _wrap(self, relu, forward, tag, path):
        calls = {}

        def wrapped(x, train=True):
            y = forward(x, train)
            step = self.where.get(tag)
            key = (tag, step, path, calls.setdefault(step, 0))
            calls[step] += 1
            xn = to_numpy(x)
            if self.inputs is not None:
                self.inputs[key] = xn.astype(np.float64)
            band = self.band(key, xn)
            near = np.abs(xn) <= band
            ref = self.reference.get(key)
            for flat in np.flatnonzero(near):
                r = None if ref is None or ref.shape != xn.shape else float(ref.flat[flat])
                self.found.append((key + (int(flat),), float(xn.flat[flat]), band, r))
            for site, side in self.sides.items():
                if site[:4] == key and (self.force or near.flat[site[4]]):
                    relu.mask[np.unravel_index(site[4], x.shape)] = side
            return y
        return wrapped


def candidates(found: list, step: int, scale: dict, limit: int = 32) -> list:
    """The ties of ``step``, closest to zero relative to the ReLU input's scale
    (``scale[site[:4]]``) first; at most ``limit``."""
    mine = [t for t in found if t[0][1] == step]
    return sorted(mine, key=lambda t: abs(t[1]) / scale.get(t[0][:4], 1.0))[:limit]


def disagreements(found: list, step: int, call: int, sides: dict) -> dict:
    """{site: the float64 run's side} for the ties of ``step``'s pass ``call`` that float32
    and float64 put on different sides (and that no side was set for yet). Only the first
    pass's are ties for sure: the perturbed pass's inputs move with every first-pass tie,
    so ask for them once the float64 run takes the first pass's sides."""
    return {site: ref > 0 for site, value, _, ref in found
            if site[1] == step and site[3] == call and ref is not None
            and (value > 0) != (ref > 0) and site not in sides}


def describe_tie(site, value) -> str:
    (sync, rank), step, relu, call, flat = site
    return (f"step {step}, replica {rank}, sync={sync}: ReLU {relu}, "
            f"{PASSES.get(call, f'call {call}')} pass, input element {flat} = {value:.3e}")
