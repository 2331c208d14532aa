"""Where a shard lives: a local path, a `pipe:` command, an http(s) URL or an object store URL
(`s3://`, through fsspec). Each shard gets a cache name unique to its whole location, and an
identity (size and mtime locally; ETag, Last-Modified, Content-Length remotely) that tells a
changed shard without reading it. Reading shards is webdataset's job; this module only names
and describes them.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Optional
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ProalignError

# How long a remote shard's metadata request may take before it is an error naming the URL.
REMOTE_TIMEOUT_S = 30
# URL schemes read through fsspec (object stores); http(s) and pipe: are read by webdataset itself.
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")


class ShardLocationError(ProalignError, OSError):
    """A shard whose location cannot be reached or described; names the URL."""


def kind(url: str) -> str:
    """`file`, `pipe`, `http` or `fsspec`."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return "http"
    if scheme in FSSPEC_SCHEMES:
        return "fsspec"
    if scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", url):
        return "file"
    raise ShardLocationError(f"{url}: unsupported shard URL scheme {scheme!r} (paths, pipe:, http(s)://, "
                             f"{', '.join(s + '://' for s in FSSPEC_SCHEMES)})")


def canonical(url: str) -> str:
    """The shard's whole location: an absolute, resolved path for a local file, else the URL as given."""
    if kind(url) == "file":
        path = urlparse(url).path if url.startswith("file:") else url
        return str(Path(path).resolve())
    return url


def cache_name(url: str) -> str:
    """A file name for the shard's cache entry: its readable stem plus a digest of its whole
    location, so `a/00000.tar` and `b/00000.tar` never share one."""
    where = canonical(url)
    digest = hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    tail = where.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", tail[:-4] if tail.endswith(".tar") else tail)[:64].strip("._") or "shard"
    return f"{stem}-{digest}"


def identity(url: str) -> dict:
    """What tells a changed shard without reading it: size and mtime of a local file; the ETag,
    Last-Modified and Content-Length a server or object store reports. A `pipe:` command has no
    such facts: its command line is its identity (`proalign cache --verify` reads it)."""
    where = kind(url)
    if where == "file":
        path = canonical(url)
        try:
            stat = os.stat(path)
        except OSError as err:
            raise ShardLocationError(f"{url}: cannot stat the shard ({err.strerror})") from None
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if where == "pipe":
        return {"command": url}
    if where == "http":
        return _http_identity(url)
    return _fsspec_identity(url)


def _http_identity(url: str) -> dict:
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S) as response:
            headers = response.headers
    except urllib.error.HTTPError as err:
        raise ShardLocationError(f"{url}: the server answered {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ShardLocationError(f"{url}: cannot reach it ({getattr(err, 'reason', err)})") from None
    facts = {key: headers.get(header) for key, header in
             (("etag", "ETag"), ("last_modified", "Last-Modified"), ("size", "Content-Length"))}
    facts = {k: v for k, v in facts.items() if v is not None}
    if not facts:
        raise ShardLocationError(f"{url}: the server reports no ETag, Last-Modified or Content-Length, so a "
                                 "changed shard could not be told from its cache; serve it with one of them")
    return facts


def _fsspec_identity(url: str) -> dict:
    try:
        import fsspec
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except ImportError as err:
        raise ShardLocationError(f"{url}: reading {urlparse(url).scheme}:// shards needs fsspec's backend for it "
                                 f"({err}; for s3:// `pip install s3fs`), or use `pipe:aws s3 cp {url} -`") from None
    except (OSError, ValueError) as err:
        raise ShardLocationError(f"{url}: cannot describe it ({type(err).__name__}: {err})") from None
    facts = {"size": info.get("size"), "etag": info.get("ETag") or info.get("etag"),
             "last_modified": str(info.get("LastModified") or info.get("mtime") or "") or None}
    return {k: v for k, v in facts.items() if v is not None}


def open_stream(url: str):
    """A binary stream of the shard's bytes (webdataset's `gopen` for paths, pipes and http(s);
    fsspec for object stores)."""
    if kind(url) == "fsspec":
        import fsspec
        return fsspec.open(url, "rb").open()
    from webdataset.gopen import gopen
    return gopen(url, "rb")


def reported_size(url: str, facts: Optional[dict] = None) -> Optional[int]:
    """The byte count a server or object store reports for a shard (`facts`: its `identity`, when
    the caller has it); None for a local file, a pipe, or a server that reports none."""
    if kind(url) in ("file", "pipe"):
        return None
    try:
        size = (facts if facts is not None else identity(url)).get("size")
        return int(size) if size is not None else None
    except (ProalignError, ValueError):
        return None


def seekable(url: str) -> bool:
    """Whether a byte range of the shard can be read without reading what comes before it."""
    return kind(url) != "pipe"


def open_range(url: str, start: int, end: int):
    """A binary stream of bytes [start, end) of the shard: a seek locally and in object stores, an
    HTTP Range request (a server that ignores ranges is read from the start, the first `start`
    bytes dropped). `pipe:` commands have no ranges (see `seekable`)."""
    where = kind(url)
    if where == "pipe":
        raise ShardLocationError(f"{url}: a pipe: command cannot be read from byte {start}")
    if where == "http":
        import urllib.error
        import urllib.request
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
        try:
            response = urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            raise ShardLocationError(f"{url}: the server answered {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ShardLocationError(f"{url}: cannot reach it ({getattr(err, 'reason', err)})") from None
        if response.status != 206:  # the whole file: drop what comes before the range
            _discard(response, start)
        elif not str(response.headers.get("Content-Range", "")).startswith(f"bytes {start}-"):
            response.close()
            raise ShardLocationError(f"{url}: asked for bytes {start}-{end - 1}, the server sent "
                                     f"{response.headers.get('Content-Range')!r}")
        return response
    stream = open(canonical(url), "rb") if where == "file" else open_stream(url)
    stream.seek(start)
    return stream


def _discard(stream, count: int) -> None:
    while count > 0:
        block = stream.read(min(count, 1 << 20))
        if not block:
            return
        count -= len(block)


def content_digest(url: str) -> str:
    """SHA-256 of the shard's bytes: a full read, done only when asked (`proalign cache --verify`)."""
    digest = hashlib.sha256()
    try:
        with open_stream(url) as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    except OSError as err:
        raise ShardLocationError(f"{url}: cannot read it ({err})") from None
    return digest.hexdigest()


def register_fsspec_readers() -> None:
    """webdataset reads object-store URLs through fsspec (it has no handler of its own for s3://)."""
    import importlib
    wds_gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function of that name)

    def gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
        import fsspec
        return fsspec.open(url, mode).open()
    for scheme in FSSPEC_SCHEMES:
        wds_gopen.gopen_schemes.setdefault(scheme, gopen_fsspec)
