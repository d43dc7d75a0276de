"""Save the CPU strategy's measured decisions to a file and load them in another process.

The first call of each configuration measures (:mod:`sepconv.cpu_strategy`): milliseconds for small
layers, seconds for a large one's training step. A file of decisions lets a new process skip that, as
PyTorch's TunableOp does for GEMMs. It is JSON (never pickle), written atomically, and records where
the decisions were measured — the CPU model and the torch and sepconv versions; the thread count is
part of each decision's key, as is the allocator regime (glibc's default, or after :func:`sepconv.keep_freed_memory`
freed memory kept, with huge pages or not). Loading a file measured elsewhere loads nothing, with a warning, unless
``check_machine=False``: its choices would be as correct there but maybe slower. Decisions of another allocator
regime load with a warning: they apply only in theirs.

With the environment variable ``SEPCONV_CPU_STRATEGY_FILE`` set to a path, this happens by itself:
the decisions are loaded from it when sepconv is imported (if it exists) and, when new ones were
measured, merged into it at exit.

>>> import tempfile, torch, sepconv
>>> sepconv.clear_cpu_strategy_cache()
>>> layer = sepconv.SeparableConv2d(8, 16, 3, padding=1)
>>> with torch.no_grad():
...     y = layer(torch.rand(2, 8, 12, 12))  # measures this configuration once
>>> folder = tempfile.TemporaryDirectory()
>>> path = folder.name + "/cpu_strategy.json"
>>> save_cpu_strategy_decisions(path)  # the layer's plan, its pointwise conv's algorithm
2
>>> sepconv.clear_cpu_strategy_cache()
>>> load_cpu_strategy_decisions(path)  # a new process would do this: its first call measures nothing
2
>>> folder.cleanup()
"""

from __future__ import annotations

import atexit
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from sepconv import cpu_backward, cpu_strategy
from sepconv.bench import device_name
from sepconv.io import PathLike, atomic_write_text

__all__ = ["load_cpu_strategy_decisions", "save_cpu_strategy_decisions"]

FILE_ENV = "SEPCONV_CPU_STRATEGY_FILE"
_FORMAT = "sepconv-cpu-strategy"
_VERSION = 1
_LAYOUTS = (cpu_strategy.CONTIGUOUS, cpu_strategy.CHANNELS_LAST, cpu_strategy.DENSE, cpu_strategy.CHANNELS_LAST_PRODUCT)
_CHUNKED = (cpu_strategy.CHANNELS_LAST, cpu_strategy.CHANNELS_LAST_PRODUCT)  # the plans that run in batch chunks


def save_cpu_strategy_decisions(path: PathLike, *, overwrite: bool = False) -> int:
    """Write this process's decisions to ``path`` (JSON, atomically); returns how many.

    Refuses (``FileExistsError``) to replace an existing file unless ``overwrite=True``.
    """
    sections = _snapshot()
    atomic_write_text(path, _dumps(sections), overwrite=overwrite)
    return sum(map(len, sections.values()))


def load_cpu_strategy_decisions(path: PathLike, *, check_machine: bool = True) -> int:
    """Add the decisions in ``path`` to this process's (replacing any for the same configuration); returns how
    many were loaded: 0, with a warning, when the file was measured on another CPU or with other torch or
    sepconv versions, unless ``check_machine=False``. Decisions timed in another allocator regime (see
    :func:`sepconv.keep_freed_memory`) load with a warning: they apply only in that regime. Raises
    ``ValueError`` for a file that is not one."""
    sections = _load(path, check_machine=check_machine, stacklevel=3)
    if sections is None:
        return 0
    _warn_of_other_regime(path, sections)
    return sum(map(len, sections.values()))


def _load(path: PathLike, *, check_machine: bool, stacklevel: int) -> dict[str, dict] | None:
    """The decisions of ``path``, now the strategy's too; None, with a warning, for another machine's file."""
    machine, sections = _read(Path(path))
    if check_machine and machine != _machine():
        warnings.warn(
            f"{path} holds CPU strategy decisions measured on {machine}, not this {_machine()}: loading none "
            "(check_machine=False loads them anyway)",
            stacklevel=stacklevel,
        )
        return None
    with cpu_strategy._lock:
        for section, decisions in _decision_dicts().items():
            decisions.update(sections[section])
        for key in sections["layouts"]:  # measured in full before: owed no second measurement here
            cpu_strategy._rechecks.pop(key, None)
        cpu_strategy._forget_layer_memos()
    return sections


def _warn_of_other_regime(path: PathLike, sections: dict[str, dict]) -> None:
    """Warn where loaded decisions were timed in another allocator regime than this process's: they apply only in
    theirs."""
    current = cpu_strategy._regime()
    keys = [key for decisions in sections.values() for key in decisions]
    others = Counter(regime for regime in map(cpu_strategy._regime_of, keys) if regime != current)
    if others:
        theirs = "; ".join(f"{count} in {_regime_name(regime)}" for regime, count in sorted(others.items()))
        warnings.warn(
            f"{others.total()} of the {len(keys)} decisions in {path} were measured in another allocator regime than "
            f"this process's ({_regime_name(current)}): {theirs}. They apply only in processes of their regime "
            "(sepconv.keep_freed_memory() before the first tensor: freed memory kept, and huge pages where the "
            "kernel allows them; sepconv.cpu_conversions.use_compiled_conversions(): compiled conversions)",
            stacklevel=3,
        )


def _regime_name(regime: tuple[str, ...]) -> str:
    return ", ".join(regime) or "glibc's default"


def _machine() -> dict[str, str]:
    import sepconv

    return {"cpu": device_name("cpu"), "torch": torch.__version__, "sepconv": sepconv.__version__}


def _decision_dicts() -> dict[str, dict]:
    """The strategy's decision caches by the file's section names (read with ``cpu_strategy._lock`` held)."""
    return {
        "layouts": cpu_strategy._decisions,
        "depthwise_backward": cpu_strategy._backward_decisions,
        "pointwise": cpu_strategy._pointwise_decisions,
    }


def _snapshot() -> dict[str, dict]:
    with cpu_strategy._lock:
        return {section: dict(decisions) for section, decisions in _decision_dicts().items()}


def _dumps(sections: dict[str, dict]) -> str:
    document: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "machine": _machine()}
    for section, decisions in sections.items():  # a plan or choice is a tuple, a pointwise algorithm a string
        document[section] = [[_encode(key), _encode(value)] for key, value in decisions.items()]
    return json.dumps(document, indent=1) + "\n"


def _read(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(machine, decisions by section) of a decisions file; ``ValueError`` naming what is wrong."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a CPU strategy decisions file: not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ValueError(f'{path} is not a CPU strategy decisions file: no "format": {_FORMAT!r}')
    if document.get("version") != _VERSION:
        raise ValueError(f"{path}: decisions file version {document.get('version')!r}; this sepconv reads {_VERSION}")
    machine = document.get("machine")
    if not isinstance(machine, dict):
        raise ValueError(f'{path}: "machine" must be an object naming the CPU and versions')
    sections = {
        "layouts": _entries(path, document, "layouts", _layout_plan),
        "depthwise_backward": _entries(path, document, "depthwise_backward", _backward_choice),
        # absent from files written before sepconv measured pointwise convs
        "pointwise": _entries(path, document, "pointwise", _pointwise_algorithm, default=[]),
    }
    return machine, sections


def _entries(path: Path, document: dict, section: str, check_value: Any, default: Any = None) -> dict[tuple, Any]:
    entries = document.get(section, default)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: {section!r} must be a list of [key, decision] pairs")
    decisions = {}
    for index, entry in enumerate(entries):
        try:
            key, value = entry
            decoded = _decode(key)
            if not isinstance(decoded, tuple) or not decoded:
                raise ValueError("the key is not a list")
            decisions[decoded] = check_value(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {section}[{index}] is not a [key, decision] pair: {error}") from None
    return decisions


def _layout_plan(value: Any) -> tuple[str, int | None]:
    layout, chunk = value
    chunk_ok = chunk is None or (layout in _CHUNKED and type(chunk) is int and chunk >= 1)
    if layout not in _LAYOUTS or not chunk_ok:
        raise ValueError(
            f"{value!r}: a plan is [one of {_LAYOUTS}, samples per chunk (int >= 1, for {_CHUNKED} only) or null]"
        )
    return layout, chunk


def _backward_choice(value: Any) -> tuple[str, str]:
    grad_input, grad_weight = value
    if grad_input not in cpu_backward.GRAD_INPUT_ALGORITHMS or grad_weight not in cpu_backward.GRAD_WEIGHT_ALGORITHMS:
        raise ValueError(
            f"{value!r}: a choice is [one of {cpu_backward.GRAD_INPUT_ALGORITHMS}, "
            f"one of {cpu_backward.GRAD_WEIGHT_ALGORITHMS}]"
        )
    return grad_input, grad_weight


def _pointwise_algorithm(value: Any) -> str:
    if value not in cpu_strategy.POINTWISE_ALGORITHMS:
        raise ValueError(f"{value!r}: an algorithm is one of {cpu_strategy.POINTWISE_ALGORITHMS}")
    return value


def _encode(value: Any) -> Any:
    """A decision key or value as JSON: tuples as lists, dtypes as ``{"dtype": name}``."""
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    if value is None or isinstance(value, (str, int)):
        return value
    raise TypeError(f"cannot store {value!r} in a decision key")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(item) for item in value)
    if isinstance(value, dict):
        dtype = getattr(torch, str(value.get("dtype")), None)
        if set(value) != {"dtype"} or not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value!r} is not a dtype")
        return dtype
    if value is None or isinstance(value, (str, int)):
        return value
    raise ValueError(f"{value!r} cannot be part of a decision key")


def _merge_into_file(path: Path, loaded: dict[str, dict]) -> None:
    """At exit: the decisions measured since ``loaded`` (a :func:`_snapshot`), merged with the file's current
    ones (another process may have added some meanwhile), written back atomically."""
    sections = _snapshot()
    if sections == loaded:
        return
    try:
        if path.exists():
            machine, on_file = _read(path)
            if machine == _machine():
                sections = {section: {**on_file[section], **decisions} for section, decisions in sections.items()}
        atomic_write_text(path, _dumps(sections), overwrite=True)
    except (OSError, ValueError) as error:
        warnings.warn(f"{FILE_ENV}: could not save the CPU strategy decisions to {path}: {error}", stacklevel=1)


def _load_from_environment() -> None:
    """``SEPCONV_CPU_STRATEGY_FILE``: load it now (if it exists) and merge new decisions into it at exit."""
    name = os.environ.get(FILE_ENV)
    if not name:
        return
    path = Path(name)
    if path.exists():
        try:  # no warning of the other allocator regime: at import, the process has not chosen one yet
            _load(path, check_machine=True, stacklevel=2)
        except (OSError, ValueError) as error:
            warnings.warn(f"{FILE_ENV}: not loading {path}: {error}", stacklevel=1)
    atexit.register(_merge_into_file, path, _snapshot())


_load_from_environment()
