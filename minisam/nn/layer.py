"""The one abstraction in minisam: a layer with a forward and a hand-written backward.

``forward(x, train)`` computes the output and keeps on ``self`` whatever ``backward``
will need (the cs231n "cache"); ``backward(dy)`` takes dL/dy, writes dL/dparam into
``self.grads`` and returns dL/dx. Composite layers (a residual block, the whole
WideResnet) hold their sub-layers in ``self.children`` under their flax names and spell
out their own backward; the flat, flax-style parameter paths
(``"WideResnetGroup_0/WideResnetBlock_0/conv1/kernel"``) come from walking that tree.
Parameterless layers (ReLUs, pools, the shortcut) are children too, so ``named_layers()``
reaches every layer; they add no keys to the parameter dicts.
"""
from __future__ import annotations


class Layer:
    def __init__(self):
        self.params: dict = {}    # trainable arrays, local names ("kernel", "scale", ...)
        self.grads: dict = {}     # same keys as params, filled by backward
        self.state: dict = {}     # non-trainable arrays (batch-norm running statistics)
        self.children: dict[str, Layer] = {}  # sub-layers, by flax name where flax has one

    def forward(self, x, train: bool = True):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    # -- flat dicts of the whole tree, keyed by flax paths ------------------------------
    def named_layers(self):
        """(path, layer) for this layer ("") and every layer below it, parents first,
        e.g. ("WideResnetGroup_2/WideResnetBlock_0/relu1", ReLU)."""
        for prefix, layer in self._walk():
            yield prefix.rstrip("/"), layer

    def _walk(self, prefix=""):
        yield prefix, self
        for name, child in self.children.items():
            yield from child._walk(f"{prefix}{name}/")

    def _flat(self, attr: str) -> dict:
        return {p + k: v for p, layer in self._walk() for k, v in getattr(layer, attr).items()}

    def _load(self, attr: str, flat: dict, what: str):
        expected = self._flat(attr)
        missing = sorted(set(expected) - set(flat))
        unexpected = sorted(set(flat) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{what} do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                f"pass a dict with exactly the keys of model.get_{attr}()")
        for p, layer in self._walk():
            for k, old in getattr(layer, attr).items():
                new = flat[p + k]
                if tuple(new.shape) != tuple(old.shape):
                    raise ValueError(f"{what} {p + k!r}: expected shape {tuple(old.shape)}, "
                                     f"got {tuple(new.shape)}")
                getattr(layer, attr)[k] = new

    def get_params(self) -> dict:
        """All trainable parameters as a flat dict {flax path: array} (no copies)."""
        return self._flat("params")

    def get_grads(self) -> dict:
        """The gradients written by the last backward, keyed like get_params()."""
        return self._flat("grads")

    def get_state(self) -> dict:
        """Batch-norm running statistics as a flat dict {path/mean, path/var: array}."""
        return self._flat("state")

    def set_params(self, params: dict):
        self._load("params", params, "parameters")

    def set_state(self, state: dict):
        self._load("state", state, "state")

    def num_params(self) -> int:
        return sum(int(v.size) for v in self.get_params().values())


class Identity(Layer):
    """y = x, dL/dx = dL/dy: stands where a layer is switched off (a WideResnet without
    batch norm keeps its structure and names, with no parameters there)."""

    def forward(self, x, train=True):
        return x

    def backward(self, dy):
        return dy
