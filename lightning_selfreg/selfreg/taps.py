"""Feature taps: read intermediate outputs of an unmodified backbone through forward hooks.

A :class:`TapSpec` is data (module paths grouped the way SelfReg aggregates them); :class:`FeatureTaps` turns it
into forward hooks that capture outputs only inside :meth:`FeatureTaps.capture`, so evaluation and inference
never hold on to activations. :func:`resolve_tap_spec` picks the spec a caller was given, the backbone's own
``tap_spec`` or the ready spec of a known third-party UNet; :func:`list_tap_candidates` lists what a model offers,
for writing a spec.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTaps", "TapSpec", "list_tap_candidates", "resolve_tap_spec"]


def _as_groups(groups: Mapping[str, Sequence[str]], name: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(groups, Mapping):
        raise TypeError(f"`{name}` must map group names to lists of module paths, found {type(groups).__name__}.")
    out = {}
    for group, paths in groups.items():
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise TypeError(f"`{name}[{group!r}]` must be a list of module paths, found {paths!r}.")
        out[str(group)] = tuple(paths)
    return out


@dataclass(frozen=True)
class TapSpec:
    """Where SelfReg reads features in a network: module paths, grouped as the losses aggregate them.

    Args:
        final: Path of the module whose output is ``F_final``, the last decoder map before the head.
        ifd_groups: Group name -> module paths; IFD is averaged within a group and summed over groups.
        scr_groups: Group name -> module paths; SCR (against ``final``) is averaged within a group and summed over
            groups.
        nhwc: Paths whose output is channels-last ``(B, H, W, C)`` or ``(B, D, H, W, C)`` (e.g. Swin blocks); they
            are permuted to ``(B, C, H, W)`` / ``(B, C, D, H, W)`` when captured.

    Example:
        >>> spec = TapSpec.unet(encoder=["down1", "down2"], decoder=["up1"], final="up2")
        >>> spec.ifd_groups
        {'encoder': ('down1', 'down2'), 'decoder': ('up1',)}
        >>> spec.scr_groups
        {'all': ('up1', 'down1', 'down2')}
    """

    final: str
    ifd_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scr_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    nhwc: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.final, str) or not self.final:
            raise TypeError(f"`final` must be a module path, found {self.final!r}.")
        object.__setattr__(self, "ifd_groups", _as_groups(self.ifd_groups, "ifd_groups"))
        object.__setattr__(self, "scr_groups", _as_groups(self.scr_groups, "scr_groups"))
        if not self.ifd_groups and not self.scr_groups:
            raise ValueError("A TapSpec needs at least one IFD or SCR group.")
        if len(self.paths) == 1:
            raise ValueError(
                f"A TapSpec needs student taps besides `final` ({self.final!r}): `ifd_groups` and `scr_groups` (or "
                f"`encoder` and `decoder`) name no module path, found ifd_groups={self.ifd_groups}, "
                f"scr_groups={self.scr_groups}."
            )
        if self.final in self.paths[:-1]:
            raise ValueError(f"`final` ({self.final!r}) must not also be a student tap.")
        if isinstance(self.nhwc, str):
            raise TypeError(f"`nhwc` must be a list of module paths, found {self.nhwc!r}.")
        object.__setattr__(self, "nhwc", tuple(self.nhwc))
        unknown = sorted(set(self.nhwc) - set(self.paths))
        if unknown:
            raise ValueError(f"`nhwc` names paths that are not taps: {unknown}.")

    @classmethod
    def unet(cls, encoder: Sequence[str], decoder: Sequence[str], final: str, nhwc: Sequence[str] = ()) -> TapSpec:
        """The authors' UNet aggregation: IFD over the encoder and the decoder group, SCR over all taps.

        Args:
            encoder: Encoder block paths (shallow to deep).
            decoder: Decoder block paths, without the last one (deep to shallow).
            final: The last decoder block.
            nhwc: Paths with channels-last outputs.
        """
        groups = {"encoder": tuple(encoder), "decoder": tuple(decoder)}
        return cls(
            final=final,
            ifd_groups={name: taps for name, taps in groups.items() if taps},
            scr_groups={"all": (*decoder, *encoder)},
            nhwc=tuple(nhwc),
        )

    @classmethod
    def from_config(cls, config: TapSpec | Mapping) -> TapSpec:
        """Build from a spec or a plain mapping (as written in YAML).

        Accepted mappings: ``{"encoder": [...], "decoder": [...], "final": str}`` (see :meth:`unet`) or
        ``{"final": str, "ifd_groups": {...}, "scr_groups": {...}}``; both may add ``"nhwc": [...]``.

        Raises:
            ValueError: If the mapping has neither form.
        """
        if isinstance(config, TapSpec):
            return config
        if not isinstance(config, Mapping) or "final" not in config:
            raise ValueError(
                "A tap spec must be a TapSpec or a mapping with `final` and either `encoder`/`decoder` lists or "
                f"`ifd_groups`/`scr_groups`; found {config!r}."
            )
        keys = set(config) - {"nhwc"}
        nhwc = config.get("nhwc", ())
        if keys <= {"final", "encoder", "decoder"}:
            return cls.unet(config.get("encoder", ()), config.get("decoder", ()), config["final"], nhwc)
        if keys <= {"final", "ifd_groups", "scr_groups"}:
            return cls(config["final"], config.get("ifd_groups", {}), config.get("scr_groups", {}), nhwc)
        known = {"final", "encoder", "decoder", "ifd_groups", "scr_groups"}
        raise ValueError(
            f"Unknown tap spec keys {sorted(keys - known)} (or `encoder`/`decoder` mixed with `ifd_groups`/"
            "`scr_groups`); use `final` with `encoder`/`decoder` or with `ifd_groups`/`scr_groups`, and `nhwc`."
        )

    @property
    def paths(self) -> tuple[str, ...]:
        """Every tapped module path, student taps first (in first-use order), then ``final``."""
        students = [p for groups in (self.ifd_groups, self.scr_groups) for ps in groups.values() for p in ps]
        return (*dict.fromkeys(students), self.final)


def resolve_tap_spec(net: nn.Module, spec: TapSpec | Mapping | None = None, owner: str = "SelfReg") -> TapSpec:
    """The tap spec to use on ``net``: ``spec`` when given, else the backbone's own, else a ready one for its class.

    The one place where "the spec, the backbone's ``tap_spec`` attribute, or the ready spec of a known third-party
    class" is decided (the ``SelfReg`` callback, the ``RedundancyMonitor`` callback and
    :func:`~lightning_selfreg.selfreg.redundancy.collect_block_features` use it). The ready specs are those of
    MONAI's ``BasicUNet``, ``DynUNet`` and ``SwinUNETR`` and of segmentation_models_pytorch's ``Unet``
    (:func:`lightning_selfreg.models.third_party.ready_tap_spec`, computed from the instance), so these networks
    need no spec even when built by their own library.

    Args:
        net: The backbone (for a ``SelfRegSegModule``, ``module.net``).
        spec: A :class:`TapSpec` or its mapping form (see :meth:`TapSpec.from_config`), or None.
        owner: Who asks, named in the error (e.g. ``"SelfReg"``).

    Returns:
        The spec (not yet checked against ``net``'s modules: :class:`FeatureTaps` does that).

    Raises:
        ValueError: If ``spec`` is None and ``net`` has neither a ``tap_spec`` nor a ready one; the message says how
            to pass one.

    Example:
        >>> from lightning_selfreg.models import UNet
        >>> resolve_tap_spec(UNet(1, 3, base_channels=4, depth=2)).final
        'up2'
        >>> resolve_tap_spec(nn.Conv2d(1, 3, 1), {"encoder": ["x"], "final": "y"}).paths
        ('x', 'y')
    """
    if spec is None:
        spec = getattr(net, "tap_spec", None)
    if spec is None:
        from lightning_selfreg.models.third_party import ready_tap_spec  # here: models imports this module

        spec = ready_tap_spec(net)
    if spec is None:
        raise ValueError(
            f"{owner} got no tap spec and the backbone {type(net).__name__} has no `tap_spec` attribute (nor a ready "
            "spec: MONAI BasicUNet / DynUNet / SwinUNETR, smp Unet). Pass one, e.g. SelfReg(taps={'encoder': [...], "
            "'decoder': [...], 'final': ...}); lightning_selfreg.list_tap_candidates(net, input_shape) lists the "
            "module paths."
        )
    return TapSpec.from_config(spec)


def _unknown_paths_error(missing: Sequence[str], available: Sequence[str]) -> ValueError:
    hints = []
    for path in missing:
        close = difflib.get_close_matches(path, available, n=3)
        hints.append(f"{path!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    return ValueError(
        f"Tap module(s) not found in the model: {'; '.join(hints)}. Available module paths: {', '.join(available)}. "
        "Hint: `lightning_selfreg.list_tap_candidates(model, input_shape)` lists them with their output shapes."
    )


class FeatureTaps:
    """Forward hooks on named submodules that capture their outputs while :meth:`capture` is active.

    The backbone is not modified. Outputs (2D ``(B, C, H, W)`` or 3D ``(B, C, D, H, W)`` maps) are stored as they
    are (not detached: the losses decide what gets gradient) and released by :meth:`pop`. Call :meth:`remove` (or
    use as a context manager) to take the hooks off.

    **torch.compile.** Hooks that exist when Dynamo compiles a forward pass are traced into the graph, so taps put
    on before the first compiled call (``SelfReg`` puts them on at setup) capture as in eager mode. Constructing
    taps also sets ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` for the whole process, and leaves it
    so: Dynamo skips guards on module hooks by default, so a graph compiled without these hooks would be reused for
    a network that has them and the hooks silently ignored. With the guards on, every graph compiled from then on
    is recompiled when hooks change. The setting is process-wide because the library does not own the compile
    call (Dynamo reads the setting when it compiles, at a compiled module's first call), and it is not restored at
    :meth:`remove`, or a graph compiled in between would skip the guards of later taps again. It cannot reach a
    graph compiled before any taps existed (a network compiled and run, then tapped): that one keeps ignoring the
    hooks until ``torch._dynamo.reset()``; ``SelfReg`` then stops with an error (it captured nothing) rather than
    training without its terms. The cost is a few more guard checks per call of every compiled module.

    Args:
        model: The network to tap.
        paths: Module paths as in ``dict(model.named_modules())``.
        nhwc: Paths whose channels-last ``(B, H, W, C)`` / ``(B, D, H, W, C)`` outputs are permuted to
            ``(B, C, H, W)`` / ``(B, C, D, H, W)``.

    Raises:
        ValueError: If a path is not a submodule of ``model``; the message lists the available paths.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> with FeatureTaps(net, ["0", "1"]) as taps:
        ...     with taps.capture() as feats:
        ...         _ = net(torch.randn(1, 1, 8, 8))
        ...     sorted(feats)
        ['0', '1']
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], nhwc: Sequence[str] = ()) -> None:
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules or p == ""]
        if missing:
            raise _unknown_paths_error(missing, [n for n in modules if n])
        self.paths = tuple(dict.fromkeys(paths))
        self.nhwc = frozenset(nhwc)
        import torch._dynamo  # guard compiled graphs on module hooks: see "torch.compile" above

        torch._dynamo.config.skip_nnmodule_hook_guards = False
        self._active = False
        self._features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            modules[p].register_forward_hook(self._make_hook(p)) for p in self.paths
        ]

    def _make_hook(self, path: str):
        def hook(module: nn.Module, args, output) -> None:
            if not self._active:
                return
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Tapped module {path!r} ({type(module).__name__}) returned {type(output).__name__}; taps need "
                    "a module whose output is one (B, C, H, W) or (B, C, D, H, W) tensor. Tap a submodule that "
                    "returns a tensor."
                )
            if path in self.nhwc:  # (B, [D,] H, W, C) -> (B, C, [D,] H, W)
                output = output.permute(0, output.ndim - 1, *range(1, output.ndim - 1))
            self._features[path] = output

        return hook

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Capture outputs of the tapped modules during the forward passes run inside this block.

        Yields:
            The dict that is filled with ``path -> output`` (it stays filled after the block until :meth:`pop`).
        """
        self._features = {}
        self._active = True
        try:
            yield self._features
        finally:
            self._active = False

    def pop(self) -> dict[str, Tensor]:
        """Return the captured features and release them from the taps."""
        features, self._features = self._features, {}
        return features

    def remove(self) -> None:
        """Remove every hook and drop captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def list_tap_candidates(
    model: nn.Module, input_shape: Sequence[int], leaf_only: bool = False
) -> list[tuple[str, str, tuple[int, ...]]]:
    """List every submodule whose output is a map of the input's rank, with its shape, from one dry-run forward pass.

    A 2D network (input ``(B, C, H, W)``) lists its 4-D outputs, a 3D network (input ``(B, C, D, H, W)``) its 5-D
    outputs; channels-last blocks (``(B, [D,] H, W, C)``) are listed as they are (name them in ``nhwc``).

    Args:
        model: The network; the dry run is in eval mode (BatchNorm statistics untouched), the mode is restored.
        input_shape: Input shape ``(B, C, H, W)`` or ``(B, C, D, H, W)`` for the dry run (zeros).
        leaf_only: Only list modules without children.

    Returns:
        ``[(path, class name, output shape), ...]`` in execution order.

    Raises:
        ValueError: If ``input_shape`` has neither 4 nor 5 entries.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2))
        >>> list_tap_candidates(net, (1, 1, 8, 8))
        [('0', 'Conv2d', (1, 4, 8, 8)), ('1', 'MaxPool2d', (1, 4, 4, 4))]
    """
    input_shape = tuple(input_shape)
    if len(input_shape) not in (4, 5):
        raise ValueError(
            f"`input_shape` must be (B, C, H, W) or (B, C, D, H, W), found {input_shape!r} "
            f"({len(input_shape)} entries)."
        )
    rank = len(input_shape)
    found: list[tuple[str, str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or (leaf_only and next(module.children(), None) is not None):
            continue

        def hook(mod, args, output, name=name):
            if isinstance(output, Tensor) and output.ndim == rank:
                found.append((name, type(mod).__name__, tuple(output.shape)))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(*input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found
