"""Time the forms a 3x3 stride-1 convolution can take in NumPy, on WRN-16-4's shapes.

Issue #13 asks which convolution forms pay, per device and shape, from measurements. This
script measures them on the CPU it runs on (NumPy and its BLAS), each checked against
``minisam.nn.Conv`` before it is timed:

* ``im2col (9 slices)``: ``nn.conv.im2col``, the readable copy, then one GEMM
* ``im2col (strided view)``: ``nn.conv.im2col_strided``, one copy, then the GEMM (what
  ``Conv`` uses)
* ``implicit GEMM``: no cols matrix; nine GEMMs over shifted row ranges of the flattened
  padded input, accumulated (the output is computed on the padded width; the extra
  columns are dropped)
* ``Winograd F(2x2,3x3)``: 16 GEMMs on 4x4 input tiles (2.25x fewer multiplies), with the
  input and output transforms written as NumPy slice arithmetic

and, for the kernel gradient, ``cols^T @ dy`` against the implicit form's nine GEMMs; for
the stride-1 input gradient (a convolution of dy with the flipped kernel), ``Conv``'s own
pad + im2col + GEMM against the implicit form; and for the activation feeding a conv,
BatchNorm+ReLU written into a contiguous array and then padded (``Conv``'s pad copy)
against the same passes written straight into the interior of a zero-bordered buffer.
The winner is decided by the whole operation, transforms and copies included; only
``im2col (strided view)``, ``Conv``'s input gradient and the contiguous activation are in
the package.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/conv_forms.py [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minisam.nn.conv import Conv, im2col, im2col_strided, zero_pad  # noqa: E402

SHAPES = [(32, 32, 64, 64), (32, 16, 128, 128), (32, 8, 256, 256)]  # N, H=W, C_in, C_out


def best_ms(f, repeats=7):
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def im2col_forward(copy, x, k, cols, out):
    n, h, w, c = x.shape
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    copy(xpad, 3, 3, 1, h, w, cols)
    return np.matmul(cols.reshape(-1, 9 * c), k.reshape(-1, k.shape[-1]), out=out)


class Implicit:
    """Nine accumulating GEMMs over the flattened padded input: output row p (on the padded
    grid) needs input row p + a*(W+2) + b for tap (a, b), a contiguous row range."""

    def __init__(self, x, cout):
        n, h, w, c = x.shape
        self.hp, self.wp = h + 2, w + 2
        self.rows = n * self.hp * self.wp
        self.flat = np.zeros((self.rows + 2 * self.wp + 2, c), x.dtype)
        self.acc = np.empty((self.rows, cout), x.dtype)
        self.tmp = np.empty_like(self.acc)

    def forward(self, x, k):
        n, h, w, c = x.shape
        self.flat[:self.rows].reshape(n, self.hp, self.wp, c)[:, 1:h + 1, 1:w + 1] = x
        for a in range(3):
            for b in range(3):
                off = a * self.wp + b
                dst = self.acc if a == b == 0 else self.tmp
                np.matmul(self.flat[off:off + self.rows], k[a, b], out=dst)
                if dst is self.tmp:
                    self.acc += self.tmp
        return self.acc.reshape(n, self.hp, self.wp, -1)[:, :h, :w]

    def kernel_grad(self, x, dy):
        n, h, w, c = x.shape
        dyp = np.zeros((self.rows, dy.shape[-1]), dy.dtype)
        dyp.reshape(n, self.hp, self.wp, -1)[:, :h, :w] = dy
        return np.stack([self.flat[a * self.wp + b:a * self.wp + b + self.rows].T @ dyp
                         for a in range(3) for b in range(3)]).reshape(3, 3, c, -1)


class Winograd:
    """F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) . (B^T d B)] A per 4x4 tile d."""

    G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])

    def __init__(self, x, cout):
        n, h, w, c = x.shape
        th, tw = h // 2, w // 2
        self.xpad = np.zeros((n, h + 2, w + 2, c), x.dtype)
        self.u = np.empty((4, n, th, w + 2, c), x.dtype)
        self.v = np.empty((4, 4, n, th, tw, c), x.dtype)
        self.m = np.empty((16, n * th * tw, cout), x.dtype)
        self.r = np.empty((2, 4, n, th, tw, cout), x.dtype)
        self.y = np.empty((n, h, w, cout), x.dtype)

    def forward(self, x, k):
        n, h, w, c = x.shape
        th, tw = h // 2, w // 2
        G = self.G.astype(k.dtype)
        gk = np.einsum("ia,abco,jb->ijco", G, k, G, optimize=True).reshape(16, c, -1)
        self.xpad[:, 1:h + 1, 1:w + 1] = x
        d = [self.xpad[:, s:s + 2 * th:2] for s in range(4)]   # B^T = [[1,0,-1,0],[0,1,1,0],
        u = self.u                                              #        [0,-1,1,0],[0,1,0,-1]]
        np.subtract(d[0], d[2], out=u[0]); np.add(d[1], d[2], out=u[1])
        np.subtract(d[2], d[1], out=u[2]); np.subtract(d[1], d[3], out=u[3])
        e = [u[:, :, :, s:s + 2 * tw:2] for s in range(4)]
        v = self.v
        np.subtract(e[0], e[2], out=v[:, 0]); np.add(e[1], e[2], out=v[:, 1])
        np.subtract(e[2], e[1], out=v[:, 2]); np.subtract(e[1], e[3], out=v[:, 3])
        np.matmul(v.reshape(16, -1, c), gk, out=self.m)
        m, r = self.m.reshape(4, 4, n, th, tw, -1), self.r      # A^T = [[1,1,1,0],[0,1,-1,-1]]
        np.add(m[0], m[1], out=r[0]); r[0] += m[2]
        np.subtract(m[1], m[2], out=r[1]); r[1] -= m[3]
        y = self.y.reshape(n, th, 2, tw, 2, -1)
        for a in range(2):
            np.add(r[a, 0], r[a, 1], out=y[:, :, a, :, 0]); y[:, :, a, :, 0] += r[a, 2]
            np.subtract(r[a, 1], r[a, 2], out=y[:, :, a, :, 1]); y[:, :, a, :, 1] -= r[a, 3]
        return self.y


def measure(shape):
    n, h, cin, cout = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, cin)).astype(np.float32)
    conv = Conv(cin, cout, 3, 1, rng)
    k = conv.params["kernel"]
    ref = conv.forward(x).copy()
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    conv.backward(dy)
    dk_ref = conv.grads["kernel"].copy()
    cols = np.empty((n, h, h, 3, 3, cin), np.float32)
    out = np.empty((n * h * h, cout), np.float32)
    imp, win = Implicit(x, cout), Winograd(x, cout)
    forms = {
        "im2col (9 slices)": lambda: im2col_forward(im2col, x, k, cols, out),
        "im2col (strided view)": lambda: im2col_forward(im2col_strided, x, k, cols, out),
        "implicit GEMM": lambda: imp.forward(x, k),
        "Winograd F(2x2,3x3)": lambda: win.forward(x, k),
    }
    row = {"shape": {"N": n, "H": h, "W": h, "C_in": cin, "C_out": cout}, "forward_ms": {},
           "forward_max_rel_err": {}}
    for name, f in forms.items():
        y = np.asarray(f()).reshape(ref.shape)
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        assert err < 1e-5, (name, err)
        row["forward_ms"][name] = round(best_ms(f), 2)
        row["forward_max_rel_err"][name] = float(f"{err:.2e}")
    conv.forward(x)                      # its cols again (backward let them go)
    c = conv.cols
    dk_imp = imp.kernel_grad(x, dy)
    assert np.abs(dk_imp - dk_ref).max() / np.abs(dk_ref).max() < 1e-5
    row["kernel_grad_ms"] = {
        "cols^T @ dy": round(best_ms(lambda: c.T @ dy.reshape(-1, cout)), 2),
        "implicit (9 GEMMs)": round(best_ms(lambda: imp.kernel_grad(x, dy)), 2)}
    if cin == cout:
        dx_ref = conv.backward(dy)
        flipped = np.ascontiguousarray(k[::-1, ::-1].transpose(0, 1, 3, 2))
        imp_dx = Implicit(dy, cin)
        dx_imp = imp_dx.forward(dy, flipped)
        assert np.abs(dx_imp - dx_ref).max() / np.abs(dx_ref).max() < 1e-5
        row["input_grad_ms"] = {
            "pad + im2col + GEMM (Conv)": round(best_ms(lambda: conv._input_grad_as_conv(dy)), 2),
            "implicit (9 GEMMs)": round(best_ms(lambda: imp_dx.forward(dy, flipped)), 2)}
    row["bn_relu_into_conv_input_ms"] = bn_relu_output_forms(x)
    return row


def bn_relu_output_forms(x):
    """BatchNorm (train) + ReLU of x, the passes of ``nn.BatchNorm.forward`` and
    ``nn.ReLU.forward``, then what the next 3x3 conv needs: a zero-bordered copy. Either
    into a contiguous array and then ``zero_pad`` (as the package does), or with every
    elementwise pass writing into the interior of a zero-bordered buffer (no pad copy,
    but strided writes)."""
    n, h, w, c = x.shape
    x2 = x.reshape(-1, c)
    mean = x2.mean(axis=0)
    var = np.einsum("mc,mc->c", x2, x2) / len(x2) - mean * mean
    a = (1.0 / np.sqrt(var + 1e-5)).astype(x.dtype)
    bias = np.linspace(-0.5, 0.5, c, dtype=x.dtype)
    border = np.zeros((n, h + 2, w + 2, c), x.dtype)
    inner = border[:, 1:h + 1, 1:w + 1]

    def passes(out):
        centred = x - mean
        y = np.multiply(centred, a, out=out)
        y += bias
        mask = y > 0
        return np.maximum(y, 0, out=y), mask

    def contiguous():
        return zero_pad(passes(None)[0], (1, 1, 1, 1), scratch=True)

    def bordered():
        passes(inner)
        return border
    assert np.array_equal(contiguous(), bordered())
    pad_only = lambda: zero_pad(x, (1, 1, 1, 1), scratch=True)  # noqa: E731
    return {"contiguous + zero_pad copy (used)": round(best_ms(contiguous), 2),
            "written into the padded interior": round(best_ms(bordered), 2),
            "zero_pad copy alone": round(best_ms(pad_only), 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    for shape in SHAPES:
        r = measure(shape)
        rows.append(r)
        s = r["shape"]
        print(f"N={s['N']} {s['H']}x{s['W']} {s['C_in']}->{s['C_out']}: forward "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in r["forward_ms"].items())
              + "; kernel grad " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["kernel_grad_ms"].items()))
        for key, label in (("input_grad_ms", "input grad"),
                           ("bn_relu_into_conv_input_ms", "BN+ReLU into the next conv's input")):
            if key in r:
                print(f"    {label}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r[key].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"numpy": np.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
