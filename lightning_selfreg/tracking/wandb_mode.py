"""Choose the W&B mode of a run before it starts: online only with credentials and a server that answers.

Without this, a run asked to log online on a machine with no route to the W&B server (the compute nodes of many
clusters) waits about 100 s inside ``wandb.init`` and then dies with a ``CommError`` after its run folder is made,
and a run without credentials dies with a ``UsageError``. :func:`resolve_wandb_mode` decides in at most
``timeout`` seconds, before anything is written: ``"auto"`` falls back to offline with a one-line warning (and the
``wandb sync`` command that uploads the run later), an explicit ``"online"`` raises :class:`WandbUnavailable`.

The server is ``WANDB_BASE_URL`` (default ``https://api.wandb.ai``), reached through the ``https_proxy`` /
``http_proxy`` proxy when one is configured for it (the probe then connects to the proxy).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["MODES", "WandbUnavailable", "find_credentials", "forced_mode", "probe_server", "resolve_wandb_mode"]

log = logging.getLogger(__name__)
MODES = ("auto", "offline", "online", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0


class WandbUnavailable(ValueError):
    """``mode="online"`` was asked for, but there are no credentials or the server cannot be reached."""


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def _netrc_path() -> Path:
    return Path(os.environ.get("NETRC") or "~/.netrc").expanduser()


def find_credentials(base_url: str | None = None) -> str | None:
    """Where W&B would find credentials for ``base_url``: ``WANDB_API_KEY``, an identity token file, ``.netrc``.

    Returns:
        The name of the source, or ``None`` when there is none (``wandb login`` writes the ``.netrc`` entry).
    """
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(variable):
            return variable
    host = urlsplit(base_url or _base_url()).hostname or ""
    path = _netrc_path()
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError):
        return None
    return str(path) if entry and entry[2] else None


def _endpoint(base_url: str) -> tuple[str, int, str]:
    """``(host, port, description)`` to connect to for ``base_url``: the server itself or its proxy."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    port = parts.port or (80 if parts.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        proxy_host = proxy_parts.hostname or ""
        proxy_port = proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
        return proxy_host, proxy_port, f"{host}:{port} (via the proxy {proxy_host}:{proxy_port})"
    return host, port, f"{host}:{port}"


def probe_server(base_url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Try a TCP connection to the W&B server (or its proxy), name resolution included, for ``timeout`` seconds.

    Args:
        base_url: The server URL; default ``WANDB_BASE_URL`` or ``https://api.wandb.ai``.
        timeout: Seconds before the server counts as unreachable.

    Returns:
        ``None`` if it answered, else why not (one line, naming the server).
    """
    host, port, name = _endpoint(base_url or _base_url())
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    # in a thread: socket timeouts do not bound the name lookup, which can hang without a network
    worker = threading.Thread(target=connect, name="wandb-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        return f"{name} did not answer within {timeout:g} s"
    if outcome[0] is not None:
        err = outcome[0]
        return f"{name} is unreachable ({type(err).__name__}: {str(err) or 'no reason given'})"
    return None


def forced_mode() -> str | None:
    """The mode the environment forces on W&B, or None (``WANDB_MODE`` unset or ``online``).

    ``WANDB_MODE=offline`` or ``dryrun`` -> ``"offline"``, ``disabled`` -> ``"disabled"``.

    W&B reads ``WANDB_MODE`` whenever ``wandb.init`` is not given a mode, as Lightning's ``WandbLogger`` does for
    an online run.
    """
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    return {"offline": "offline", "dryrun": "offline", "disabled": "disabled"}.get(value)


def resolve_wandb_mode(mode: str, sync_hint: str = "<run folder>/wandb/offline-run-*",
                       timeout: float = PROBE_TIMEOUT_S) -> str:
    """What W&B will do in a run asked for ``mode`` here: ``"online"``, ``"offline"`` or ``"disabled"``.

    * ``"auto"``: online when credentials are found (:func:`find_credentials`) and the server answers within
      ``timeout`` seconds (:func:`probe_server`); otherwise offline. Falling back despite credentials logs one
      warning that names the reason and the ``wandb sync`` command.
    * ``"online"``: the same checks, but a failure raises :class:`WandbUnavailable`.
    * ``"offline"`` / ``"disabled"``: returned as they are.

    ``WANDB_MODE=offline`` / ``dryrun`` / ``disabled`` in the environment wins over ``"auto"`` and ``"online"``
    (:func:`forced_mode`): W&B will not connect, so nothing is probed and that mode is returned (with a warning
    when ``"online"`` was asked for); ``"disabled"`` then means no W&B run at all. Over ``"offline"``, a forced
    ``disabled`` is overridden (an offline logger sets ``WANDB_MODE`` itself).

    Args:
        mode: One of :data:`MODES`.
        sync_hint: What to pass to ``wandb sync`` to upload the offline run (shown in the warning).
        timeout: Seconds the server probe may take.

    Raises:
        ValueError: For an unknown ``mode``.
        WandbUnavailable: For ``"online"`` without credentials or without a server that answers.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, found {mode!r}.")
    if mode in ("offline", "disabled"):
        return mode
    forced = forced_mode()
    if forced is not None:
        if mode == "online":
            log.warning("W&B: mode 'online' was asked for, but WANDB_MODE=%s in the environment keeps W&B %s",
                        os.environ["WANDB_MODE"], forced)
        return forced
    credentials = find_credentials()
    if mode == "auto":
        if credentials is None:
            return "offline"
    elif credentials is None:
        raise WandbUnavailable(
            f"W&B mode 'online' needs credentials: expected WANDB_API_KEY or a `wandb login` entry for "
            f"{urlsplit(_base_url()).hostname} in {_netrc_path()}, found neither; log offline and upload later "
            "with `wandb sync`"
        )
    problem = probe_server(timeout=timeout)
    if problem is None:
        return "online"
    if mode == "online":
        raise WandbUnavailable(f"W&B mode 'online': the server {problem}; log offline and upload later with "
                               "`wandb sync`")
    log.warning("W&B: credentials found (%s) but the server %s; logging offline instead. Upload the run later "
                "with `wandb sync %s`", credentials, problem, sync_hint)
    return "offline"
