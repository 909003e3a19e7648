"""The datasets a :class:`~lightning_selfreg.data.datamodule.SegDataModule` serves: 2D samples and evaluation cases.

* :class:`SampleDataset`: training / validation samples, read by the DataModule's reader, optionally cached,
  augmented per sample (seeded from the sample's :class:`~lightning_selfreg.data.sampling.SampleKey`) or
  resized to ``image_size``;
* :class:`CaseDataset`: whole evaluation cases, ``(D, C, H, W)`` volumes or 2D images as ``D = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_selfreg.data.augmentation import PairTransform, accepts_seed, call_with_global_rngs_seeded
from lightning_selfreg.data.contract import Item
from lightning_selfreg.data.sampling import PADDING, PaddingKey
from lightning_selfreg.data.transforms import default_seed, derive_seed, resize_image, resize_label

__all__ = ["CaseDataset", "SampleDataset"]


def _to_chw(image: np.ndarray) -> Tensor:
    """``(H, W)`` or ``(H, W, C)`` array -> ``(C, H, W)`` float32 tensor."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


class SampleDataset(Dataset):
    """2D samples: read -> (optional cache) -> per-sample transform or plain resize -> tensors.

    Item ``i`` is ``{"image": (C, H, W) float32, "label": (H, W) uint8, "seed": () int64}``. ``seed`` is the
    sample's seed: the one its :class:`SampleKey` carries (``derive_seed(seed, epoch, index)``, from
    :class:`ResumableSampler`), else ``derive_seed(seed, 0, i)`` for a plain index. The transform draws from it
    (passed as ``seed=`` when the transform takes one, else through the Python / NumPy / torch CPU RNGs, seeded
    for that call and restored after), so an item is a pure function of (seed, epoch, index) in any process.
    """

    def __init__(self, items: Sequence[Item], read: Callable[[Item], tuple[np.ndarray, np.ndarray]],
                 image_size: int | Sequence[int], transform: PairTransform | None, cache: bool,
                 seed: int | None = None) -> None:
        self.items, self.read, self.image_size, self.transform = list(items), read, image_size, transform
        self.seed = default_seed() if seed is None else seed
        self._transform_takes_seed = transform is not None and accepts_seed(transform)
        self._cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _resized(self, image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
        x = resize_image(_to_chw(image)[None], self.image_size)[0]
        y = resize_label(torch.from_numpy(label.astype(np.int64))[None], self.image_size)[0]
        return x, y

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        i = int(key)
        seed = getattr(key, "seed", None)
        if seed is None:
            seed = derive_seed(self.seed, 0, i)
        if self._cache is not None and i in self._cache:
            cached = self._cache[i]
        else:
            image, label = self.read(self.items[i])
            # without a per-sample transform the resized tensors are deterministic: cache those
            cached = (image, label) if self.transform is not None else self._resized(image, label)
            if self._cache is not None:
                self._cache[i] = cached
        if self.transform is None:
            x, y = cached
        else:
            if self._transform_takes_seed:
                image, label = self.transform(*cached, seed=seed)
            else:
                image, label = call_with_global_rngs_seeded(self.transform, seed, *cached)
            x, y = _to_chw(image), torch.from_numpy(np.asarray(label, dtype=np.int64))
        return {"image": x, "label": y.to(torch.uint8), "seed": torch.tensor(seed, dtype=torch.int64)}


class CaseDataset(Dataset):
    """Evaluation cases read on access: ``image`` (D, C, H, W), ``label`` (D, H, W), ``case``, ``spacing``.

    A :class:`~lightning_selfreg.data.sampling.PaddingKey` index (a rank without cases of its own under DDP) gives
    that case marked ``"padding": True``, which the evaluation steps skip.
    """

    def __init__(self, items: Sequence[Item], read: Callable[[Item], dict[str, Any]]) -> None:
        self.items, self.read = list(items), read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int) -> dict[str, Any]:
        i = int(key)
        case = self.read(self.items[i])
        image = np.asarray(case["image"], dtype=np.float32)
        if case.get("is_2d"):
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)[None]  # (1, C, H, W)
            label = np.asarray(case["label"])[None]
        else:
            image, label = image[:, None], np.asarray(case["label"])  # (D, 1, H, W)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case": self.items[i].display,
        }
        if case.get("spacing") is not None:
            item["spacing"] = torch.as_tensor(np.asarray(case["spacing"], dtype=np.float64))
        if isinstance(key, PaddingKey):
            item[PADDING] = True
        return item
