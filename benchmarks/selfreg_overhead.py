"""Cost of the SelfReg regulariser in a full training step of the paper's UNet: ours vs the authors' loss.

Usage:
    python benchmarks/selfreg_overhead.py                      # CUDA: paper size; CPU: a small size, ~3 min
    python benchmarks/selfreg_overhead.py --device cuda --modes fp32,bf16-cl --json selfreg_overhead.json
    python benchmarks/selfreg_overhead.py --device cpu --batch-size 4 --size 96 --width 16 --steps 40
    python benchmarks/selfreg_overhead.py --traffic             # bytes moved and aten ops of each loss, no timing

One process, synthetic inputs (random image, random labels), one training step = forward, loss, backward, SGD
step (momentum 0.9, weight decay 1e-4, as the authors). Arms, each on its own copy of the same initial network:

- ``none``: no SelfReg, our vectorised CE + Dice (``DiceCELoss``, 0.4 CE + 0.6 Dice);
- ``fused``: ``none`` + our SelfReg (``FeatureTaps`` hooks + ``SelfRegLoss``, the default fused implementation,
  random pairing from a ``torch.Generator`` on the device);
- ``fused-torch`` (CPU only): ``fused`` with the CPU kernels off (``selfreg.fused.CPU_KERNELS = False``), i.e. the
  eager torch ops that CUDA runs, timed on the CPU;
- ``fused-compile`` (CUDA only, unless ``--arms`` names it): the same with ``implementation="fused-compile"``
  (the per-tap math through ``torch.compile``; compiled during the warm-up);
- ``ours-eager``: the same with ``implementation="reference"``, the plain-autograd version the fused one replaced;
- ``authors-none``: no SelfReg, the authors' CE + Dice (Dice with a per-class Python loop that calls ``.item()``
  on every class);
- ``authors``: ``authors-none`` + the authors' ``KDloss`` (python ``random.sample`` pairing on both sides,
  ``F_final`` pooled from full resolution for every tap, the IFD score computed with autograd on), features
  returned by the forward pass as the authors' ``UNet_hd`` does. Written from the description in
  ``docs/method.md`` §1-§2 and the authors' code it cites, not copied.

After the warm-up, the arms are timed interleaved: ``rounds`` rounds, each timing a block of steps of every arm
(arm order rotated every round), so load drift on a shared machine affects all arms alike; the median of the
per-round ms/step is reported. Then the loss terms alone are timed on features captured from one forward pass
(forward only, and forward + backward into leaf copies of the features), to show where the overhead comes from.

Modes: ``fp32`` (cuDNN deterministic, no benchmark: the authors' setting), ``fp32-cl`` (fp32, channels_last: the
CPU preset of ``experiments.run``) and ``bf16-cl`` (bf16 autocast, channels_last, ``cudnn.benchmark=True``). On
CUDA the table also gives each arm's peak memory (its peak minus the parameters and optimizer state of the other
arms' networks), the host synchronisations one step makes (``torch.cuda.set_sync_debug_mode``) and the CUDA
kernels one step launches (``torch.profiler``), and the loss-only table the kernels of each loss forward +
backward. On CPU the default is one torch thread: on a shared 2-core machine two OpenMP threads competing with
other processes make the timings erratic (``--threads 0`` for torch's default). ``--traffic`` instead counts the
bytes each SelfReg loss moves (forward + backward) and its aten ops, a GPU-time proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_selfreg import DiceCELoss, FeatureTaps, SelfRegLoss
from lightning_selfreg.models import UNet
from lightning_selfreg.selfreg import fused as fused_losses

ALL_ARMS = ("none", "fused", "fused-torch", "fused-compile", "ours-eager", "authors-none", "authors")
SELFREG_ARMS = {"fused": "fused", "fused-torch": "fused", "fused-compile": "fused-compile",
                "ours-eager": "reference"}  # arm -> implementation
BASELINE = {"fused": "none", "fused-torch": "none", "fused-compile": "none", "ours-eager": "none",
            "authors": "authors-none"}


@contextlib.contextmanager
def cpu_kernels_for(arm: str):
    """The CPU kernels of the fused loss on, except for the ``fused-torch`` arm (its eager torch ops)."""
    before = fused_losses.CPU_KERNELS
    fused_losses.CPU_KERNELS = before and arm != "fused-torch"
    try:
        yield
    finally:
        fused_losses.CPU_KERNELS = before
MODES = ("fp32", "fp32-cl", "bf16-cl")
SEG_PARTS = ("ours DiceCELoss fwd+bwd", "authors CE+Dice fwd+bwd")


# ---------------------------------------------------------------------------------------------------------------
# The authors' losses, re-implemented from their code (docs/method.md §1-§2: KDloss; and their Dice loss), for
# comparison only.
# ---------------------------------------------------------------------------------------------------------------
def authors_inter_fd(f_s: Tensor, f_t: Tensor) -> Tensor:
    """SCR as in the authors' code: pool F_final (from full resolution) to (H, H), random.sample on both sides."""
    s_c, t_c, s_h, t_h = f_s.shape[1], f_t.shape[1], f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    n = min(s_c, t_c)
    idx_s = random.sample(range(s_c), n)
    idx_t = random.sample(range(t_c), n)
    return F.mse_loss(f_s[:, idx_s], f_t[:, idx_t].detach())


def authors_intra_fd(f_s: Tensor) -> Tensor:
    """IFD as in the authors' code: score with autograd on, sort, index_select, MSE of the two halves."""
    score = F.normalize(f_s, p=2, dim=(2, 3)).mean([0, 2, 3])
    _, order = torch.sort(score, descending=True)
    f_s = torch.index_select(f_s, 1, order)
    c = f_s.shape[1]
    return F.mse_loss(f_s[:, : c // 2], f_s[:, c // 2 : c])


def authors_kd_loss(enc: list[Tensor], dec: list[Tensor], final: Tensor, lam: float = 0.015) -> Tensor:
    """The UNet aggregation: lambda * [IFD(enc)/4 + IFD(dec)/3 + SCR(dec + enc vs final)/7], one lambda_x."""
    ifd_enc = sum(authors_intra_fd(f) for f in enc) / len(enc)
    ifd_dec = sum(authors_intra_fd(f) for f in dec) / len(dec)
    students = [*dec, *enc]
    scr = sum(authors_inter_fd(f, final) for f in students) / len(students)
    return lam * (ifd_enc + ifd_dec + scr)


class AuthorsDiceLoss:
    """The authors' soft Dice: softmax, one-hot by a per-class loop, per-class Dice over the batch with `.item()`."""

    def __init__(self, n_classes: int, smooth: float = 1e-5) -> None:
        self.n_classes = n_classes
        self.smooth = smooth

    def _one_hot(self, target: Tensor) -> Tensor:
        return torch.cat([(target == i).unsqueeze(1) for i in range(self.n_classes)], dim=1).float()

    def _dice(self, score: Tensor, target: Tensor) -> Tensor:
        inter = torch.sum(score * target)
        y_sum = torch.sum(target * target)
        z_sum = torch.sum(score * score)
        return 1 - (2 * inter + self.smooth) / (z_sum + y_sum + self.smooth)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        prob = torch.softmax(logits, dim=1)
        onehot = self._one_hot(target)
        loss = 0.0
        class_wise = []
        for i in range(self.n_classes):
            dice = self._dice(prob[:, i], onehot[:, i])
            class_wise.append(1.0 - dice.item())  # a host sync per class, as in the authors' loss
            loss = loss + dice
        return loss / self.n_classes


def authors_seg_loss(dice: AuthorsDiceLoss, logits: Tensor, target: Tensor) -> Tensor:
    """Synapse recipe: 0.4 CE + 0.6 Dice."""
    return 0.4 * F.cross_entropy(logits, target.long()) + 0.6 * dice(logits, target)


def forward_with_features(net: UNet, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """``UNet.forward`` that also returns (encoder taps, decoder taps, F_final), like the authors' ``UNet_hd``."""
    skips = [net.inc(x)]
    for i in range(1, net.depth + 1):
        skips.append(getattr(net, f"down{i}")(skips[-1]))
    enc = skips[1:]
    y = skips.pop()
    ups = []
    for j in range(1, net.depth + 1):
        y = getattr(net, f"up{j}")(y, skips.pop())
        ups.append(y)
    return net.outc(y), enc, ups[:-1], ups[-1]


# ---------------------------------------------------------------------------------------------------------------
# Timing machinery
# ---------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(net: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in net.parameters())
    n += sum(b.numel() * b.element_size() for b in net.buffers())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, Tensor))
    return n


def count_host_syncs(step: Callable[[], None]) -> int | None:
    """Synchronising CUDA calls made by one step (``torch.cuda.set_sync_debug_mode``); None if it cannot tell."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)
    except Exception:  # diagnostics only: never let them break the timing
        return None


def channels_last(mode: str) -> bool:
    return mode.endswith("-cl")


def autocast_kwargs(mode: str, device: torch.device) -> dict:
    return dict(device_type=device.type, dtype=torch.bfloat16, enabled=mode == "bf16-cl")


def count_cuda_kernels(fn: Callable[[], None]) -> int | None:
    """CUDA kernels (incl. memset/memcpy) one call of ``fn`` launches, from ``torch.profiler``; None if unknown."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:  # diagnostics only
        return None


def set_mode(mode: str) -> None:
    if mode.startswith("fp32"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def build_arms(args, mode: str, device: torch.device, init: dict, x: Tensor, y: Tensor):
    """Return ``{arm: (step_fn, net, opt)}`` and the FeatureTaps to remove afterwards."""
    amp = autocast_kwargs(mode, device)
    ours_seg = DiceCELoss(args.classes)
    authors_dice = AuthorsDiceLoss(args.classes)
    arms, taps_list = {}, []

    def make_net():
        net = UNet(1, args.classes, base_channels=args.width)
        net.load_state_dict(init)
        net = net.to(device).train()
        if channels_last(mode):
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        return net, opt

    def finish(loss: Tensor, opt) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for arm in args.arms:
        net, opt = make_net()
        if arm == "none":

            def step(net=net, opt=opt):
                with torch.autocast(**amp):
                    loss, _ = ours_seg(net(x), y)
                finish(loss, opt)

        elif arm in SELFREG_ARMS:
            spec = net.tap_spec
            taps = FeatureTaps(net, spec.paths)
            taps_list.append(taps)
            selfreg = SelfRegLoss(spec.ifd_groups, spec.scr_groups, implementation=SELFREG_ARMS[arm])
            gen = torch.Generator(device=device)
            gen.manual_seed(0)

            def step(net=net, opt=opt, taps=taps, selfreg=selfreg, gen=gen, final=spec.final, arm=arm):
                with torch.autocast(**amp), cpu_kernels_for(arm):
                    with taps.capture():
                        logits = net(x)
                    feats = taps.pop()
                    seg, _ = ours_seg(logits, y)
                    reg, _ = selfreg(feats, feats[final], gen)
                finish(seg + reg, opt)

        elif arm == "authors-none":

            def step(net=net, opt=opt):
                with torch.autocast(**amp):
                    loss = authors_seg_loss(authors_dice, net(x), y)
                finish(loss, opt)

        else:

            def step(net=net, opt=opt):
                with torch.autocast(**amp):
                    logits, enc, dec, final = forward_with_features(net, x)
                    loss = authors_seg_loss(authors_dice, logits, y) + authors_kd_loss(enc, dec, final)
                finish(loss, opt)

        arms[arm] = (step, net, opt)
    return arms, taps_list


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    block: int,
    device: torch.device,
    mem_other: dict[str, int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-round ms per call of every fn (blocks of ``block`` calls, order rotated per round); peak memory (GiB)."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if device.type == "cuda" and mem_other is not None:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                fns[name]()
            sync(device)
            samples[name].append(1e3 * (time.perf_counter() - t0) / block)
            if device.type == "cuda" and mem_other is not None:
                peak = (torch.cuda.max_memory_allocated(device) - mem_other[name]) / 2**30
                peaks[name] = max(peaks.get(name, 0.0), peak)
    return samples, peaks


def summarise(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "q1_ms": q[0], "q3_ms": q[2], "min_ms": min(samples)}


def bench_steps(args, mode: str, device: torch.device, init: dict, x: Tensor, y: Tensor) -> dict:
    set_mode(mode)
    xm = x.to(memory_format=torch.channels_last) if channels_last(mode) else x
    arms, taps_list = build_arms(args, mode, device, init, xm, y)
    try:
        # warm-up, interleaved too (cudnn.benchmark autotuning, allocator caches, momentum buffers)
        for _ in range(args.warmup):
            for step, _, _ in arms.values():
                step()
        sync(device)
        mem_other, syncs, kernels = None, {}, {}
        if device.type == "cuda":
            syncs = {a: count_host_syncs(step) for a, (step, _, _) in arms.items()}
            kernels = {a: count_cuda_kernels(step) for a, (step, _, _) in arms.items()}
            sync(device)
            own = {a: state_bytes(net, opt) for a, (_, net, opt) in arms.items()}
            mem_other = {a: sum(v for b, v in own.items() if b != a) for a in arms}
        block = max(1, args.steps // args.rounds)
        fns = {a: s for a, (s, _, _) in arms.items()}
        samples, peaks = time_interleaved(fns, args.rounds, block, device, mem_other)
        result = {}
        for arm in args.arms:
            stats = summarise(samples[arm])
            stats["images_per_s"] = args.batch_size * 1e3 / stats["median_ms"]
            stats["peak_gib"] = peaks.get(arm)
            stats["host_syncs_per_step"] = syncs.get(arm)
            stats["cuda_kernels_per_step"] = kernels.get(arm)
            stats["samples_ms"] = samples[arm]
            result[arm] = stats
        # ratios: each arm vs our no-SelfReg arm, and each SelfReg arm vs its own no-SelfReg arm
        base = result["none"]["median_ms"] if "none" in result else None
        for arm in args.arms:
            result[arm]["vs_none"] = None if base is None else result[arm]["median_ms"] / base
            ref = BASELINE.get(arm)
            if ref in result:
                result[arm]["selfreg_overhead"] = result[arm]["median_ms"] / result[ref]["median_ms"] - 1
                # paired per-round ratios (the same round, adjacent blocks): robust to slow drift
                paired = [a / b for a, b in zip(samples[arm], samples[ref], strict=True)]
                result[arm]["paired_overhead_median"] = statistics.median(paired) - 1
        return result
    finally:
        for taps in taps_list:
            taps.remove()


def loss_arms(args) -> list[str]:
    """The SelfReg losses of the loss-only and traffic tables: our implementations among the arms, and the authors'."""
    return [a for a in args.arms if a in SELFREG_ARMS] + ["authors"]


def bench_loss_only(args, mode: str, device: torch.device, init: dict, x: Tensor, y: Tensor) -> dict:
    """Time the loss terms alone on features captured from one training-mode forward pass."""
    set_mode(mode)
    amp = autocast_kwargs(mode, device)
    net = UNet(1, args.classes, base_channels=args.width)
    net.load_state_dict(init)
    net = net.to(device).train()
    if channels_last(mode):
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    spec = net.tap_spec
    with torch.no_grad(), torch.autocast(**amp):
        logits, enc, dec, final = forward_with_features(net, x)
    del net
    names = [f"down{i}" for i in range(1, len(enc) + 1)] + [f"up{j}" for j in range(1, len(dec) + 1)]
    captured = dict(zip(names, [*enc, *dec], strict=True)) | {spec.final: final}
    feats = {k: v.detach().clone().requires_grad_() for k, v in captured.items()}  # clone keeps the strides
    logit_leaf = logits.detach().clone().requires_grad_()
    ours_seg = DiceCELoss(args.classes)
    authors_dice = AuthorsDiceLoss(args.classes)
    n_enc = len(enc)

    def selfreg_fn(arm: str) -> Callable[[], Tensor]:
        if arm == "authors":
            return lambda: authors_kd_loss([feats[n] for n in names[:n_enc]], [feats[n] for n in names[n_enc:]],
                                           feats[spec.final])
        selfreg = SelfRegLoss(spec.ifd_groups, spec.scr_groups, implementation=SELFREG_ARMS[arm])
        gen = torch.Generator(device=device)
        gen.manual_seed(0)

        def loss() -> Tensor:
            with cpu_kernels_for(arm):
                return selfreg(feats, feats[spec.final], gen)[0]
        return loss

    def fwd(loss: Callable[[], Tensor]) -> Callable[[], None]:
        def run():
            with torch.autocast(**amp):
                loss()
        return run

    def fwdbwd(loss: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], None]:
        def run():
            for v in leaves:
                v.grad = None
            with torch.autocast(**amp):
                total = loss()
            total.backward()
        return run

    fns: dict[str, Callable[[], None]] = {}
    for arm in loss_arms(args):
        loss = selfreg_fn(arm)
        fns[f"{arm} SelfReg fwd"] = fwd(loss)
        fns[f"{arm} SelfReg fwd+bwd"] = fwdbwd(loss, list(feats.values()))
    fns["ours DiceCELoss fwd+bwd"] = fwdbwd(lambda: ours_seg(logit_leaf, y)[0], [logit_leaf])
    fns["authors CE+Dice fwd+bwd"] = fwdbwd(lambda: authors_seg_loss(authors_dice, logit_leaf, y), [logit_leaf])
    for _ in range(max(2, args.warmup)):
        for fn in fns.values():
            fn()
    sync(device)
    kernels = {name: count_cuda_kernels(fn) for name, fn in fns.items()} if device.type == "cuda" else {}
    samples, _ = time_interleaved(fns, args.rounds, args.loss_reps, device)
    out = {name: summarise(s) | {"samples_ms": s, "cuda_kernels": kernels.get(name)} for name, s in samples.items()}
    # paired per-round ratios of our implementations against the authors' loss and the reference
    for arm in loss_arms(args):
        for ref in ("ours-eager", "authors"):
            if arm != ref and ref in loss_arms(args):
                paired = [a / b for a, b in zip(samples[f"{arm} SelfReg fwd+bwd"], samples[f"{ref} SelfReg fwd+bwd"],
                                                strict=True)]
                out[f"{arm} SelfReg fwd+bwd"][f"paired_vs_{ref}"] = statistics.median(paired)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Memory traffic of the losses (--traffic): bytes read + written per aten op, a proxy for GPU time when no GPU is
# at hand (the tapped maps are far larger than any cache at the paper's size).
# ---------------------------------------------------------------------------------------------------------------
_NO_TRAFFIC = {
    "view", "_unsafe_view", "as_strided", "slice", "select", "detach", "expand", "t", "permute", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "chunk", "alias", "unflatten", "flatten", "transpose", "_reshape_alias", "reshape",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unbind",
}


class _TrafficCounter(TorchDispatchMode):
    """Count aten ops (~ kernel launches) and bytes they read + write (views and allocations are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.per_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        base = name.rstrip("_")
        if base in _NO_TRAFFIC:
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        outs = [a for a in tree_flatten(out)[0] if isinstance(a, Tensor)]

        def nb(t: Tensor) -> int:
            return t.numel() * t.element_size()

        if base in ("index_select", "gather"):  # reads only the selected channels (and a small index)
            moved = 2 * sum(nb(o) for o in outs)
        elif base == "index_add":  # read source, read + write the destination rows
            moved = 3 * nb(ins[-1])
        elif base == "index_copy":
            moved = 2 * nb(ins[-1])
        elif base in ("fill", "zero", "zeros", "zeros_like", "new_zeros"):
            moved = sum(nb(o) for o in outs)
        elif name.endswith("_") and outs:  # in-place: inputs read, self written
            moved = sum(nb(i) for i in ins) + nb(outs[0])
        else:
            moved = sum(nb(i) for i in ins) + sum(nb(o) for o in outs)
        self.bytes += moved
        self.ops += 1
        self.per_op[base] = self.per_op.get(base, 0) + moved
        return out


def count_traffic(args, mode: str, device: torch.device) -> dict:
    """Bytes moved and aten ops of each SelfReg loss (ours and the authors'), forward + backward into the taps."""
    net = UNet(1, args.classes, base_channels=args.width).to("meta")
    _, enc, dec, final = forward_with_features(net, torch.empty(1, 1, args.size, args.size, device="meta"))
    spec = net.tap_spec
    names = [f"down{i}" for i in range(1, len(enc) + 1)] + [f"up{j}" for j in range(1, len(dec) + 1)]
    bf16 = mode == "bf16-cl"
    dtype = torch.bfloat16 if bf16 else torch.float32
    fmt = torch.channels_last if channels_last(mode) else torch.contiguous_format
    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def make(t: Tensor) -> Tensor:
        x = torch.randn(args.batch_size, *t.shape[1:], device=device, generator=gen).to(dtype)
        return x.contiguous(memory_format=fmt).requires_grad_()

    feats = {n: make(t) for n, t in zip(names, [*enc, *dec], strict=True)} | {spec.final: make(final)}
    n_enc = len(enc)
    def ours(impl: str) -> Callable[[], Tensor]:
        loss = SelfRegLoss(spec.ifd_groups, spec.scr_groups, implementation=impl)
        return lambda: loss(feats, feats[spec.final], gen)[0]

    # fused-compile: the dispatch mode would see the compiled graph's ops, not its fused kernels; not counted.
    # The CPU kernels are invisible to the dispatch mode too: the fused loss is counted as its torch ops (what CUDA
    # runs), so fused-torch would repeat it.
    losses = {arm: ours(impl) for arm, impl in SELFREG_ARMS.items()
              if arm in args.arms and arm not in ("fused-compile", "fused-torch")}
    losses["authors"] = lambda: authors_kd_loss(
        [feats[n] for n in names[:n_enc]], [feats[n] for n in names[n_enc:]], feats[spec.final]
    )
    result = {"tap_mb": sum(v.numel() * v.element_size() for k, v in feats.items() if k != spec.final) / 1e6,
              "final_mb": feats[spec.final].numel() * feats[spec.final].element_size() / 1e6, "losses": {}}
    for name, fn in losses.items():
        for v in feats.values():
            v.grad = None
        with _TrafficCounter() as counter, cpu_kernels_for("fused-torch"):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                total = fn()
            total.backward()
        top = sorted(counter.per_op.items(), key=lambda kv: -kv[1])[:6]
        result["losses"][name] = {"gb": counter.bytes / 1e9, "ops": counter.ops,
                                  "top_gb": {k: v / 1e9 for k, v in top}}
    return result


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict, args, device_name: str) -> str:
    lines = [
        f"device: {device_name}; torch {torch.__version__}; batch {args.batch_size}, {args.size}x{args.size}, "
        f"{args.classes} classes, width {args.width}; {args.rounds} rounds x {max(1, args.steps // args.rounds)} "
        f"steps per arm after {args.warmup} warm-up steps",
        "",
        "| mode | arm | step ms (median) | IQR ms | images/s | vs `none` | SelfReg overhead: medians / paired "
        "| peak GiB | host syncs/step | CUDA kernels/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, res in results["steps"].items():
        for arm in args.arms:
            r = res[arm]
            over = ""
            if "selfreg_overhead" in r:
                over = " / ".join(f"{100 * r[k]:+.1f} %" for k in ("selfreg_overhead", "paired_overhead_median"))
            lines.append(
                f"| {mode} | {arm} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | "
                f"{r['images_per_s']:.1f} | {_fmt(r['vs_none'], '.3f')} | {over} | {_fmt(r['peak_gib'])} | "
                f"{_fmt(r['host_syncs_per_step'], 'd')} | {_fmt(r['cuda_kernels_per_step'], 'd')} |"
            )
    lines += ["", "Loss terms alone, on captured features (median ms; % of the `none` step; fwd+bwd: median of the "
              "per-round ratios to `ours-eager` and to the authors' loss):", "",
              "| mode | part | ms | % of `none` step | vs ours-eager | vs authors | CUDA kernels |",
              "|---|---|---|---|---|---|---|"]
    for mode, res in results["loss_only"].items():
        base = results["steps"][mode].get("none", {}).get("median_ms")
        for part, r in res.items():
            share = "-" if base is None else f"{100 * r['median_ms'] / base:.1f} %"
            lines.append(
                f"| {mode} | {part} | {r['median_ms']:.2f} | {share} | {_fmt(r.get('paired_vs_ours-eager'), '.3f')} "
                f"| {_fmt(r.get('paired_vs_authors'), '.3f')} | {_fmt(r['cuda_kernels'], 'd')} |"
            )
    return "\n".join(lines)


def markdown_traffic(traffic: dict, args) -> str:
    lines = [
        f"Memory traffic of the SelfReg loss, forward + backward into the taps (batch {args.batch_size}, "
        f"{args.size}x{args.size}, width {args.width}; bytes read + written per aten op):",
        "",
        "| mode | loss | GB moved | aten ops | largest contributors (GB) |",
        "|---|---|---|---|---|",
    ]
    for mode, res in traffic.items():
        for loss, r in res["losses"].items():
            top = ", ".join(f"{k} {v:.3f}" for k, v in r["top_gb"].items())
            lines.append(f"| {mode} | {loss} | {r['gb']:.3f} | {r['ops']} | {top} |")
        sizes = f"{res['tap_mb'] / 1e3:.3f} GB of tapped maps + {res['final_mb'] / 1e3:.3f} GB F_final"
        lines.append(f"| {mode} | (sizes: {sizes}) | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 24 on CUDA, 4 on CPU")
    parser.add_argument("--size", type=int, default=None, help="image side; default: 224 on CUDA, 96 on CPU")
    parser.add_argument("--width", type=int, default=None, help="UNet base channels; default: 64 on CUDA, 16 on CPU")
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm; default: 30 CUDA, 64 CPU")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm; default: 8 CUDA, 2 CPU")
    parser.add_argument("--rounds", type=int, default=None, help="interleaving rounds; default: 6 CUDA, 16 CPU")
    parser.add_argument("--loss-reps", type=int, default=None, help="loss-only calls per round; default 10 CUDA, 5 CPU")
    parser.add_argument("--modes", default=None,
                        help=f"comma list of {','.join(MODES)}; default: fp32,bf16-cl on CUDA, fp32,fp32-cl on CPU")
    parser.add_argument("--arms", default=None,
                        help=f"comma list of {','.join(ALL_ARMS)}; default: all but fused-torch on CUDA, all but "
                        "fused-compile on CPU")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads; default 1 on CPU (robust on a shared machine), 0 = torch's default (all cores)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--traffic", action="store_true",
        help="only count the bytes moved by ours vs the authors' loss (fwd + bwd) per aten op; no timing",
    )
    parser.add_argument("--json", default=None, help="write the results (with per-round samples) to this path")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    defaults = dict(batch_size=(24, 4), size=(224, 96), width=(64, 16), steps=(30, 64), warmup=(8, 2),
                    rounds=(6, 16), loss_reps=(10, 5), modes=("fp32,bf16-cl", "fp32,fp32-cl"),
                    arms=(",".join(a for a in ALL_ARMS if a != "fused-torch"),
                          ",".join(a for a in ALL_ARMS if a != "fused-compile")))
    for key, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_cuda if cuda else on_cpu)
    if args.threads is None and not cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; use {', '.join(MODES)}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ALL_ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; use {', '.join(ALL_ARMS)}")
    args.arms = [a for a in ALL_ARMS if a in args.arms]  # baselines first, a fixed order

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    init = UNet(1, args.classes, base_channels=args.width).state_dict()
    x = torch.randn(args.batch_size, 1, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch_size, args.size, args.size), device=device)
    if cuda:
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        device_name += f"{torch.get_num_threads()} torch threads"
    if args.traffic:
        traffic = {mode: count_traffic(args, mode, device) for mode in modes}
        print(markdown_traffic(traffic, args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"traffic": traffic, "args": vars(args), "torch": torch.__version__}, f, indent=1)
        return
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results: dict = {"steps": {}, "loss_only": {}}
    for mode in modes:
        results["steps"][mode] = bench_steps(args, mode, device, init, x, y)
        results["loss_only"][mode] = bench_loss_only(args, mode, device, init, x, y)
    elapsed = time.perf_counter() - t0
    results["meta"] = {
        "device": device_name,
        "torch": torch.__version__,
        "args": vars(args),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": elapsed,
        "params": sum(p.numel() for p in UNet(1, args.classes, base_channels=args.width).parameters()),
    }
    print(markdown(results, args, device_name))
    print(f"\nwall {elapsed:.0f} s; load average (1/5/15 min) before {load_before}, after {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
