"""The frozen LLM text embedder: a transformers encoder/decoder + tokenizer + pooling.

Sentence-transformers models are unwrapped into their transformer and pooling mode, so
every embedder can also run on `inputs_embeds` (needed by the CoOp prompt learner).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..config import EmbedderConfig
from ..errors import ConfigError
from .hf_loading import quiet_transformers_loads
from .pooling import POOLERS, pool_hidden
from .sources import embedder_source

log = logging.getLogger(__name__)


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
        """The configured embedder, built on an RNG of its own: whatever the caller seeds next (the
        adapter) is the same whether the embedder is built here, later or never (models/deferred.py)."""
        with quiet_transformers_loads(), torch.random.fork_rng():
            return cls._from_config(cfg)

    @classmethod
    def _from_config(cls, cfg: EmbedderConfig) -> "TextEmbedder":
        source = embedder_source(cfg)
        if cfg.pooling is not None:
            POOLERS.get(cfg.pooling, "embedder.pooling")
        q_prefix = cfg.instruction_template.format(instruction=cfg.instruction) if cfg.instruction \
            else cfg.query_prefix
        dtype = getattr(torch, cfg.dtype)
        load_kwargs = {"dtype": dtype}
        if cfg.attn_implementation:
            load_kwargs["attn_implementation"] = cfg.attn_implementation
        loaded = source.load(cfg, load_kwargs)
        model, tokenizer, ident = loaded.model, loaded.tokenizer, loaded.identity
        head, head_dim = loaded.head, loaded.head_dim
        pooling = loaded.pooling or cfg.pooling or "mean"
        q_prefix, p_prefix = q_prefix or loaded.query_prefix, cfg.passage_prefix or loaded.passage_prefix
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
