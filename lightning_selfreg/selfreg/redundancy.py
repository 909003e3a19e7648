"""Channel-redundancy diagnostics: the channel-channel correlation of a block's feature map (paper Fig. 1c).

SelfReg motivates IFD by the redundancy of UNet feature maps: many channels of a block are strongly correlated
("channel corr." heat-maps of Fig. 1c). :func:`channel_correlation` computes that matrix for one map,
:func:`redundancy_score` reduces it to one number, :func:`collect_block_features` runs a network on a batch and
returns the tapped block outputs, and :func:`plot_correlation_heatmaps` draws the heat-maps. The notebook
``notebooks/redundancy.ipynb`` and the :class:`~lightning_selfreg.callbacks.RedundancyMonitor` callback use the
same functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_selfreg.selfreg.taps import FeatureTaps, TapSpec, resolve_tap_spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "block_correlations",
    "channel_correlation",
    "collect_block_features",
    "plot_correlation_heatmaps",
    "redundancy_score",
]

# A channel whose largest deviation from its mean is below this fraction of its largest magnitude is constant
# (float32 rounding of the mean leaves residues of about 1e-7 relative; real feature maps vary far more).
_CONSTANT_RTOL = 1e-5


def channel_correlation(feature: Tensor, max_channels: int | None = 64) -> Tensor:
    """Absolute Pearson correlation between the channels of a feature map, over batch and space.

    Each channel is one variable observed at the ``B * H * W`` (3D: ``B * D * H * W``) positions; the result is
    ``|corr(c_i, c_j)|`` (the "channel corr." of the paper's Fig. 1c), computed with one matrix product in
    float32. A constant channel (e.g. a dead ReLU channel) has zero variance and gets correlation 0 with every
    channel, itself included, instead of NaN; every other channel has 1 on the diagonal.

    Args:
        feature: Block output, shape ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        max_channels: Keep only the first ``max_channels`` channels (a deterministic subsample that keeps heat-maps
            of wide blocks readable and the cost at ``O(max_channels^2 * B * H * W)``); ``None`` keeps all.

    Returns:
        float32 tensor of shape ``(C', C')`` with values in ``[0, 1]``, ``C' = min(C, max_channels)``, on the
        device of ``feature``.

    Raises:
        ValueError: If ``feature`` is not 4-D or 5-D or ``max_channels`` is not None or a positive integer.

    Example:
        >>> x = torch.randn(2, 1, 8, 8)
        >>> channel_correlation(torch.cat([x, 2 * x + 1, torch.zeros_like(x)], dim=1)).round(decimals=3)
        tensor([[1., 1., 0.],
                [1., 1., 0.],
                [0., 0., 0.]])
    """
    if not isinstance(feature, Tensor) or feature.ndim not in (4, 5):
        found = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
        raise ValueError(f"`feature` must be a (B, C, H, W) or (B, C, D, H, W) feature map, found {found}.")
    if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(max_channels, int)
                                     or max_channels < 1):
        raise ValueError(f"`max_channels` must be None or a positive integer, found {max_channels!r}.")
    x = feature.detach()[:, :max_channels].float()
    x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C', N) with N = B * H * W (or B * D * H * W)
    centred = x - x.mean(dim=1, keepdim=True)
    scale = x.abs().amax(dim=1)
    constant = centred.abs().amax(dim=1) <= _CONSTANT_RTOL * scale  # also catches all-zero channels
    norm = centred.norm(dim=1)
    unit = torch.where(constant[:, None], torch.zeros_like(centred), centred / norm.clamp_min(1e-30)[:, None])
    corr = (unit @ unit.T).abs().clamp_(max=1.0)
    diagonal = (~constant).to(corr.dtype)
    return corr.fill_diagonal_(0.0) + torch.diag(diagonal)


def redundancy_score(corr: Tensor) -> float:
    """Mean absolute off-diagonal entry of a channel correlation matrix.

    0 means uncorrelated channels, 1 means every channel is a linear function of every other one. Constant
    channels count with correlation 0 (see :func:`channel_correlation`).

    Args:
        corr: Correlation matrix ``(C, C)`` with ``C >= 2``.

    Returns:
        The score as a Python float.

    Raises:
        ValueError: If ``corr`` is not a square matrix with at least 2 rows.

    Example:
        >>> redundancy_score(torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
        0.5
    """
    if not isinstance(corr, Tensor) or corr.ndim != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] < 2:
        found = tuple(corr.shape) if isinstance(corr, Tensor) else type(corr).__name__
        raise ValueError(f"`corr` must be a square (C, C) matrix with C >= 2, found {found}.")
    c = corr.shape[0]
    off_diagonal = ~torch.eye(c, dtype=torch.bool, device=corr.device)
    return float(corr.detach().abs().float()[off_diagonal].mean())


def _tap_paths(model: nn.Module, tap_spec: TapSpec | Mapping | Sequence[str] | None) -> tuple[tuple, tuple]:
    """Return ``(paths, nhwc paths)`` for a list of paths, or a spec resolved by :func:`resolve_tap_spec`."""
    if tap_spec is None or isinstance(tap_spec, (TapSpec, Mapping)):
        spec = resolve_tap_spec(model, tap_spec, owner="collect_block_features (`tap_spec` is None)")
        return spec.paths, spec.nhwc
    if isinstance(tap_spec, str) or not all(isinstance(p, str) for p in tap_spec):
        raise TypeError(f"`tap_spec` must be a TapSpec, a tap mapping or a list of module paths, found {tap_spec!r}.")
    return tuple(tap_spec), ()


@torch.no_grad()
def collect_block_features(
    model: nn.Module, tap_spec: TapSpec | Mapping | Sequence[str] | None, images: Tensor
) -> dict[str, Tensor]:
    """Run ``model`` on ``images`` in eval mode without gradients and return the outputs of the tapped blocks.

    The taps are this function's own forward hooks, removed before it returns, so hooks that other code (e.g.
    the ``SelfReg`` callback) keeps on the same modules are not disturbed. The model's train/eval mode is
    restored afterwards; in eval mode BatchNorm uses (and does not update) its running statistics.

    Args:
        model: The network whose submodules are tapped (for a ``SelfRegSegModule``, pass ``module.net``).
        tap_spec: A :class:`~lightning_selfreg.selfreg.taps.TapSpec`, its mapping form, a list of module paths, or None
            for ``model.tap_spec``.
        images: Input batch ``(B, C, H, W)`` (3D networks: ``(B, C, D, H, W)``); moved to the device of the
            model's parameters.

    Returns:
        ``{path: detached feature (B, C, *spatial)}`` in tap order (for a TapSpec: student taps, then ``final``).

    Raises:
        ValueError: If ``images`` is not 4-D or 5-D, no spec is given or found, or a path is not a submodule.

    Example:
        >>> from lightning_selfreg.models import UNet
        >>> net = UNet(1, 3, base_channels=4, depth=2)
        >>> feats = collect_block_features(net, None, torch.randn(2, 1, 16, 16))
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'down1': (2, 8, 8, 8), 'down2': (2, 8, 4, 4), 'up1': (2, 4, 8, 8), 'up2': (2, 4, 16, 16)}
    """
    if not isinstance(images, Tensor) or images.ndim not in (4, 5):
        found = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (B, C, H, W) or (B, C, D, H, W) batch, found {found}.")
    paths, nhwc = _tap_paths(model, tap_spec)
    param = next(model.parameters(), None)
    if param is not None:
        images = images.to(device=param.device, dtype=param.dtype if param.is_floating_point() else images.dtype)
    was_training = model.training
    taps = FeatureTaps(model, paths, nhwc)
    try:
        model.eval()
        with taps.capture():
            model(images)
        features = taps.pop()
    finally:
        taps.remove()
        model.train(was_training)
    missing = [p for p in paths if p not in features]
    if missing:
        raise RuntimeError(f"The forward pass did not run through the tapped module(s) {missing}.")
    return {p: features[p].detach() for p in paths}


def block_correlations(features: Mapping[str, Tensor], max_channels: int | None = 64) -> dict[str, Tensor]:
    """:func:`channel_correlation` of every feature map, moved to the CPU.

    Args:
        features: ``{block: (B, C, H, W)}``, e.g. from :func:`collect_block_features`.
        max_channels: See :func:`channel_correlation`.

    Returns:
        ``{block: (C', C') float32 CPU tensor}``.
    """
    return {name: channel_correlation(feature, max_channels).cpu() for name, feature in features.items()}


def plot_correlation_heatmaps(
    correlations: Mapping[str, Tensor] | Mapping[str, Mapping[str, Tensor]],
    cell_size: float = 2.4,
    cmap: str = "viridis",
) -> Figure:
    """Draw channel-correlation heat-maps (colour scale 0..1), each titled with its :func:`redundancy_score`.

    A flat mapping ``{block: corr}`` gives one row of heat-maps; a nested mapping ``{row label: {column label:
    corr}}`` gives a grid (e.g. rows = blocks, columns = "baseline" / "SelfReg"); a missing cell stays empty.
    The figure is a ``matplotlib.figure.Figure`` not attached to pyplot (so nothing is shown or kept open
    unless you display it; in Jupyter, ``display(fig)`` or end the cell with ``fig``).

    Args:
        correlations: Matrices ``(C, C)`` as returned by :func:`channel_correlation`.
        cell_size: Side of one heat-map in inches.
        cmap: Matplotlib colour map.

    Returns:
        The figure.

    Raises:
        ValueError: If ``correlations`` is empty.
        ImportError: If matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    if not correlations:
        raise ValueError("`correlations` is empty: pass at least one (C, C) matrix.")
    first = next(iter(correlations.values()))
    grid = {"": dict(correlations)} if isinstance(first, Tensor) else {r: dict(c) for r, c in correlations.items()}
    columns = list(dict.fromkeys(col for row in grid.values() for col in row))
    nrows, ncols = len(grid), len(columns)
    fig = Figure(figsize=(cell_size * ncols + 0.9, cell_size * nrows + 0.4 * (nrows > 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, (row_label, row) in enumerate(grid.items()):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and row_label:
                ax.set_ylabel(row_label)
            corr = row.get(column)
            if corr is None:
                ax.set_axis_off()
                continue
            corr = corr.detach().float().cpu()
            image = ax.imshow(corr.numpy(), vmin=0.0, vmax=1.0, cmap=cmap, interpolation="nearest")
            score = redundancy_score(corr) if corr.shape[0] >= 2 else math.nan
            ax.set_title(f"{column}\nC={corr.shape[0]}, r={score:.3f}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="|channel corr.|")
    return fig
