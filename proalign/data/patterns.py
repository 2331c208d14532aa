"""Shard patterns -> shard paths, without importing torch (the config check uses it)."""
from __future__ import annotations

import glob
from pathlib import Path

from ..errors import ProalignError


class ShardPatternError(ProalignError, FileNotFoundError):
    """A shard pattern matched nothing, or names a file that does not exist; names the pattern."""


def sources(spec) -> list[tuple[list[str], float]]:
    """The shard sources of a `data.train_shards` value, each as (patterns, weight): a pattern or
    a list of them (weight 1 each; open_clip's `a::b` joins several in one string), or entries
    `{shards: pattern or list, weight: w}` (the weight multiplies each of its shards' chance to
    be drawn in resampled epochs)."""
    entries = [spec] if isinstance(spec, (str, dict)) else list(spec)
    out = []
    for number, entry in enumerate(entries):
        if isinstance(entry, dict):
            unknown = set(entry) - {"shards", "weight", "name"}
            if unknown or "shards" not in entry:
                raise ShardPatternError(f"data.train_shards[{number}]: a source is {{shards: ..., weight: ...}}; "
                                        f"got keys {sorted(entry)}")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise ShardPatternError(f"data.train_shards[{number}].weight: a positive number, got {weight!r}")
            patterns = entry["shards"]
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            out.append(([q for p in patterns for q in _split_sources(p)], float(weight)))
        else:
            out.extend(([part], 1.0) for part in _split_sources(entry))
    return out


def _split_sources(pattern):
    if not isinstance(pattern, str) or not pattern:
        raise ShardPatternError(f"shard pattern {pattern!r} is not a path")
    return [part for part in pattern.split("::") if part]


def shard_weights(spec) -> dict[str, float]:
    """{shard URL: its source's weight}, over every source of `spec`."""
    return {url: weight for patterns, weight in sources(spec) for url in expand_shards(patterns)}


def expand_shards(spec) -> list[str]:
    """Expand brace patterns (`a-{000..003}.tar`) and globs, over every source (`sources`). Every
    pattern must match: a typo in one entry of a list is an error naming it, never silently
    dropped. URLs (`pipe:`, `s3://`) pass through unchecked."""
    from braceexpand import braceexpand
    specs = [p for patterns, _ in sources(spec) for p in patterns]
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
