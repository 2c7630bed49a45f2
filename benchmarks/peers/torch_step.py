"""PyTorch peer for minisam's benchmark: google-research/sam's WideResNet and SAM step.

Mirrors, in PyTorch (float32):

* ``sam_jax/models/wide_resnet.py``: ``WideResnet``, ``WideResnetGroup``,
  ``WideResnetBlock`` and ``_output_add`` (identity + avg-pool + zero-channel-padding
  shortcuts, pre-activation blocks, ``activate_before_residual`` on the first block);
* ``sam_jax/models/utils.py``: ``activation`` (BatchNorm momentum 0.9, eps 1e-5, then
  ReLU), ``conv_kernel_init_fn`` (variance_scaling(2.0, 'fan_out', 'normal')) and
  ``dense_layer_init_fn`` (U[-1/sqrt(n_out), 1/sqrt(n_out)]);
* ``sam_jax/training_utils/flax_training.py``: ``train_step`` with
  ``forward_and_loss`` (cross-entropy + 0.5 * wd * sum of squares of all parameters),
  ``get_sam_gradient`` / ``dual_vector`` (e = rho * g / ||g||, global norm; the second
  gradient is taken at w + e; BatchNorm state comes from the first pass) and
  ``flax.optim.Momentum(beta=0.9, nesterov=True)``. Gradient clipping (the JAX code's
  ``--gradient_clipping``) and the learning-rate schedule are left out: constant lr 0.1.

Implementation notes:

* Convolutions use XLA's 'SAME' padding exactly: the 3x3 stride-2 convolutions on an even
  input pad 0 rows/cols before and 1 after (``F.pad``), stride-1 ones pad 1 on each side.
* The weight-decay term is not built into the autograd graph: its gradient, wd * w, is
  added to the gradient with one fused ``_foreach_add_`` (the same number, fewer kernels).
* BatchNorm running statistics are saved before the second SAM pass and restored after
  it, so they come from the first pass only, as in the JAX code.
* Activations and weights are in ``channels_last`` memory format; cuDNN autotuning is on
  and TF32 is off on GPU (plain float32, like minisam). Pass ``--tf32`` to allow it.
* Rows: ``pytorch-eager``, and ``pytorch-compile`` = ``torch.compile(model)`` (forward
  and, through AOTAutograd, backward) plus ``torch.compile`` of the two update functions
  (SAM perturbation, Nesterov step). Each row runs in its own subprocess, so the CPU
  peak RSS of one row does not leak into the other.

Usage::

    python benchmarks/peers/torch_step.py --model wrn16_4 --batch-size 32 --device cpu \
        --warmup 3 --steps 10 --threads 2 --json out.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- model

def _same_padding(size: int, kernel: int, stride: int):
    """XLA/TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """3x3 convolution without bias and with XLA 'SAME' padding (``flax.nn.Conv``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 3, stride=stride, padding=0, bias=False)
        # conv_kernel_init_fn: variance_scaling(2.0, 'fan_out', 'normal')
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        s = self.stride[0]
        ph = _same_padding(x.shape[-2], 3, s)
        pw = _same_padding(x.shape[-1], 3, s)
        if ph == (1, 1) and pw == (1, 1):
            return F.conv2d(x, self.weight, None, self.stride, 1)
        return F.conv2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), self.weight, None, self.stride, 0)


def _bn(c: int) -> nn.BatchNorm2d:
    # Flax momentum 0.9 (new = 0.9 old + 0.1 batch) is PyTorch momentum 0.1.
    return nn.BatchNorm2d(c, eps=common.BN_EPSILON, momentum=1.0 - common.BN_MOMENTUM)


def output_add(block_x, orig_x):
    """``_output_add``: avg-pool (window = stride) and zero-pad channels when they differ."""
    if block_x.shape[1] != orig_x.shape[1]:
        stride = orig_x.shape[-1] // block_x.shape[-1]
        if stride > 1:
            orig_x = F.avg_pool2d(orig_x, stride, stride)
        orig_x = F.pad(orig_x, (0, 0, 0, 0, 0, block_x.shape[1] - orig_x.shape[1]))
    return block_x + orig_x


class WideResnetBlock(nn.Module):
    """``WideResnetBlock``: [init_bn+relu] -> conv1 (stride) -> bn_2+relu -> conv2, + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.init_bn = _bn(cin)
        self.conv1 = SameConv2d(cin, cout, stride)
        self.bn_2 = _bn(cout)
        self.conv2 = SameConv2d(cout, cout, 1)

    def forward(self, x):
        if self.activate_before_residual:
            x = F.relu(self.init_bn(x))
            orig_x = block_x = x
        else:
            orig_x = x
            block_x = F.relu(self.init_bn(x))
        block_x = self.conv1(block_x)
        block_x = F.relu(self.bn_2(block_x))
        block_x = self.conv2(block_x)
        return output_add(block_x, orig_x)


class WideResnet(nn.Module):
    """``WideResnet`` (without the optional additional skip connections, as by default)."""

    def __init__(self, blocks_per_group: int, channel_multiplier: int, num_outputs: int = 10):
        super().__init__()
        self.init_conv = SameConv2d(3, 16, 1)
        blocks, cin = [], 16
        for g, (ch, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):  # WideResnetGroup x3
            cout = ch * channel_multiplier
            for i in range(blocks_per_group):
                blocks.append(WideResnetBlock(cin, cout, stride if i == 0 else 1,
                                              activate_before_residual=(g == 0 and i == 0)))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pre_pool_bn = _bn(cin)
        self.dense = nn.Linear(cin, num_outputs)
        scale = 1.0 / num_outputs ** 0.5  # dense_layer_init_fn
        nn.init.uniform_(self.dense.weight, -scale, scale)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x):
        x = self.init_conv(x)
        x = self.blocks(x)
        x = F.relu(self.pre_pool_bn(x))
        x = x.mean(dim=(2, 3))  # nn.avg_pool over the whole map, then reshape
        return self.dense(x)


def build_model(name: str, num_classes: int) -> WideResnet:
    bpg, k = common.MODELS[name]
    return WideResnet(bpg, k, num_classes)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- step

def _perturb(params, grads, rho: float):
    """dual_vector + noised model: e = rho * g / ||g||_2 (global); w += e; returns e."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    e = torch._foreach_mul(grads, rho / norm)
    torch._foreach_add_(params, e)
    return e


def _nesterov(params, grads, moms, lr: float, beta: float):
    """flax.optim.Momentum(nesterov=True): m = beta m + g; w -= lr (g + beta m)."""
    torch._foreach_mul_(moms, beta)
    torch._foreach_add_(moms, grads)
    update = torch._foreach_add(grads, moms, alpha=beta)
    torch._foreach_add_(params, update, alpha=-lr)


class Trainer:
    """Holds the model, its momentum buffers and the two steps (SGD and SAM)."""

    def __init__(self, model: nn.Module, compile_: bool = False):
        self.model = model
        self.params = [p for p in model.parameters()]
        self.moms = [torch.zeros_like(p) for p in self.params]
        self.bn_stats = [b for n, b in model.named_buffers() if "running_" in n]
        self.forward = torch.compile(model) if compile_ else model
        self.perturb = torch.compile(_perturb) if compile_ else _perturb
        self.nesterov = torch.compile(_nesterov) if compile_ else _nesterov

    def loss_and_grads(self, x, y):
        """forward_and_loss + value_and_grad: CE loss and d/dw [CE + 0.5 wd ||w||^2]."""
        loss = F.cross_entropy(self.forward(x), y)
        grads = list(torch.autograd.grad(loss, self.params))
        with torch.no_grad():
            torch._foreach_add_(grads, self.params, alpha=common.WEIGHT_DECAY)
        return loss.detach(), grads

    @torch.no_grad()
    def full_loss(self, x, y) -> float:
        """CE (batch statistics, train mode) + weight penalty, for the correctness check."""
        saved = [b.clone() for b in self.bn_stats]
        loss = F.cross_entropy(self.model(x), y)
        for b, s in zip(self.bn_stats, saved):
            b.copy_(s)
        l2 = sum(float(p.square().sum()) for p in self.params)
        return float(loss) + 0.5 * common.WEIGHT_DECAY * l2

    def sgd_step(self, x, y):
        _, grads = self.loss_and_grads(x, y)
        with torch.no_grad():
            self.nesterov(self.params, grads, self.moms, common.LEARNING_RATE, common.MOMENTUM)

    def sam_step(self, x, y):
        _, grads = self.loss_and_grads(x, y)            # first pass: updates BN stats
        with torch.no_grad():
            saved = [b.clone() for b in self.bn_stats]
            e = self.perturb(self.params, grads, common.RHO)
        _, grads = self.loss_and_grads(x, y)            # second pass at w + e
        with torch.no_grad():
            torch._foreach_copy_(self.bn_stats, saved)  # BN state of the first pass only
            torch._foreach_sub_(self.params, e)
            self.nesterov(self.params, grads, self.moms, common.LEARNING_RATE, common.MOMENTUM)


# --------------------------------------------------------------------------- benchmark

def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return common.cpu_name()


def versions() -> dict:
    v = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import numpy
        v["numpy"] = numpy.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version()
    v["torch_threads"] = torch.get_num_threads()
    return v


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("--device gpu but torch.cuda.is_available() is False")
        dev = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    else:
        dev = torch.device("cpu")
    return dev


def make_trainer(args, dev, compile_: bool) -> Trainer:
    torch.manual_seed(common.SEED)
    model = build_model(args.model, args.num_classes).to(dev, memory_format=torch.channels_last)
    model.train()
    return Trainer(model, compile_)


def make_batch(args, dev):
    x, y = common.synthetic_batch(args.batch_size, args.num_classes)
    # NHWC memory viewed as NCHW = channels_last
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(dev)
    return xt, torch.from_numpy(y).to(dev)


def run_row(args) -> dict:
    """Time one row (eager or compile) in this process."""
    compile_ = args.mode == "compile"
    framework = "pytorch-compile" if compile_ else "pytorch-eager"
    dev = setup(args)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    x, y = make_batch(args, dev)
    cuda = dev.type == "cuda"

    # SGD and SAM each start from the same freshly initialised model.
    trainer = make_trainer(args, dev, compile_)
    n = num_params(trainer.model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    sgd = common.time_steps(lambda: trainer.sgd_step(x, y), sync, args.warmup, args.steps)
    sgd_mem = (torch.cuda.max_memory_allocated(dev) / 2**20) if cuda else common.peak_rss_mb()
    del trainer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    trainer = make_trainer(args, dev, compile_)
    sam = common.time_steps(lambda: trainer.sam_step(x, y), sync, args.warmup, args.steps)
    sam_mem = (torch.cuda.max_memory_allocated(dev) / 2**20) if cuda else common.peak_rss_mb()
    final_loss = trainer.full_loss(x, y)

    return common.make_row(
        framework, device_name(dev), args, sgd, sam, max(sgd_mem, sam_mem), versions(),
        sgd_peak_memory_mb=round(sgd_mem, 1), sam_peak_memory_mb=round(sam_mem, 1),
        memory_kind=("torch.cuda.max_memory_allocated" if cuda
                     else "ru_maxrss of the whole process (cumulative: SAM value includes SGD phase)"),
        num_params=n, final_loss=round(final_loss, 4), tf32=bool(args.tf32 and cuda),
        padding="XLA SAME (F.pad 0/1 for stride 2)", memory_format="channels_last",
        threads=torch.get_num_threads(),
        **({"compile_first_step_s_note": "first warm-up step includes torch.compile",
            "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (may be warm)")}
           if compile_ else {}))


def error_row(args, framework: str, msg: str) -> dict:
    return common.make_row(framework, "", args, None, None, None, {"torch": torch.__version__},
                           error=msg, tf32=bool(args.tf32 and args.device != "cpu"))


def run_child(args, mode: str, timeout: float) -> dict:
    """Run one row in a fresh subprocess (separate peak RSS, isolated compile failures)."""
    framework = f"pytorch-{mode}"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode,
               "--model", args.model, "--batch-size", str(args.batch_size),
               "--num-classes", str(args.num_classes), "--device", args.device,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--json", out]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.tf32:
            cmd += ["--tf32"]
        env = dict(os.environ)
        if mode == "compile" and args.cold_compile:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(d, "inductor-cache")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return error_row(args, framework,
                             f"timed out after {timeout:.0f} s (compile + warm-up + timed steps)")
        wall = time.perf_counter() - t0
        sys.stderr.write(p.stderr[-4000:])
        if p.returncode != 0 or not os.path.exists(out):
            tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
            return error_row(args, framework,
                             f"exit code {p.returncode}: " + " | ".join(tail)[-2000:])
        with open(out) as f:
            row = json.load(f)
        row["row_wall_s"] = round(wall, 1)
        return row


def check(args) -> int:
    """Parameter count and loss over --check-steps SAM steps on one fixed batch."""
    dev = setup(args)
    trainer = make_trainer(args, dev, args.mode == "compile")
    x, y = make_batch(args, dev)
    losses = [trainer.full_loss(x, y)]
    for _ in range(args.check_steps):
        trainer.sam_step(x, y)
        losses.append(trainer.full_loss(x, y))
    ok = common.print_check(f"pytorch-{args.mode}", num_params(trainer.model), losses)
    return 0 if ok else 1


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--mode", default="both", choices=["both", "eager", "compile"],
                       help="'both' runs each row in its own subprocess")
        p.add_argument("--compile-timeout", type=float, default=300.0,
                       help="seconds allowed for torch.compile, on top of twice the eager "
                            "row's run time (mode both)")
        p.add_argument("--cold-compile", action="store_true",
                       help="give the compile row an empty inductor cache, so its first "
                            "warm-up step times a cold torch.compile (mode both)")
        p.add_argument("--tf32", action="store_true", help="allow TF32 on GPU")
        p.add_argument("--count-params", action="store_true",
                       help="print the parameter count and exit")

    args = common.parse_args(__doc__.splitlines()[0], argv, extra)
    if args.count_params:
        print(num_params(build_model(args.model, args.num_classes)))
        return 0
    if args.check_steps:
        if args.mode == "both":
            args.mode = "eager"
        return check(args)
    if args.mode == "both":
        rows = [run_child(args, "eager", timeout=None)]
        eager_wall = rows[0].get("row_wall_s") or 600.0
        rows.append(run_child(args, "compile", timeout=args.compile_timeout + 2 * eager_wall))
    else:
        try:
            rows = [run_row(args)]
        except Exception as e:  # record the failure instead of a number
            rows = [error_row(args, f"pytorch-{args.mode}", f"{type(e).__name__}: {e}")]
            common.emit(rows, args.json)
            raise
    common.emit(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
