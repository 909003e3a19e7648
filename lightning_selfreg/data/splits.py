"""Deterministic k-fold splitting of case names (the folds of cross-validation over a dataset's training cases)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_selfreg.data.contract import check_fold

__all__ = ["split_cases"]


def split_cases(cases: Sequence[str], fold: int, num_folds: int) -> tuple[list[str], list[str]]:
    """Deterministic k-fold split of case names: fold ``k`` validates on sorted cases ``k, k + n, k + 2n, ...``.

    Returns:
        ``(train_cases, val_cases)``.

    Raises:
        ValueError: If ``fold`` is not in ``[0, num_folds)`` or there are fewer cases than folds.
    """
    unique = sorted(set(cases))
    check_fold(fold, num_folds)
    if len(unique) < num_folds:
        raise ValueError(f"`num_folds`={num_folds} needs at least {num_folds} cases, found {len(unique)}.")
    val = unique[fold::num_folds]
    return [c for c in unique if c not in set(val)], val
