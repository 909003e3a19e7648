"""What the data pre-flight has already checked: one record per dataset, in the cache folder, never in the data.

A full read of every file is affordable once; a warm pre-flight re-checks only the files that changed. The record
keeps, per checked item (a sample, or a case with its label), the size and modification time of each of its files,
the kind of check it passed and the share of its label that is foreground (for the report of masks that look
inverted). An item whose files all still have the recorded size and modification time is not read again.

The record lives in ``<cache_dir>/preflight/<DataModule>-<hash>.json`` (:func:`default_cache_dir`:
``$XDG_CACHE_HOME/lightning_selfreg``, else ``~/.cache/lightning_selfreg``): never inside the dataset (which may be
read-only or shared) nor the package. The hash covers the resolved data folder, the DataModule class and what its
checks depend on (number of classes, the record's format version), so two datasets or two label sets never share
a record. A cache folder that cannot be written costs speed only: the pre-flight then checks everything every
time, and says so once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_selfreg.data.contract import Item

__all__ = ["RECORD_VERSION", "PreflightRecord", "default_cache_dir", "foreground_fraction"]

log = logging.getLogger(__name__)
RECORD_VERSION = 1  # bump when a check becomes stricter: every file is then checked again


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_selfreg``, or ``~/.cache/lightning_selfreg`` when ``XDG_CACHE_HOME`` is unset."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "lightning_selfreg"


def foreground_fraction(label: Any) -> float | None:
    """The share of non-zero values of a label array (None for an empty or missing one)."""
    import numpy as np

    if label is None:
        return None
    label = np.asarray(label)
    return float(np.count_nonzero(label)) / label.size if label.size else None


def _stats(paths: Iterable[Path]) -> list[list[int]]:
    out = []
    for path in paths:
        stat = path.stat()
        out.append([stat.st_size, stat.st_mtime_ns])
    return out


def _files(item: Item) -> list[Path]:
    return [p for p in (item.path, item.label_path) if p is not None]


class PreflightRecord:
    """The items of one dataset that passed the full pre-flight check, keyed by their first file.

    Args:
        cache_dir: The cache root (``SegDataModule(cache_dir=...)``).
        data_dir: The dataset folder (resolved for the key).
        owner: What the checks depend on besides the files: the DataModule class and its settings, e.g.
            ``"SynapseDataModule/9"`` (class and number of classes).
    """

    def __init__(self, cache_dir: str | os.PathLike, data_dir: str | os.PathLike, owner: str) -> None:
        key = hashlib.sha256(f"{RECORD_VERSION}|{Path(data_dir).resolve()}|{owner}".encode()).hexdigest()[:16]
        self.path = Path(cache_dir) / "preflight" / f"{owner.split('/')[0]}-{key}.json"
        self.data_dir = Path(data_dir)
        self.owner = owner
        self._lock = threading.Lock()
        self.entries: dict[str, Any] = {}
        self._changed = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == RECORD_VERSION and data.get("owner") == owner:
                self.entries = dict(data.get("items", {}))
        except (OSError, ValueError):
            pass  # no record yet, or an unreadable one: everything is checked

    def passed(self, item: Item, kind: str) -> bool:
        """Whether ``item`` passed the ``kind`` check with the files as they are now (same sizes and times)."""
        entry = self.entries.get(str(item.path))
        if entry is None or entry.get("kind") != kind:
            return False
        try:
            return entry.get("files") == _stats(_files(item))
        except OSError:
            return False

    def add(self, item: Item, kind: str, foreground: float | None) -> None:
        """Record that ``item`` passed the ``kind`` check (its files' current sizes and times)."""
        entry = {"kind": kind, "files": _stats(_files(item)), "foreground": foreground}
        with self._lock:
            self.entries[str(item.path)] = entry
            self._changed = True

    def foreground(self, item: Item) -> float | None:
        """The recorded foreground share of ``item``'s label."""
        entry = self.entries.get(str(item.path))
        return None if entry is None else entry.get("foreground")

    def save(self) -> None:
        """Write the record atomically (a cache folder that cannot be written is reported once, not an error)."""
        from lightning_selfreg.utils.files import atomic_write_text

        if not self._changed:
            return
        try:
            atomic_write_text(self.path, json.dumps({"version": RECORD_VERSION, "owner": self.owner,
                                                     "dataset": str(self.data_dir), "items": self.entries}))
            self._changed = False
        except OSError as err:
            log.warning("the pre-flight could not record what it checked (%s); the next run checks every file "
                        "again (set `cache_dir` to a writable folder)", err)
