"""Plan an nnU-Net configuration for a dataset and a device, as nnU-Net's ``ExperimentPlanner`` does.

nnU-Net v2 chooses the patch size, the batch size and the network's depth from the dataset fingerprint (the
median shape of the training cases at the target spacing) and a memory budget (its reference: 8 GB of GPU
memory): it starts from a patch shaped like the inverse spacing (256^3 voxels in 3D, 2048^2 in 2D) clipped to
the median shape, pools each axis while its feature map stays >= 4 voxels, shrinks the axis that most exceeds
the median shape until the estimated memory of a reference batch (2 in 3D, 12 in 2D) fits (here sparing the
smallest axis while another can shrink: with isotropic pooling it decides the depth), then fills the
budget with the batch size, capped so that one batch covers at most 5 % of the dataset's voxels (and at least
2). :func:`plan_configuration` does the same for this package's :class:`~lightning_selfreg.models.UNet`
(isotropic 2x pooling: the depth is limited by the smallest patch axis), with the memory estimated by
:func:`unet_cost` (the activations autograd saves for the backward pass), and the device's budget
(:func:`device_budget`):

* a GPU: half its memory, at most nnU-Net's 8 GiB reference (so a large GPU trains nnU-Net's recipe rather than
  larger batches), nnU-Net's schedule (250 iterations per epoch; the epochs stay the preset's);
* a CPU: :data:`CPU_MEMORY_BUDGET` of activations, width 16 (the bundled sample's measured CPU recipe) and a
  training length fitted to :data:`CPU_TRAIN_SECONDS` of one core at :data:`CPU_FLOPS_PER_S` (the rates whole
  runs trained at per CPU-second on the 2-core machine the figures in ``benchmarks/`` come from: a 3D UNet's
  large convolutions run several times faster per operation than a 2D UNet's small ones), so a run on any
  nnU-Net dataset ends in minutes: a smoke test of the whole pipeline, not a trained model.

The plan is a pure function of the fingerprint and the device's description (never of a timing), so every rank,
every arm of a comparison and every rerun on the same kind of device gets the same plan. It also decides the
validation fold: nnU-Net's 5-fold split needs 5 training cases; with fewer (and no ``splits_final.json``) it
trains on all cases without validation.

Example:
    >>> fp = DatasetShape(median_shape=(51, 101, 122), spacing=(3.0, 3.0, 3.0), num_training_cases=1)
    >>> plan = plan_configuration(fp, "2d", device_budget("cpu"), in_channels=1, num_classes=9)
    >>> plan.patch_size, plan.batch_size, plan.depth, plan.fold
    ((112, 128), 2, 4, None)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "CPU_FLOPS_PER_S",
    "CPU_MEMORY_BUDGET",
    "CPU_TRAIN_SECONDS",
    "DatasetShape",
    "DeviceBudget",
    "Plan",
    "device_budget",
    "plan_configuration",
    "unet_cost",
]

GIB = 1024**3
CPU_MEMORY_BUDGET = GIB // 2  # activations of one training batch on a CPU
# training rate per CPU-second of whole nnU-Net runs on the bundled sample (2-core machine, torch 2.13 CPU, batch 2,
# UNet width 16; everything in the step counted: SelfReg, optimizer, data): 2D 112x128 ~3.9 GFLOP/s (0.84 CPU-s
# per 3.3-GFLOP sample), 3D 48x56x56 >= 25 GFLOP/s; rounded down
CPU_FLOPS_PER_S = {"2d": 4e9, "3d": 20e9}
CPU_TRAIN_SECONDS = 150.0  # of one core: a shared 2-core machine still ends a run on the sample in minutes
CPU_WIDTH = 16  # base channels on a CPU (the bundled sample's CPU preset)
GPU_REFERENCE = 8 * GIB  # nnU-Net's reference memory
REFERENCE_BATCH = {3: 2, 2: 12}  # nnU-Net's reference batch sizes
INITIAL_VOXELS = {3: 256**3, 2: 2048**2}  # nnU-Net's initial patch volume
MIN_FEATURE_MAP = 4  # nnU-Net: pool an axis while its feature map stays at least this large
MAX_DEPTH = 5
MAX_BATCH_SHARE = 0.05  # nnU-Net: a batch covers at most 5 % of the dataset's voxels
ITERATIONS_PER_EPOCH = 250  # nnU-Net's
SAFETY = 1.5  # estimated activations x this: gradients in flight, SelfReg's feature statistics, allocator slack
PARAMETER_COPIES = 4  # float32 weights, gradients, SGD momentum and one spare, kept beside the activations


@dataclass(frozen=True)
class DatasetShape:
    """What the planner needs of a dataset: its median shape at the target spacing and how many cases it has.

    Attributes:
        median_shape: Median ``(D, H, W)`` of the training cases at the target spacing (in 2D the in-plane
            resampled shape: ``D`` is the median number of slices).
        spacing: The target spacing ``(z, y, x)`` mm.
        num_training_cases: Training cases.
        total_voxels: Voxels of all training cases at the target spacing (default: ``N * prod(median_shape)``).
        has_splits_file: Whether the dataset has a ``splits_final.json`` (then fold 0 is nnU-Net's).
    """

    median_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_training_cases: int
    total_voxels: int | None = None
    has_splits_file: bool = False


@dataclass(frozen=True)
class DeviceBudget:
    """The device a plan is made for.

    Attributes:
        kind: ``"cpu"`` or ``"gpu"``.
        name: For the plan's line (e.g. ``"NVIDIA H100 80GB HBM3 (79 GiB)"``).
        memory_bytes: Activation memory one training batch may use.
        train_seconds: CPU: the training time (of one core) the plan fits its length to; None on a GPU
            (nnU-Net's schedule).
        num_cpus: CPU cores (for the DataLoader workers).
    """

    kind: Literal["cpu", "gpu"]
    name: str
    memory_bytes: int
    train_seconds: float | None
    num_cpus: int = 1


def device_budget(kind: Literal["cpu", "gpu"], gpu_memory_bytes: int | None = None, name: str = "",
                  num_cpus: int = 2) -> DeviceBudget:
    """The budget of a CPU, or of a GPU with ``gpu_memory_bytes`` of memory (see the module docstring)."""
    if kind == "cpu":
        return DeviceBudget("cpu", name or f"CPU ({num_cpus} cores)", CPU_MEMORY_BUDGET, CPU_TRAIN_SECONDS, num_cpus)
    if not gpu_memory_bytes:
        raise ValueError("`gpu_memory_bytes` is needed for a GPU budget.")
    budget = min(gpu_memory_bytes // 2, GPU_REFERENCE)
    return DeviceBudget("gpu", name or f"GPU ({gpu_memory_bytes / GIB:.0f} GiB)", int(budget), None, num_cpus)


def _widths(base_channels: int, depth: int) -> list[int]:
    return [base_channels * 2**i for i in range(depth)]


def unet_cost(patch: Sequence[int], base_channels: int, depth: int, in_channels: int = 1,
              num_classes: int = 2) -> tuple[float, float, int]:
    """``(bytes, flops, parameters)`` of one training sample of :class:`~lightning_selfreg.models.UNet` at ``patch``.

    ``bytes``: the float32 activations autograd keeps for the backward pass (each convolution's output, each
    BatchNorm's output, pooled and up-sampled maps, the concatenated skips, the logits and the softmax of the
    loss; within 11 % of what autograd saves, see the tests); ``flops``: the forward convolutions' multiply-adds
    x 2 x 3 (forward + backward); ``parameters``: the convolution weights. Feature maps shrink by 2 per level on
    every axis.
    """
    dims = len(patch)
    kernel = 3**dims
    voxels = [float(np.prod(patch)) / (2**dims) ** level for level in range(depth + 1)]
    widths = _widths(base_channels, depth)
    saved = 0.0
    flops = 0.0
    params = 0

    def double_conv(cin: int, mid: int, cout: int, v: float) -> None:
        nonlocal saved, flops, params
        saved += 2 * (mid + cout) * v  # conv outputs and BatchNorm(+ReLU in place) outputs
        flops += 2 * kernel * (cin * mid + mid * cout) * v
        params += kernel * (cin * mid + mid * cout) + 2 * (mid + cout)

    double_conv(in_channels, widths[0], widths[0], voxels[0])
    for i in range(1, depth + 1):
        cin, cout = widths[i - 1], widths[min(i, depth - 1)]
        saved += cin * voxels[i]  # pooled map
        double_conv(cin, cout, cout, voxels[i])
    for j in range(1, depth + 1):
        level = depth - j
        skip = widths[level]
        out = base_channels if j == depth else skip // 2
        saved += 3 * skip * voxels[level]  # up-sampled map and the concatenation [skip, up]
        double_conv(2 * skip, skip, out, voxels[level])
    saved += 3 * num_classes * voxels[0]  # logits, softmax and the loss's terms
    flops += 2 * base_channels * num_classes * voxels[0]
    params += (base_channels + 1) * num_classes
    return 4.0 * saved, 3.0 * flops, params


def _depth(patch: Sequence[int]) -> int:
    """Pooling levels: while the smallest axis stays >= MIN_FEATURE_MAP (1 .. MAX_DEPTH)."""
    smallest = min(patch)
    return int(max(1, min(MAX_DEPTH, math.floor(math.log2(max(smallest / MIN_FEATURE_MAP, 1.0))))))


def _divisible(patch: Sequence[float], depth: int) -> tuple[int, ...]:
    step = 2**depth
    return tuple(int(step * max(1, math.ceil(p / step))) for p in patch)


@dataclass
class Plan:
    """A planned configuration; :meth:`flags` gives its command-line settings, :meth:`line` its one-line summary.

    Attributes:
        configuration: ``"2d"`` or ``"3d"``.
        patch_size: Training patch ``(D, H, W)`` or ``(H, W)``.
        batch_size: Patches per batch.
        depth: UNet pooling levels.
        base_channels: UNet width (None: the preset's).
        samples_per_epoch: Training patches per epoch.
        max_epochs: Epochs (None: the preset's).
        log_every_n_steps: Training steps between two logged values (CPU: at most the steps of an epoch, so
            every epoch has its loss terms in ``metrics.csv``; None: the run's default).
        num_workers: DataLoader workers.
        fold: Validation fold, None for none.
        device: The budget's device name.
        memory_budget_bytes: The activation budget.
        estimated_bytes: Estimated activations of one batch.
        estimated_train_s: CPU: estimated training time on one core at :data:`CPU_FLOPS_PER_S`.
        median_shape: The dataset's median shape the patch came from.
        reasons: Why each choice, in words.
        applied: The settings a command line took from the plan (:meth:`flags` of the network's parameters).
    """

    configuration: str
    patch_size: tuple[int, ...]
    batch_size: int
    depth: int
    base_channels: int | None
    samples_per_epoch: int
    max_epochs: int | None
    log_every_n_steps: int | None
    num_workers: int
    fold: int | None
    device: str
    memory_budget_bytes: int
    estimated_bytes: float
    estimated_train_s: float | None
    median_shape: tuple[int, ...]
    reasons: dict[str, str] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (``plan.json``)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def flags(self, net_has_depth: bool = True, net_has_width: bool = True) -> list[str]:
        """The plan as full-key command-line settings (``--data.patch_size [..]``, ...)."""
        out = ["--data.patch_size", f"[{', '.join(map(str, self.patch_size))}]",
               "--data.batch_size", str(self.batch_size),
               "--data.samples_per_epoch", str(self.samples_per_epoch),
               "--data.num_workers", str(self.num_workers),
               "--data.fold", "null" if self.fold is None else str(self.fold)]
        if net_has_depth:
            out += ["--model.net.init_args.depth", str(self.depth)]
        if net_has_width and self.base_channels is not None:
            out += ["--model.net.init_args.base_channels", str(self.base_channels)]
        if self.max_epochs is not None:
            out += ["--trainer.max_epochs", str(self.max_epochs)]
        if self.log_every_n_steps is not None:
            out += ["--trainer.log_every_n_steps", str(self.log_every_n_steps)]
        return out

    def line(self) -> str:
        """What was chosen and why, in one line."""
        patch = "x".join(map(str, self.patch_size))
        median = "x".join(map(str, self.median_shape))
        parts = [f"patch {patch} ({self.reasons.get('patch', f'median {median}')})",
                 f"batch {self.batch_size} ({self.reasons.get('batch', '')})",
                 f"UNet depth {self.depth}" + (f" width {self.base_channels}" if self.base_channels else ""),
                 f"{self.samples_per_epoch} patches/epoch" + (f" x {self.max_epochs} epochs" if self.max_epochs
                                                              else "")]
        if self.estimated_train_s is not None:
            parts[-1] += f" (~{self.estimated_train_s / 60:.1f} min of training on one core)"
        parts.append("fold " + (str(self.fold) if self.fold is not None else f"none ({self.reasons.get('fold')})"))
        return f"plan for nnU-Net {self.configuration} on {self.device}: " + ", ".join(parts)


def plan_configuration(dataset: DatasetShape, configuration: Literal["2d", "3d"], device: DeviceBudget,
                       in_channels: int = 1, num_classes: int = 2, base_channels: int | None = None) -> Plan:
    """Plan patch, batch, depth (and on a CPU width and training length) for ``dataset`` on ``device``.

    Args:
        dataset: The dataset's shape at the target spacing.
        configuration: ``"2d"`` (slices) or ``"3d"`` (patches).
        device: :func:`device_budget`.
        in_channels: Input channels.
        num_classes: Classes including background.
        base_channels: The network's width on a GPU (None: the preset's; a CPU plans :data:`CPU_WIDTH`).

    Returns:
        The :class:`Plan`.
    """
    if configuration not in ("2d", "3d"):
        raise ValueError(f"`configuration` must be '2d' or '3d', found {configuration!r}.")
    dims = 3 if configuration == "3d" else 2
    median = np.asarray(dataset.median_shape[-dims:], dtype=np.float64)
    spacing = np.asarray(dataset.spacing[-dims:], dtype=np.float64)
    width = CPU_WIDTH if device.kind == "cpu" else (base_channels or 32)
    reasons: dict[str, str] = {}
    # nnU-Net: a patch shaped like the inverse spacing, of INITIAL_VOXELS, clipped to the median shape
    inverse = 1.0 / spacing
    patch = inverse * (INITIAL_VOXELS[dims] / np.prod(inverse)) ** (1.0 / dims)
    patch = np.minimum(patch, median)
    reference = REFERENCE_BATCH[dims]
    shrunk, fits = False, True
    while True:
        depth = _depth(patch)
        candidate = _divisible(patch, depth)
        activations, _, params = unet_cost(candidate, width, depth, in_channels, num_classes)
        per_sample = activations * SAFETY
        available = device.memory_bytes - 4 * PARAMETER_COPIES * params
        if per_sample * reference <= available:
            break
        shrinkable = [a for a in range(dims) if candidate[a] > 2 * MIN_FEATURE_MAP]
        if not shrinkable:  # the smallest patch does not fit either: train it anyway, and say so
            fits = False
            break
        ratios = np.asarray(candidate, dtype=np.float64) / median
        # the axis most beyond the median shape, sparing the smallest axis (it sets the depth) while others can go
        keep_depth = [a for a in shrinkable if candidate[a] - 2**depth >= min(candidate)]
        axis = max(keep_depth or shrinkable, key=lambda a: (ratios[a], candidate[a]))
        patch[axis] = max(2 * MIN_FEATURE_MAP, candidate[axis] - 2**depth)
        shrunk = True
    patch_size = candidate
    median_text = "x".join(str(int(round(m))) for m in median)
    budget_text = f"{device.memory_bytes / GIB:.1f} GiB"
    if not fits:
        reasons["patch"] = f"median shape {median_text}; even the smallest patch exceeds {budget_text}"
    elif shrunk:
        reasons["patch"] = f"median shape {median_text}, cut to fit a batch of {reference} in {budget_text}"
    else:
        reasons["patch"] = f"the median shape {median_text}, in multiples of {2**depth}"
    batch = int(max(0, available) // per_sample)
    total_voxels = dataset.total_voxels or dataset.num_training_cases * float(np.prod(dataset.median_shape))
    cap = int(round(MAX_BATCH_SHARE * total_voxels / float(np.prod(patch_size))))
    if batch > cap:
        reasons["batch"] = f"at most {MAX_BATCH_SHARE:.0%} of the dataset's voxels per batch"
    else:
        reasons["batch"] = f"fills {budget_text}"
    batch = max(2, min(batch, cap))
    if batch == 2 and "at most" not in reasons["batch"]:
        reasons["batch"] = "nnU-Net's minimum"
    estimated = unet_cost(patch_size, width, depth, in_channels, num_classes)
    if dataset.num_training_cases >= 5 or dataset.has_splits_file:
        fold = 0
    else:
        fold = None
        reasons["fold"] = (f"{dataset.num_training_cases} training case(s): nnU-Net's 5-fold split needs 5; "
                           "trains on all")
    if device.kind == "cpu":
        rate = CPU_FLOPS_PER_S[configuration]
        samples = max(batch, device.train_seconds * rate / estimated[1])
        iterations = int(min(ITERATIONS_PER_EPOCH, max(1, round(samples / batch / 10))))  # about 10 epochs
        epochs = int(max(1, samples // (iterations * batch)))
        samples_per_epoch, max_epochs, log_every = iterations * batch, epochs, min(5, iterations)
        train_s = samples_per_epoch * epochs * estimated[1] / rate
        workers = 0 if device.num_cpus <= 2 else min(4, device.num_cpus // 2)
        base = width
    else:
        samples_per_epoch, max_epochs, train_s, log_every = ITERATIONS_PER_EPOCH * batch, None, None, None
        workers = min(8, max(0, device.num_cpus - 1))
        base = base_channels
    return Plan(configuration, tuple(int(p) for p in patch_size), batch, depth, base, samples_per_epoch, max_epochs,
                log_every, workers, fold, device.name, device.memory_bytes,
                per_sample * batch + 4 * PARAMETER_COPIES * params, train_s,
                tuple(int(round(m)) for m in median), reasons)
