"""`proalign search`: text -> image search over a folder, with any trained proalign model.

The folder is indexed once: every image's embedding goes into a safetensors index beside it
(`.proalign-index.safetensors` by default). Re-indexing encodes only new or changed files, and
the index is rebuilt when the image tower changes. Queries go through the LLM text tower, so they
may be long and in any language the embedder reads.
"""
from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .data.cache import tensor_digest
from .data.classification import IMAGE_SUFFIXES
from .errors import ProalignError
from .storage import atomic_write_text
from .storage import save_tensors

log = logging.getLogger(__name__)
INDEX_NAME = ".proalign-index.safetensors"


@dataclass
class ImageIndex:
    """Normalised image embeddings of a folder's images (paths relative to `root`)."""
    root: Path
    paths: list[str]
    embeddings: torch.Tensor
    tower: str                                      # identity of the image tower that encoded them
    stamps: dict[str, list[int]] = field(default_factory=dict)  # path -> [size, mtime_ns]
    skipped: dict[str, str] = field(default_factory=dict)       # unreadable files -> why

    def save(self, path: Path) -> None:
        # ASCII JSON: a file name that is not UTF-8 (a surrogate escape in Python) round-trips
        meta = {"proalign_index": "1", "tower": self.tower, "paths": json.dumps(self.paths),
                "stamps": json.dumps(self.stamps), "sha256": tensor_digest(self.embeddings)}
        save_tensors({"embeddings": self.embeddings}, path, meta)

    @classmethod
    def read(cls, path: Path, root: Path) -> Optional["ImageIndex"]:
        """The index at `path`, or None when it is missing or not a proalign index (then rebuilt)."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("proalign_index") != "1":
                raise ValueError("not a proalign index")
            embeddings = load_file(str(path))["embeddings"]
            if tensor_digest(embeddings) != meta.get("sha256"):
                raise ValueError("its embeddings do not match the checksum written with them")
            paths = json.loads(meta["paths"])
            if len(paths) != len(embeddings):
                raise ValueError(f"{len(paths)} paths for {len(embeddings)} embeddings")
            return cls(root, paths, embeddings, meta["tower"], json.loads(meta["stamps"]))
        except Exception as err:  # a damaged index is rebuilt, never trusted
            log.warning("%s: unusable index (%s); re-indexing", path, err)
            return None


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursive, sorted), relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_tower_identity(model) -> str:
    from .models.towers import module_fingerprint
    size = getattr(model.clip.visual, "image_size", None)
    return f"{module_fingerprint(model.clip.visual)}:{size}"


def display_path(path: str | Path) -> str:
    """A path as text that can be printed: bytes of a name that are not UTF-8 show as U+FFFD."""
    return os.fsencode(str(path)).decode("utf-8", errors="replace")


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def build_index(model, folder: str | Path, index_path: Optional[str | Path] = None, batch_size: int = 64,
                progress: bool = True) -> tuple[ImageIndex, dict]:
    """Index `folder` with `model`'s image tower, reusing the rows of unchanged files. Unreadable
    images are skipped, counted and logged. Returns (index, counts)."""
    from tqdm.auto import tqdm
    folder = Path(folder)
    if not folder.is_dir():
        raise ProalignError(f"{folder}: not a folder of images")
    index_path = Path(index_path) if index_path else folder / INDEX_NAME
    tower = image_tower_identity(model)
    old = ImageIndex.read(index_path, folder)
    reusable = {}
    if old is not None and old.tower == tower:
        reusable = {p: row for p, row in zip(old.paths, old.embeddings)}
    paths = list_images(folder)
    if not paths:
        raise ProalignError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    stamps, skipped = {}, {}
    for rel in paths:
        try:
            stamps[rel] = _stamp(folder / rel)
        except OSError as err:
            skipped[rel] = f"{display_path(folder / rel)}: {err.strerror or err}"
            log.warning("search index: skipped %s", skipped[rel])
    paths = [p for p in paths if p in stamps]
    todo = [p for p in paths if p not in reusable or old.stamps.get(p) != stamps[p]]
    rows = {p: reusable[p] for p in paths if p not in todo}
    bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        tensors, names = [], []
        for rel in todo[start:start + batch_size]:
            try:
                tensors.append(model.image_tensor(folder / rel))
                names.append(rel)
            except Exception as err:  # whatever a decoder raises (bomb, truncated data, ...): a skip
                skipped[rel] = str(err) if isinstance(err, ProalignError) else \
                    f"{display_path(folder / rel)}: {type(err).__name__}: {err}"
                log.warning("search index: skipped %s", skipped[rel])
        if tensors:
            feats = model.encode_image(torch.stack(tensors), batch_size=batch_size)
            rows.update(zip(names, feats))
        bar.update(len(todo[start:start + batch_size]))
    bar.close()
    kept = [p for p in paths if p in rows]
    if not kept:
        raise ProalignError(f"{folder}: none of the {len(paths)} images could be read")
    index = ImageIndex(folder, kept, torch.stack([rows[p] for p in kept]), tower,
                       {p: stamps[p] for p in kept}, skipped)
    counts = {"images": len(kept), "encoded": len([p for p in todo if p in rows]), "reused": len(paths) - len(todo),
              "skipped": len(skipped)}
    if todo or old is None or len(old.paths) != len(kept):
        try:
            index.save(index_path)
        except OSError as err:
            raise ProalignError(f"{index_path}: cannot write the index ({err}); choose another place with --index")
    return index, counts


def index_folder(model, folder: str | Path, index_path: Optional[str | Path] = None, batch_size: int = 64,
                 progress: bool = True) -> tuple[ImageIndex, dict]:
    """`build_index`, saying what it did (for the commands that index a folder)."""
    index, counts = build_index(model, folder, index_path, batch_size, progress)
    print(f"index: {counts['images']} images ({counts['encoded']} encoded, {counts['reused']} reused, "
          f"{counts['skipped']} unreadable skipped)")
    return index, counts


@dataclass
class Hit:
    path: str
    score: float


def top_hits(index: ImageIndex, scores: torch.Tensor, top_k: int) -> list[Hit]:
    """The `top_k` images of one row of scores against the index."""
    best = scores.topk(min(top_k, len(index.paths)))
    return [Hit(index.paths[i], float(s)) for s, i in zip(best.values.tolist(), best.indices.tolist())]


def search(model, index: ImageIndex, queries: Sequence[str], top_k: int = 5) -> list[list[Hit]]:
    """The `top_k` images (cosine similarity) for each query."""
    text = model.encode_text(list(queries)).cpu()
    return [top_hits(index, row, top_k) for row in text @ index.embeddings.T]


def format_hits(queries: Sequence[str], hits: Sequence[Sequence[Hit]], root: Path) -> str:
    lines = []
    for query, found in zip(queries, hits):
        lines.append(f"query: {query}")
        lines += [f"  {rank:>2}. {hit.score:+.3f}  {display_path(root / hit.path)}" for rank, hit in enumerate(found, 1)]
    return "\n".join(lines)


def write_html(queries: Sequence[str], hits: Sequence[Sequence[Hit]], root: Path, out: str | Path) -> Path:
    """A page of thumbnails per query (images linked relative to the page)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><meta charset='utf-8'><title>proalign search</title>",
             "<style>body{font-family:sans-serif} figure{display:inline-block;margin:6px;text-align:center}"
             " img{max-width:160px;max-height:160px} figcaption{font-size:12px}</style>"]
    for query, found in zip(queries, hits):
        parts.append(f"<h2>{html.escape(query)}</h2><div>")
        for rank, hit in enumerate(found, 1):
            src = os.path.relpath((root / hit.path).resolve(), out.parent.resolve())
            url = quote(os.fsencode(Path(src).as_posix()))  # the name's own bytes, %-encoded
            parts.append(f"<figure><img src='{html.escape(url, quote=True)}' loading='lazy'>"
                         f"<figcaption>{rank}. {html.escape(display_path(hit.path))}<br>{hit.score:+.3f}"
                         "</figcaption></figure>")
        parts.append("</div>")
    atomic_write_text(out, "\n".join(parts))
    return out


def run_search(model_path: str, folder: str, queries: Sequence[str], top_k: int = 5, index_path: Optional[str] = None,
               html_out: Optional[str] = None, device: Optional[str] = None, batch_size: int = 64,
               progress: bool = True) -> list[list[Hit]]:
    from .loading import load
    if top_k < 1:
        raise ProalignError(f"--top-k must be >= 1, got {top_k}")
    queries = [q for q in queries if q.strip()]
    if not queries:
        raise ProalignError("give at least one non-empty query")
    if not Path(folder).is_dir():  # before the model loads
        raise ProalignError(f"{folder}: not a folder of images")
    model, _, _ = load(model_path, device)
    index, _ = index_folder(model, folder, index_path, batch_size, progress)
    hits = search(model, index, queries, top_k)
    print(format_hits(queries, hits, Path(folder)))
    if html_out:
        print(f"wrote {write_html(queries, hits, Path(folder), html_out)}")
    return hits
