"""Shard patterns -> shard paths, without importing torch (the config check uses it)."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

from ..errors import ProalignError


class ShardPatternError(ProalignError, FileNotFoundError):
    """A shard pattern matched nothing, or names a file that does not exist; names the pattern."""


def expand_shards(spec: Sequence[str] | str) -> list[str]:
    """Expand brace patterns (`a-{000..003}.tar`) and globs. Every pattern must match: a typo in
    one entry of a list is an error naming it, never silently dropped. URLs (`pipe:`, `s3://`)
    pass through unchecked."""
    from braceexpand import braceexpand
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in specs:
        if not isinstance(pattern, str) or not pattern:
            raise ShardPatternError(f"shard pattern {pattern!r} is not a path")
        for url in braceexpand(pattern):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif any(c in url for c in "*?["):
                hits = sorted(glob.glob(url))
                if not hits:
                    raise ShardPatternError(f"shard pattern {pattern!r}: {url!r} matches no file")
                urls.extend(hits)
            elif not Path(url).is_file():
                raise ShardPatternError(f"shard not found: {url} (pattern {pattern!r})")
            else:
                urls.append(url)
    if not urls:
        raise ShardPatternError(f"no shards match {spec!r}")
    return urls
