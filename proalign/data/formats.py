"""What every dataset format shares: the format registry (`register_format`), the record a
retrieval reader returns, and the checks readers use on the files they read (errors name the file
and line). The formats themselves: proalign/data/readers.py (retrieval) and
proalign/data/classification.py (classification); proalign/data/datasets.py loads any of them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ProalignError
from ..registry import Registry


class DatasetFormatError(ProalignError, ValueError):
    """A dataset file or record does not have the expected shape; the message names file and line."""


@dataclass
class Record:
    key: str
    image_path: Path
    captions: dict[str, list[str]]


def need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(value, dict):
                raise DatasetFormatError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


def record_field(record: dict, name: str, where: str, kind=str):
    if name not in record:
        raise DatasetFormatError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        raise DatasetFormatError(f"{where}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def image_inside(root: Path, name: str, where: str) -> Path:
    """`root / name` for an image name read from a dataset file. The name must stay inside the root
    (no `..`, not absolute, not empty): a dataset file never opens an arbitrary file on the machine,
    as tar members named so are skipped in shards. A missing image names the file and line."""
    from pathlib import PurePosixPath, PureWindowsPath
    if not name or ".." in PurePosixPath(name).parts or PurePosixPath(name).is_absolute() \
            or PureWindowsPath(name).drive or ".." in PureWindowsPath(name).parts:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise DatasetFormatError(f"{where}: image name {shown!r} must be a relative path inside {root}")
    path = root / name
    if not path.is_file():
        raise DatasetFormatError(f"{where}: image {path} not found")
    return path


# --------------------------------------------------------------------------- the format registry
# A format is one reader plus one options dataclass, registered here; `eval.datasets[i].options`
# is validated against the dataclass (errors name the field). A reader returns Records
# (images are decoded by `load_records`), or, with `decoded=True`, (images, keys, metas) itself.


@dataclass
class NoOptions:
    """The format takes no options."""


@dataclass
class EvalFormat:
    read: Callable
    options: type
    decoded: bool = False
    task: str = "retrieval"  # or "classification": the reader returns ClassificationRecords


FORMATS: Registry[EvalFormat] = Registry("dataset format")


def register_format(name: str, options: type = NoOptions, decoded: bool = False, task: str = "retrieval"):
    """Decorator: the function reads format `name` (`eval.datasets[i].format`); `options` is the
    dataclass its `options:` mapping is validated into."""
    if task not in ("retrieval", "classification"):
        raise ValueError(f"dataset format {name!r}: task must be retrieval or classification, got {task!r}")

    def add(reader):
        FORMATS.register(name, EvalFormat(reader, options, decoded, task))
        return reader
    return add
