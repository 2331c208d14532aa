"""Atomic file writes and proalign's safetensors model files. Nothing here unpickles."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ProalignError

log = logging.getLogger(__name__)


def _temporary_beside(path: Path) -> Path:
    """A new, empty file of this process's own beside `path` (unique across processes and hosts on a
    shared filesystem: two writers never share a temporary file)."""
    import tempfile
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(path, err) from None
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from the job's other users
    return Path(name)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, err) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (a temporary file, then a rename). A write that fails (a
    full disk, a missing folder) removes the temporary file and names `path` in one line."""
    from safetensors import SafetensorError
    path = Path(path)
    tmp = _temporary_beside(path)
    # safetensors refuses shared storage: clone into contiguous, owned tensors.
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(owned, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, err) from None


class WriteError(ProalignError):
    """A file could not be written (a full disk, a missing folder); one line naming it."""

    def __init__(self, path: Path, err: BaseException):
        reason = " ".join((getattr(err, "strerror", None) or str(err)).split())
        self.reason = reason if len(reason) <= 300 else reason[:297] + "..."
        super().__init__(f"{path}: cannot write it ({self.reason})")


def load_module_weights(module: torch.nn.Module, path: str | Path, prefix: str = "", strict: bool = True):
    """Load `prefix`-ed entries of a proalign safetensors file into `module`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: proalign loads .safetensors only (no pickles)")
    state = load_file(str(path))
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise KeyError(f"{path}: no tensors under prefix {prefix!r}")
    missing, unexpected = module.load_state_dict(picked, strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module
