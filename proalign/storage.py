"""Atomic file writes and proalign's safetensors model files. Nothing here unpickles."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ProalignError

log = logging.getLogger(__name__)


class UnsafeTargetError(ProalignError):
    """A symbolic link or a non-regular file where proalign would write: never followed or replaced."""


def check_target(path: str | Path) -> Path:
    """`path` is free, or a regular file proalign may replace or append to; a symbolic link (planted
    or not) or anything else there is an error naming it."""
    path = check_folder(path)  # the same rule for a file: never a link
    if path.exists() and not path.is_file():
        raise UnsafeTargetError(f"{path}: exists and is not a regular file; proalign writes a file there: remove it")
    return path


def check_folder(path: str | Path) -> Path:
    """`path`, a folder proalign writes into, is not a symbolic link (an error naming it)."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafeTargetError(f"{path}: is a symbolic link (to {os.readlink(path)}); proalign never writes "
                                "through links in a run folder: remove it")
    return path


def append_text(path: str | Path, text: str) -> None:
    """Append `text` to the regular file `path` (created if absent), never through a symbolic link."""
    path = check_target(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:
        if path.is_symlink():  # planted between the check and the open
            raise UnsafeTargetError(f"{path}: is a symbolic link; proalign never writes through links") from None
        raise WriteError(path, err) from None
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        import stat
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UnsafeTargetError(f"{path}: is not a regular file; proalign appends to files only")
        handle.write(text)


def atomic_savefig(fig, path: str | Path, **kwargs) -> None:
    """A matplotlib figure written like every other file: a temporary file, then a rename."""
    path = check_target(path)
    tmp = _temporary_beside(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, err) from None


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
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never through a
    symbolic link there: that is an error naming it)."""
    path = check_target(path)
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
    path = check_target(path)
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


# A safetensors header larger than this is not a model file's (a real one is kilobytes to a few MB).
MAX_HEADER_BYTES = 100 << 20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_safetensors_file(path: str | Path) -> dict:
    """The header of a safetensors file, checked before any tensor is read: its length within the
    file, valid JSON, every tensor's shape, dtype and byte range consistent and inside the file. A
    file that fails is a ProalignError naming it (a header length of 2^62 or a 1e12 x 1e12 shape
    would otherwise reach the reader)."""
    import json
    import struct
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size < 8:
            raise ProalignError(f"{path}: not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ProalignError(f"{path}: its header claims {length:,} bytes, more than the file's {size:,} (or over "
                                f"{MAX_HEADER_BYTES:,}): not a valid safetensors file")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise ProalignError(f"{path}: its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ProalignError(f"{path}: its header is not a JSON object")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise ProalignError(f"{path}: its __metadata__ is not a mapping")
            continue
        try:
            count = 1
            for dim in entry["shape"]:
                if not isinstance(dim, int) or dim < 0:
                    raise ValueError(f"dimension {dim!r}")
                count *= dim
            start, end = entry["data_offsets"]
            nbytes = count * _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ProalignError(f"{path}: tensor {name[:80]!r} has a malformed entry ({err})") from None
        if not (0 <= start <= end <= data) or end - start != nbytes:
            raise ProalignError(f"{path}: tensor {name[:80]!r} claims shape {entry['shape']} ({nbytes:,} bytes) at "
                                f"bytes {start}..{end} of {data:,}: not a valid safetensors file")
    return header


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
