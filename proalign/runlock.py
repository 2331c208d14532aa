"""One run per output folder: `<output_dir>/.proalign-lock` names the process that holds it.

Two runs writing one folder interleave their metrics and overwrite each other's checkpoints and
model files, so the second refuses to start and names the first. A lock whose process is gone
(killed, crashed, the machine rebooted) is stale: on the same host that is checked (process id
and start time) and the lock is taken over with a warning, so `--resume` after a kill just works.
A lock held on another host cannot be checked: the message says which file to remove. Under
torchrun or DeepSpeed the job's global rank 0 holds it for all its ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import ProalignError

log = logging.getLogger(__name__)
LOCK_NAME = ".proalign-lock"
# Written into every folder proalign uses as an output_dir: a non-empty folder without it is the
# user's, not a run, and is refused (it would get config.yaml replaced and .jsonl files appended).
RUN_MARKER = ".proalign-run"
# A lock file younger than this with no readable content is being written by its holder.
_WRITE_WINDOW_S = 10.0
_held: dict[Path, int] = {}  # locks this process holds -> nesting depth (the demo runs stages inside)


class RunLockError(ProalignError):
    """The output folder is in use by another run."""


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), telling a live process from a
    later one that reuses its id; None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start is None or _process_start(pid) in (None, start)


def _read(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _describe(holder: dict) -> str:
    return (f"{holder.get('command', 'a run')} (PID {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('since', '?')})")


def claim_run_folder(folder: Path, force: bool = False) -> None:
    """`folder` as an output_dir: created, or already a run (its marker), or empty; a folder of the
    user's files is refused, naming it and the way to accept it anyway."""
    marker = folder / RUN_MARKER
    if folder.exists() and not folder.is_dir():
        raise RunLockError(f"output_dir {folder}: exists and is not a folder")
    if folder.is_dir() and not marker.is_file() and not force:
        entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunLockError(f"output_dir {folder}: a non-empty folder that is not a proalign run ({len(entries)} "
                               f"entries: {shown}; no {RUN_MARKER}). proalign would replace config.yaml and append "
                               "to .jsonl files there: give a new or empty output_dir, or pass --force to use this "
                               "folder anyway")
    if marker.is_symlink() or (marker.exists() and not marker.is_file()):
        raise RunLockError(f"{marker}: is not a regular file (a symbolic link?): remove it")
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str, force: bool = False) -> Iterator[None]:
    """Hold `folder`'s run lock for the duration (re-entrant within one process). A folder that is
    not empty and not a proalign run (no RUN_MARKER) is refused unless `force`; the folder is
    marked as a run once the lock is held."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    folder = Path(folder)
    claim_run_folder(folder, force)
    path = (folder / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                if time.time() - path.stat().st_mtime < _WRITE_WINDOW_S:
                    raise RunLockError(f"{folder} is being taken by another run (lock file {path})") from None
                log.warning("%s: unreadable lock file %s; taking it over", folder, path)
            elif holder.get("host") != me["host"]:
                raise RunLockError(f"{folder} is in use by {_describe(holder)}: one run per output_dir. If that "
                                   f"run is gone, remove {path}") from None
            elif _alive(int(holder.get("pid", -1)), holder.get("start")):
                raise RunLockError(f"{folder} is in use by {_describe(holder)}: one run per output_dir; wait for "
                                   "it, or give this run another output_dir") from None
            else:
                log.warning("%s: the run that held it, %s, is gone; taking its lock over", folder, _describe(holder))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise RunLockError(f"{folder}: could not take the run lock {path}")
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        if (_read(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
