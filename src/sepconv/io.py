"""Safe file input/output: weights from safetensors or ``torch.load(weights_only=True)`` only,
and atomic writes (temp file + rename) that refuse to overwrite unless asked.

>>> import tempfile, pathlib, torch
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
>>> save_state_dict({"w": torch.ones(2)}, path)
>>> load_state_dict(path)["w"]
tensor([1., 1.])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "atomic_write",
    "atomic_write_png",
    "atomic_write_text",
    "check_output",
    "load_state_dict",
    "save_state_dict",
]

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it onto ``path``.

    Refuses (see :func:`check_output`) a directory, and an existing file unless ``overwrite=True``;
    on failure the temp file is removed and ``path`` is left as it was.
    """
    path = check_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(path: PathLike, *, overwrite: bool = False) -> Path:
    """``path`` as a ``Path`` if a file may be written there, checked before any work is done.

    ``IsADirectoryError`` for a directory (even with ``overwrite``: a file never replaces one),
    ``FileExistsError`` for an existing file unless ``overwrite=True``.

    >>> check_output(tempfile.gettempdir(), overwrite=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    IsADirectoryError: ... is a directory; give a file path
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    return path


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def atomic_write_png(figure: Any, path: PathLike, *, dpi: int = 110, overwrite: bool = False) -> None:
    """Lay out a matplotlib ``figure``, write it to ``path`` as PNG atomically (see :func:`atomic_write`), close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), overwrite=overwrite)
    finally:
        plt.close(figure)


def save_state_dict(state: Mapping[str, Tensor], path: PathLike, *, overwrite: bool = False) -> None:
    """Save tensors as safetensors, atomically (tensors are made contiguous; shared storage is copied)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)), overwrite=overwrite)


def load_state_dict(path: PathLike) -> dict[str, Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects.

    A torch checkpoint holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:  # a corrupt or truncated file: name it (the Rust error does not)
            raise ValueError(f"cannot read {path} as a safetensors file: {error}") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; name the file and the rule
        raise ValueError(
            f"cannot read {path} as safetensors or a weights-only torch file (full pickles are never loaded): {error}"
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(state)
