"""Cost of the SelfReg regulariser in a full training step of a 3D UNet (issue 12), beside the 2D figures.

Usage:
    python benchmarks/selfreg_overhead_3d.py                        # CPU: width 8, 32^3 patches, batch 2, ~1-2 min
    python benchmarks/selfreg_overhead_3d.py --patch 48 --json overhead_3d.json
    python benchmarks/selfreg_overhead_3d.py --device cuda --width 32 --patch 128 --batch-size 2
    python benchmarks/selfreg_overhead_3d.py --model monai-dynunet   # nnU-Net's network (MONAI), its tap spec

One process, synthetic inputs (a random ``(B, 1, P, P, P)`` patch batch, random labels), one training step =
forward, loss, backward, SGD step (momentum 0.9, weight decay 1e-4). Arms, each on its own copy of the same initial
network:

- ``none``: no SelfReg, ``DiceCELoss`` (0.4 CE + 0.6 Dice) on the 5-D logits;
- one arm per ``SelfRegLoss`` implementation asked for (``--arms``; ``fused`` is the library default): ``none`` +
  SelfReg through ``FeatureTaps`` hooks on the backbone's ``tap_spec`` (for the paper's UNet in 3D: the 4 encoder and
  3 decoder blocks, ``F_final`` = ``up4``), random pairing from a ``torch.Generator``.

After the warm-up the arms are timed interleaved: ``rounds`` rounds, each timing a block of steps of every arm (the
order rotates every round), so load drift on a shared machine hits all arms alike; reported are the median ms/step,
its inter-quartile range, and the SelfReg overhead ``arm / none - 1`` as a ratio of medians and as the median of the
per-round ratios ("paired"). Then the SelfReg loss alone (forward + backward into leaf copies of the taps) is timed
on features captured from one forward pass. On CPU the default is one torch thread (``--threads 0``: torch's
default), as ``selfreg_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from selfreg_overhead import summarise, time_interleaved  # the 2D benchmark's timing (run as a script)
from torch import Tensor

from lightning_selfreg import DiceCELoss, FeatureTaps, SelfRegLoss
from lightning_selfreg.models import create_model
from lightning_selfreg.selfreg.losses import IMPLEMENTATIONS


def build_net(args, device: torch.device, init: dict | None = None):
    kwargs = {"base_channels": args.width} if args.model == "unet" else {}
    if args.model == "monai-dynunet":
        kwargs = {"filters": [args.width * 2**i for i in range(5)]}
    net = create_model(args.model, 1, args.classes, spatial_dims=3, **kwargs)
    if init is not None:
        net.load_state_dict(init)
    return net.to(device).train()


def build_arms(args, device: torch.device, init: dict, x: Tensor, y: Tensor):
    """``{arm: step_fn}`` and the FeatureTaps to remove afterwards."""
    seg = DiceCELoss(args.classes)
    arms: dict[str, Callable[[], None]] = {}
    taps_list = []
    for arm in ["none", *args.arms]:
        net = build_net(args, device, init)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        if arm == "none":
            def step(net=net, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = seg(net(x), y)[0]
                loss.backward()
                opt.step()
        else:
            spec = net.tap_spec
            taps = FeatureTaps(net, spec.paths, spec.nhwc)
            taps_list.append(taps)
            selfreg = SelfRegLoss(spec.ifd_groups, spec.scr_groups, implementation=arm)
            gen = torch.Generator(device=device)
            gen.manual_seed(0)

            def step(net=net, opt=opt, taps=taps, selfreg=selfreg, gen=gen, final=spec.final):
                opt.zero_grad(set_to_none=True)
                with taps.capture():
                    logits = net(x)
                feats = taps.pop()
                loss = seg(logits, y)[0] + selfreg(feats, feats[final], gen)[0]
                loss.backward()
                opt.step()
        arms[arm] = step
    return arms, taps_list


def bench_steps(args, device: torch.device, init: dict, x: Tensor, y: Tensor) -> dict:
    arms, taps_list = build_arms(args, device, init, x, y)
    try:
        for _ in range(args.warmup):
            for step in arms.values():
                step()
        samples, _ = time_interleaved(arms, args.rounds, max(1, args.steps // args.rounds), device)
    finally:
        for taps in taps_list:
            taps.remove()
    result = {arm: summarise(s) | {"samples_ms": s} for arm, s in samples.items()}
    base = result["none"]["median_ms"]
    for arm in args.arms:
        result[arm]["selfreg_overhead"] = result[arm]["median_ms"] / base - 1
        paired = [a / b for a, b in zip(samples[arm], samples["none"], strict=True)]
        result[arm]["paired_overhead_median"] = statistics.median(paired) - 1
    return result


def bench_loss_only(args, device: torch.device, init: dict, x: Tensor) -> dict:
    """SelfReg loss forward + backward alone, on leaf copies of the taps of one training-mode forward pass."""
    net = build_net(args, device, init)
    spec = net.tap_spec
    with FeatureTaps(net, spec.paths, spec.nhwc) as taps, torch.no_grad():
        with taps.capture():
            net(x)
        captured = taps.pop()
    feats = {k: v.detach().clone().requires_grad_() for k, v in captured.items()}
    fns = {}
    for arm in args.arms:
        selfreg = SelfRegLoss(spec.ifd_groups, spec.scr_groups, implementation=arm)
        gen = torch.Generator(device=device)
        gen.manual_seed(0)

        def run(selfreg=selfreg, gen=gen):
            for v in feats.values():
                v.grad = None
            selfreg(feats, feats[spec.final], gen)[0].backward()

        fns[f"{arm} SelfRegLoss fwd+bwd"] = run
    for _ in range(2):
        for fn in fns.values():
            fn()
    samples, _ = time_interleaved(fns, args.rounds, args.loss_reps, device)
    shapes = {k: tuple(v.shape) for k, v in captured.items()}
    return {"parts": {name: summarise(s) for name, s in samples.items()}, "tap_shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="unet", choices=("unet", "monai-basicunet", "monai-dynunet"),
                        help="a 3D backbone of the registry (monai-* need MONAI)")
    parser.add_argument("--width", type=int, default=8, help="base width (unet: base_channels; dynunet: filters[0])")
    parser.add_argument("--patch", type=int, default=32, help="cubic patch side")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--arms", default="fused", help=f"SelfRegLoss implementations, comma-separated: "
                                                        f"{','.join(IMPLEMENTATIONS)}")
    parser.add_argument("--steps", type=int, default=48, help="timed steps per arm")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-reps", type=int, default=4, help="loss-only calls per round")
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every sample to this file")
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(args.arms) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown --arms {unknown}; choose from {IMPLEMENTATIONS}")
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    init = build_net(args, torch.device("cpu")).state_dict()
    n_params = sum(v.numel() for k, v in init.items() if not k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked")))
    shape = (args.batch_size, 1, args.patch, args.patch, args.patch)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, args.classes, (args.batch_size, args.patch, args.patch, args.patch), device=device)

    t0 = time.perf_counter()
    steps = bench_steps(args, device, init, x, y)
    loss_only = bench_loss_only(args, device, init, x)
    wall = time.perf_counter() - t0

    print(f"{args.model} 3D, width {args.width} ({n_params / 1e6:.2f} M parameters), batch {args.batch_size}, "
          f"{args.patch}^3 patches, {args.classes} classes, device {device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {max(1, args.steps // args.rounds)} steps per arm, {wall:.0f} s")
    print("| arm | step ms (median) | IQR ms | SelfReg overhead: medians / paired |")
    print("|---|---|---|---|")
    for arm, r in steps.items():
        over = "" if arm == "none" else (f"{100 * r['selfreg_overhead']:+.1f} % / "
                                         f"{100 * r['paired_overhead_median']:+.1f} %")
        print(f"| {arm} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {over} |")
    base = steps["none"]["median_ms"]
    print("| part | ms | % of the `none` step |")
    print("|---|---|---|")
    for name, r in loss_only["parts"].items():
        print(f"| {name} | {r['median_ms']:.2f} | {100 * r['median_ms'] / base:.1f} % |")
    if args.json:
        meta = {"args": vars(args), "torch": torch.__version__, "machine": platform.platform(),
                "parameters": n_params, "wall_s": wall}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "steps": steps, "loss_only": loss_only}, f, indent=1)


if __name__ == "__main__":
    main()
