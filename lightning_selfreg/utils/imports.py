"""Optional dependencies: import one or say in one line what needs it and how to install it."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MONAI_INSTALL_HINT", "require"]

MONAI_INSTALL_HINT = "pip install 'lightning_selfreg[monai]'  (or: pip install 'monai>=1.4' einops)"


def require(module: str, what: str, hint: str) -> Any:
    """Import ``module`` for ``what`` (a backbone or a feature), or raise an ``ImportError`` with the install hint.

    Raises:
        ImportError: ``module`` cannot be imported; the message names ``what``, the error and ``hint``.
    """
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as err:  # RuntimeError: e.g. a torchvision built for another torch
        raise ImportError(f"The {what} needs `{module}`, which cannot be imported ({err}). {hint}") from err
