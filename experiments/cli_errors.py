"""Which setting is at fault, as data: a failed parse, a constructor's check or a Trainer named by its key.

Nothing here reads an error message. A value the parser rejects is found by parsing the command line again with one
flag (then one setting of each ``--config`` file) left out at a time (:func:`locate_parse_error`), and what was
expected comes from the owning constructor's type hints; a constructor's own check raises a
:class:`~lightning_selfreg.utils.checks.SettingError` that names its parameter, and jsonargparse's
``instantiate(..., instantiators=...)`` tells which key's class raised it (:func:`tagger`,
:func:`instantiation_error`). :func:`check_network` runs the network on shape-only tensors before any data is read.
The DataModule -> model links (:data:`LINKS`) live here, as errors in linked values are named by their data key.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import logging
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from experiments.flags import ConfigError, RunOptions, is_flag
from experiments.settings import (
    meta_forward_error,
    smallest_valid_size,
)
from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import RedundancyMonitor
from lightning_selfreg.data import SegDataModule
from lightning_selfreg.utils.checks import SettingError


def one_line(text: Any) -> str:
    """``text`` on one line: its lines stripped and joined by spaces."""
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _as_int(value: Any) -> Any:
    return value if value is None or isinstance(value, int) else int(tuple(value)[0])


# DataModule attribute -> the model / network arguments it sets, with the conversion (see _add_arguments)
LINKS: tuple[tuple[str, tuple[str, ...], Callable[[Any], Any] | None], ...] = (
    ("num_classes", ("model.num_classes", "model.net.init_args.num_classes", "model.net.init_args.out_channels",
                     "model.net.init_args.classes"), None),
    ("class_names", ("model.class_names",), list),
    ("in_channels", ("model.net.init_args.in_channels", "model.net.init_args.in_chans"), None),
    ("spatial_dims", ("model.spatial_dims", "model.net.init_args.spatial_dims"), None),
    ("input_size", ("model.input_size",), None),
    ("input_size", ("model.net.init_args.img_size",), _as_int),
    ("roi_size", ("model.roi_size",), lambda v: None if v is None else list(v)),
)


LINK_SOURCE: dict[str, str] = {target: source for source, targets, _ in LINKS for target in targets}


# a DataModule size attribute -> the DataModule arguments that set it, in order of preference
_SIZE_SETTINGS = {"input_size": ("image_size", "patch_size"), "roi_size": ("patch_size",)}


def import_class(class_path: str) -> Any:
    """The class (or function) a dotted ``class_path`` names."""
    module, _, name = str(class_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _parameters(cls: Any) -> dict[str, inspect.Parameter] | None:
    """The constructor parameters of ``cls``, following ``**kwargs`` to the base classes' ``__init__``.

    As jsonargparse does; None when that does not end in a signature without ``**kwargs``, or none is readable.
    """
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    try:
        signatures = [inspect.signature(cls).parameters]
        if inspect.isclass(cls):
            signatures += [inspect.signature(base.__init__).parameters for base in cls.__mro__[1:]
                           if base is not object and "__init__" in vars(base)]
    except (TypeError, ValueError):
        return None
    parameters: dict[str, inspect.Parameter] = {}
    for found in signatures:
        parameters.update((k, p) for k, p in found.items() if k != "self" and p.kind not in variadic
                          and k not in parameters)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in found.values()):
            return parameters
    return None


def _hints(cls: Any) -> dict[str, Any]:
    """The constructor's type hints, those of the base classes that its ``**kwargs`` reach included."""
    if inspect.isfunction(cls) or hasattr(cls, "__dataclass_fields__") or not inspect.isclass(cls):
        targets = [cls]
    else:
        targets = [base.__init__ for base in cls.__mro__ if base is not object and "__init__" in vars(base)]
    hints: dict[str, Any] = {}
    for target in targets:
        try:
            found = typing.get_type_hints(target)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no type to show, the message says so
            continue
        for name, hint in found.items():
            hints.setdefault(name, hint)
    return hints


def readable(hint: Any) -> str:
    """A type hint in words: ``"an int"``, ``"one of 'sgd', 'adam'"``, ``"a float or null"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys("null" if a is type(None) else readable(a) for a in args))
    if hint is bool:
        return "true or false"
    if origin is not None:
        inner = ", ".join(readable(a) for a in args if a is not Ellipsis)
        name = "list" if origin in (list, tuple, Sequence) or getattr(origin, "__name__", "") == "Sequence" else \
            getattr(origin, "__name__", str(origin))
        return f"a {name}" + (f" of {inner}" if inner else "")
    names = {int: "an int", float: "a float", str: "a string", Path: "a path", type(None): "null"}
    if hint in names:
        return names[hint]
    name = getattr(hint, "__name__", str(hint))
    return f"a {name} (class_path + init_args)" if inspect.isclass(hint) else f"a {name}"


def _node(config: Any, parts: Sequence[str]) -> Any:
    """The value at ``parts`` of a parsed configuration, stepping into the ``init_args`` of class_path nodes."""
    node = config
    for part in parts:
        if hasattr(node, "get") and node.get("class_path") and part != "init_args":
            node = node.get("init_args")
        node = node.get(part) if hasattr(node, "get") else None
    return node


TOP_LEVEL: dict[str, Any] = {"model": SelfRegSegModule, "trainer": pl.Trainer, "run": RunOptions,
                             "data": SegDataModule, "selfreg": SelfReg, "redundancy": RedundancyMonitor}


def _owner(key: str, config: Any) -> tuple[Any, str] | None:
    """``(class, parameter)`` of a full key: the class that takes the key's last part.

    A class_path's class is imported from ``config`` (the parse before the failing flag). None for a key outside
    every class.
    """
    parts = [p for p in key.split(".") if p != "init_args"]
    if parts == ["seed_everything"]:
        return pl.seed_everything, "seed"
    if parts[0] not in TOP_LEVEL or len(parts) < 2:
        return None
    cls: Any = TOP_LEVEL[parts[0]]
    for i in range(1, len(parts)):  # the class that owns parts[i]
        node = _node(config, parts[:i])
        if hasattr(node, "get") and node.get("class_path"):
            try:
                cls = import_class(node["class_path"])
            except (ImportError, AttributeError):
                return None
        elif i > 1:
            hint = _hints(cls).get(parts[i - 1])
            if not inspect.isclass(hint):
                return None
            cls = hint
    return cls, parts[-1]


def _value_error(key: str, value: Any, config: Any) -> ConfigError:
    """The line for a value the parser rejected at ``key``, from the owning constructor's signature."""
    if key in LINK_SOURCE:
        return ConfigError(key, f"expected no value (it is set from the DataModule's {LINK_SOURCE[key]}), "
                                f"found {value!r}")
    owner = _owner(key, config)
    if owner is None:
        return ConfigError(key, f"expected a setting listed by --help (full keys look like --model.lr), found "
                                f"the unknown key --{key}")
    cls, name = owner
    parameters = _parameters(cls)
    if parameters is not None and name not in parameters:
        close = difflib.get_close_matches(name, list(parameters), n=1)
        return ConfigError(key, f"expected a parameter of {getattr(cls, '__name__', cls)}"
                                f"{f' such as {close[0]!r}' if close else ''}, found {name!r}")
    hint = _hints(cls).get(name)
    expected = readable(hint) if hint is not None else f"a value {getattr(cls, '__name__', cls)} takes"
    return ConfigError(key, f"expected {expected}, found {value!r}")


def _flags(args: Sequence[str]) -> list[list[str]]:
    """``args`` cut into flags with their values."""
    chunks: list[list[str]] = []
    for arg in args:
        if is_flag(arg) or not chunks:
            chunks.append([arg])
        else:
            chunks[-1].append(arg)
    return chunks


def _config_leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _config_leaves(value, (*path, str(key)))
    elif path:
        yield path


def _parses(parser: LightningArgumentParser, args: list[str]) -> Any:
    """The configuration of ``args``, or None when the parser rejects them."""
    try:
        return parser.parse_args(args)
    except ArgumentError:
        return None


def _config_file_error(parser: LightningArgumentParser, before: list[str], path: str, after: list[str]
                       ) -> ConfigError | None:
    """The setting of a ``--config`` file the parser rejects: the one leaf whose removal lets the line parse."""
    file = Path(path)
    if not file.is_file():
        return ConfigError("config", f"expected a YAML file, found {path!r} (no such file)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        return ConfigError("config", f"expected a YAML file, found {path!r}, which is not YAML ({one_line(err)})")
    for leaf in _config_leaves(data):
        trimmed = copy.deepcopy(data)
        node = trimmed
        for part in leaf[:-1]:
            node = node[part]
        value = node.pop(leaf[-1])
        config = _parses(parser, [*before, "--config", yaml.safe_dump(trimmed), *after])  # the YAML text itself
        if config is not None:
            error = _value_error(".".join(leaf), value, config)
            return ConfigError(error.key, f"{error.detail} (in {path})")
    return None


def locate_parse_error(parser: LightningArgumentParser, args: Sequence[str], err: ArgumentError) -> ConfigError:
    """The setting at fault when ``parser`` rejects ``args``, found without reading the parser's message.

    The line is parsed again (with the public ``parser.parse_args``) without one flag at a time, then without one
    setting of each ``--config`` file at a time: the one whose removal lets the line parse is at fault. Its value
    is what was found; what was expected is the type hint of the parameter in the constructor that owns the key
    (the class of a ``class_path`` taken from the line that parsed). jsonargparse's own words are only the last
    resort, when no single setting is at fault.
    """
    chunks = [c for c in _flags(args) if c[0].split("=", 1)[0] not in ("--print_config", "--help", "-h")]
    is_config = [c[0].split("=", 1)[0] == "--config" for c in chunks]
    for i, chunk in enumerate(chunks):  # the flags first, then the files (the presets last: ours)
        if is_config[i]:
            continue
        config = _parses(parser, [t for c in chunks[:i] + chunks[i + 1:] for t in c])
        if config is not None:
            flag, _, inline = chunk[0].partition("=")
            return _value_error(flag[2:], inline or " ".join(chunk[1:]), config)
    for i in reversed([i for i, c in enumerate(is_config) if c]):
        flag, _, inline = chunks[i][0].partition("=")
        path = inline or (chunks[i][1] if len(chunks[i]) > 1 else "")
        found = _config_file_error(parser, [t for c in chunks[:i] for t in c], path,
                                   [t for c in chunks[i + 1:] for t in c])
        if found is not None:
            return found
    return ConfigError("config", one_line(err))


class InstantiationError(Exception):
    """The constructor of the class under :attr:`key` raised :attr:`error` (raised by :func:`tagger`).

    Args:
        key: The configuration key whose class was being built (``"data"``, ``"model.net"``, ...).
        cls: That class.
        error: What its constructor raised.
        links: The link targets applied to it (jsonargparse's ``applied_instantiation_links``).
    """

    def __init__(self, key: str, cls: type, error: BaseException, links: dict[str, Any]) -> None:
        super().__init__(f"{key}: {error}")
        self.key, self.cls, self.error, self.links = key, cls, error, links


def tagger(key: str) -> Callable[..., Any]:
    """A jsonargparse instantiator that builds a class and tags a constructor error with ``key``."""

    def instantiate(cls: type, *args: Any, applied_instantiation_links: dict | None = None, **kwargs: Any) -> Any:
        try:
            return cls(*args, **kwargs)
        except (ValueError, TypeError) as err:
            raise InstantiationError(key, cls, err, applied_instantiation_links or {}) from err

    return instantiate


def class_nodes(node: Any, key: str = "") -> Iterator[tuple[str, type]]:
    """``(key, class)`` of every ``class_path`` in a parsed configuration, outermost first."""
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from class_nodes(item, f"{key}.{i}")
        return
    fields = node if isinstance(node, dict) else vars(node) if isinstance(node, Namespace) else None
    if not fields:
        return
    if fields.get("class_path"):
        try:
            yield key, import_class(fields["class_path"])
        except (ImportError, AttributeError):
            pass
        yield from class_nodes(fields.get("init_args"), key)
        return
    for name, value in fields.items():
        yield from class_nodes(value, f"{key}.{name}" if key else name)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes (Python's ``__cause__`` / ``__context__`` links), outermost first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def data_setting(config: Any, attribute: str) -> str | None:
    """The DataModule argument behind a linked attribute (``data.image_size`` for ``input_size``), if it has one."""
    try:
        parameters = _parameters(import_class(config["data"]["class_path"])) or {}
    except (ImportError, AttributeError, KeyError, TypeError):
        parameters = {}
    for name in (attribute, *_SIZE_SETTINGS.get(attribute, ())):
        if name in parameters:
            return f"data.{name}"
    return None


def _linked_error(config: Any, target: str, owner: str, message: str) -> ConfigError:
    """A bad value that came from the DataModule through the link to ``target``: named by its data key."""
    attribute = LINK_SOURCE[target]
    setting = data_setting(config, attribute)
    passed = target.rsplit(".", 1)[-1]
    if setting is not None:
        return ConfigError(setting, f"{owner}: {message} (passed on as its `{passed}`)")
    return ConfigError("data", f"{owner}: {message} (`{passed}` is the DataModule's {attribute})")


def instantiation_error(err: BaseException, config: Any) -> ConfigError:
    """The setting at fault when building the classes of ``config`` failed with ``err``.

    The class is the one whose instantiator tagged the error (:class:`InstantiationError`), or the model (the one
    class LightningCLI builds itself); the parameter is the :class:`SettingError`'s. A linked value is named by
    the DataModule key it comes from.
    """
    tag = next((e for e in reversed(list(_chain(err))) if isinstance(e, InstantiationError)), None)
    if tag is not None:
        key, cls, cause, links = tag.key, tag.cls, tag.error, tag.links
    else:
        key, cls, links = "model", SelfRegSegModule, {}
        cause = next((e for e in _chain(err) if isinstance(e, SettingError)), err)
    parameter = getattr(cause, "parameter", None)
    message = one_line(cause) or type(cause).__name__
    parameters = _parameters(cls)
    if parameter is None or (parameters is not None and parameter not in parameters):
        return ConfigError(key, f"{cls.__name__}: {message}")
    target = f"{key}.init_args.{parameter}" if key == "model.net" else f"{key}.{parameter}"
    if target in LINK_SOURCE and (key == "model" or target in links):
        return _linked_error(config, target, cls.__name__, message)
    return ConfigError(target, message)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (``GPU available: ...``) off, e.g. for a Trainer built only to test settings."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


TRAINER_HARDWARE = ("accelerator", "devices", "strategy", "num_nodes", "precision", "sync_batchnorm")


def trainer_error(err: BaseException, trainer_config: dict[str, Any]) -> ConfigError:
    """The ``trainer.*`` setting at fault when the Trainer cannot be built (devices, precision, strategy).

    Each hardware setting that differs from the Trainer's default is put back to its default in turn; the first
    one that lets a bare Trainer build is named.
    """
    defaults = {k: p.default for k, p in inspect.signature(pl.Trainer).parameters.items()}
    given = {k: trainer_config[k] for k in TRAINER_HARDWARE if k in trainer_config}
    for key, value in given.items():
        if value == defaults[key]:
            continue
        try:
            with _quiet_lightning(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pl.Trainer(**{**given, key: defaults[key]}, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
        except (MisconfigurationException, ValueError, RuntimeError, TypeError):
            continue
        return ConfigError(f"trainer.{key}", f"{one_line(err)} (found {value!r})")
    return ConfigError("trainer", one_line(err))


def check_network(datamodule: SegDataModule, module: SelfRegSegModule, config: Any = None) -> None:
    """Run the network on a shape-only (meta) copy at the DataModule's input size, before any data is read.

    Catches a size the backbone cannot take (too small for its depth, not a multiple of its patch or window), in
    evaluation (one sample) and in training (a batch of ``datamodule.batch_size``: BatchNorm on a 1 x 1 x 1
    bottleneck of one sample, InstanceNorm on a single voxel), naming the smallest size the network takes
    (:func:`~experiments.settings.smallest_valid_size`), and an output that is not ``num_classes`` channels, at
    no cost (no memory, no arithmetic).

    Raises:
        ConfigError: Naming the DataModule's size setting, or ``model.net``.
    """
    attribute = "roi_size" if datamodule.roi_size else "input_size" if datamodule.input_size else None
    size = getattr(datamodule, attribute) if attribute else getattr(datamodule, "patch_size", None)
    if size is None:
        return
    dims = datamodule.spatial_dims
    size = (size,) * dims if isinstance(size, int) else tuple(int(v) for v in size)
    channels = datamodule.in_channels
    shape = (1, channels, *size)
    try:
        net = copy.deepcopy(module.net).to("meta").eval()  # eval: BatchNorm takes a 1 x 1 map of one sample
    except (NotImplementedError, RuntimeError):
        return
    key = (data_setting(config, attribute or "roi_size") if config is not None else None) or "data"
    batch = int(getattr(datamodule, "batch_size", 1) or 1)
    for train, batch_size in ((False, 1), (True, batch)):
        err = meta_forward_error(net, (batch_size, channels, *size), train)
        if err is None:
            continue
        message = one_line(err) or type(err).__name__
        smallest = smallest_valid_size(net, channels, size, batch_size, train)
        hint = f"; the smallest size from {list(size)} it takes is {list(smallest)}" if smallest else ""
        what = f"train on a batch of {batch_size} of shape" if train else "take inputs of shape"
        raise ConfigError(key, f"the network {type(module.net).__name__} cannot {what} {(batch_size, *shape[1:])} "
                               f"(the DataModule's size){hint}: {message[:300]}") from err
    net.eval()
    try:
        with torch.no_grad():
            logits = net(torch.empty(shape, device="meta"))
    except NotImplementedError:  # an operation without a meta kernel: the first batch will tell
        return
    expected = (1, datamodule.num_classes, *size)
    if tuple(logits.shape) != expected:
        raise ConfigError("model.net", f"{type(module.net).__name__} maps inputs {shape} to {tuple(logits.shape)}; "
                                       f"expected logits {expected} ({datamodule.num_classes} classes of "
                                       f"{type(datamodule).__name__} at the input size)")
