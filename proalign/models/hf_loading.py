"""Loading transformers / sentence-transformers weights without trusting them: `pkg:` names found
without importing anything, custom model code refused, architectures sized before they are built."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError


def _extra_providing(module: str) -> str | None:
    """The proalign extra whose requirements include the distribution of `module` ("" for a core
    requirement), or None."""
    import re
    from importlib.metadata import PackageNotFoundError, requires
    try:
        reqs = requires("proalign") or []
    except PackageNotFoundError:
        return None
    norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()  # noqa: E731
    for req in reqs:
        dist = re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0]
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if norm(dist) == norm(module):
            return extra.group(1) if extra else ""
    return None


def _package_folder(module: str) -> Path | None:
    """The folder of package `module` (dotted), found without importing anything: only the top-level
    name is looked up on the import path (`find_spec` of a top-level name runs no code), the rest is
    walked as sub-folders. A name from a model file must never run a package's `__init__`."""
    import importlib.util
    top, *rest = module.split(".")
    if not top.isidentifier() or not all(part.isidentifier() for part in rest):
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    for part in rest:
        folder = folder / part
        if not folder.is_dir():
            return None
    return folder


def resolve_package_dir(name: str, field: str = "embedder.name") -> str:
    """`pkg:<module>` names a model directory shipped inside an installed Python package."""
    module = name[len("pkg:"):]
    root = _package_folder(module)
    if root is None:
        extra = _extra_providing(module)
        hint = (f"; install it with pip install -e '.[{extra}]'" if extra
                else "; it is a proalign requirement: pip install -e ." if extra == "" else "")
        raise ConfigError(f"{field}: {name!r} names package {module!r}, which is not installed{hint}")
    for marker in ("modules.json", "config.json", "tokenizer.json", "tokenizer_config.json"):
        hits = sorted(root.rglob(marker), key=lambda p: len(p.parts))
        if hits:
            return str(hits[0].parent)
    raise ConfigError(f"{field}: no model or tokenizer directory found inside package {module!r} ({root})")


def meta_parameters(build) -> int:
    """Parameters of the module `build()` makes, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def refuse_oversized(build, dtype: torch.dtype, limit_gb: float, field: str, limit_field: str) -> None:
    """Refuse the module `build()` makes when its weights would take more than `limit_gb`, sized
    on the meta device: an architecture from a file is sized before it is allocated."""
    count = meta_parameters(build)
    size_gb = count * torch.empty((), dtype=dtype).element_size() / 1e9
    if size_gb > limit_gb:
        raise ConfigError(f"{field}: {count:,} parameters ({size_gb:,.1f} GB as {str(dtype).removeprefix('torch.')}), "
                          f"over {limit_field} ({limit_gb:g} GB); raise it in your run config if you mean it")


def refuse_remote_code(err: Exception, name: str, field: str) -> None:
    """transformers asks for `trust_remote_code` when a model's config maps to code shipped with the
    model (`auto_map`): proalign never runs such code, so that request becomes a config error."""
    if "trust_remote_code" in str(err):
        raise ConfigError(f"{field}: {name!r} needs custom code from its own files (auto_map / trust_remote_code); "
                          "proalign runs no code that comes with a model unless your run config sets "
                          "embedder.trust_remote_code: true (a model file never can)") from None


@contextlib.contextmanager
def quiet_transformers_loads():
    """transformers' load reports off (e.g. the unused BERT pooler reported as "missing"), and its
    per-file load bars unless `--verbose` (restored afterwards)."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    if os.environ.get("PROALIGN_VERBOSE") != "1":
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name: str, field: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    name = maybe_pkg(name, field)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as err:
        refuse_remote_code(err, name, field)
        raise


def maybe_pkg(name: Optional[str], field: str = "embedder.name") -> Optional[str]:
    if name and name.startswith("pkg:"):
        return resolve_package_dir(name, field)
    return name


# sentence-transformers' pooling modes as `embedder.pooling` names them
_ST_POOLING_NAMES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}


def unwrap_sentence_transformer(name: str, load_kwargs: Optional[dict] = None, trust_remote_code: bool = False):
    """(transformer, tokenizer, head, head output dim, pooling name) of a sentence-transformers
    model. The head is every module after the transformer, run as the library runs it, so the
    model's own pooling (whatever its version writes to disk) and any Dense/Normalize are kept."""
    from sentence_transformers import SentenceTransformer
    try:
        st = SentenceTransformer(name, device="cpu", model_kwargs=load_kwargs or None,
                                 trust_remote_code=trust_remote_code)
    except OSError as err:
        raise OSError(f"embedder.name: cannot load {name!r} as a sentence-transformers model: {err}") from err
    except ValueError as err:
        refuse_remote_code(err, name, "embedder.name")
        raise
    modules = list(st)
    transformer = modules[0]
    if not hasattr(transformer, "auto_model"):
        raise ValueError(f"embedder.name: {name!r}: the first sentence-transformers module is "
                         f"{type(transformer).__name__}, not a transformers model")
    head = nn.ModuleList(modules[1:])
    poolers = [m for m in head if hasattr(m, "pooling_mode")]
    if not poolers:
        raise ValueError(f"embedder.name: {name!r} has no Pooling module after its transformer")
    mode = poolers[0].pooling_mode
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    pooling = "+".join(_ST_POOLING_NAMES.get(m, m) for m in modes)
    dim_of = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return transformer.auto_model, transformer.tokenizer, head, dim_of(), pooling
