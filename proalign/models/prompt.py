"""CoOp prompt learner on the LLM embedder: learned context vectors spliced into the token
embeddings of the embedder's own tokenizer, run through `inputs_embeds`.

Sequence layout (CoOp's `class_token_position` names where the text goes):

    end:    [head] [prefix] [ctx_1..ctx_M] [text] [tail]
    front:  [head] [prefix] [text] [ctx_1..ctx_M] [tail]
    middle: [head] [prefix] [ctx_1..ctx_M/2] [text] [ctx_M/2+1..ctx_M] [tail]

`head`/`tail` are the tokenizer's own special tokens (e.g. [CLS]/[SEP], <s>/</s>), `prefix` the
role prefix (e5's `query: `). Text that does not fit in `max_length` after the context and the
fixed tokens are reserved is cut and counted.
"""
from __future__ import annotations

import json
import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .embedder import TextEmbedder

log = logging.getLogger(__name__)
CONTEXT = -1  # placeholder id of a context position while building a sequence


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single sequence."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for at in range(len(framed) - len(bare) + 1):
        if framed[at:at + len(bare)] == bare:
            return list(framed[:at]), list(framed[at + len(bare):])
    raise ValueError(f"cannot find where {type(tokenizer).__name__} places its special tokens")


class PromptLearner(nn.Module):
    """M learnable context vectors (unified, or one set per class with `class_specific`)."""

    def __init__(self, embedder: TextEmbedder, n_ctx: int = 16, position: str = "end",
                 class_specific: bool = False, class_names: Optional[Sequence[str]] = None,
                 init_phrase: Optional[str] = None, init_std: float = 0.02, role: Optional[str] = None):
        super().__init__()
        if position not in ("front", "middle", "end"):
            raise ValueError(f"prompt position must be front|middle|end, got {position!r}")
        if class_specific and not class_names:
            raise ValueError("class-specific context (CSC) needs the class names")
        # Not a registered submodule: the frozen embedder must stay out of this module's
        # state_dict and checkpoints (only the context is learned).
        object.__setattr__(self, "embedder", embedder)
        self.position = position
        self.class_specific = class_specific
        self.class_names = list(class_names or [])
        self.role = role or embedder.text_role
        self.init_phrase = init_phrase
        tok = embedder.tokenizer
        self.head, self.tail = special_token_frame(tok)
        prefix = embedder.prefixes[self.role]
        self.prefix_ids = tok(prefix.strip(), add_special_tokens=False)["input_ids"] if prefix.strip() else []
        width = embedder.input_embeddings().weight.shape[1]
        if init_phrase:
            phrase_ids = tok(init_phrase, add_special_tokens=False)["input_ids"]
            if len(phrase_ids) != n_ctx:
                log.info("prompt: init phrase %r is %d tokens; using n_ctx=%d", init_phrase, len(phrase_ids),
                         len(phrase_ids))
            n_ctx = len(phrase_ids)
            with torch.no_grad():
                init = embedder.input_embeddings().weight[torch.tensor(phrase_ids)].detach().clone().float()
        else:
            init = torch.randn(n_ctx, width) * init_std
        self.n_ctx = n_ctx
        if class_specific:
            init = init.unsqueeze(0).repeat(len(self.class_names), 1, 1)
            if not init_phrase:
                init = torch.randn_like(init) * init_std
        self.ctx = nn.Parameter(init)
        fixed = len(self.head) + len(self.prefix_ids) + len(self.tail) + n_ctx
        if fixed >= embedder.max_length:
            raise ValueError(f"prompt: {n_ctx} context vectors + {fixed - n_ctx} fixed tokens leave no room "
                             f"for text within max_length={embedder.max_length}")
        self.text_budget = embedder.max_length - fixed
        self.truncated_count = 0

    # ------------------------------------------------------------------ building
    def _layout(self, text_ids: list[int]) -> list[int]:
        """Token ids with CONTEXT placeholders, in sequence order."""
        ctx = [CONTEXT] * self.n_ctx
        if self.position == "end":
            body = ctx + text_ids
        elif self.position == "front":
            body = text_ids + ctx
        else:
            half = self.n_ctx // 2
            body = ctx[:half] + text_ids + ctx[half:]
        return self.head + self.prefix_ids + body + self.tail

    def build(self, texts: Sequence[str], class_index: Optional[torch.Tensor] = None):
        """(inputs_embeds (B,T,D), attention_mask (B,T), context_slot (B,T): -1 or the context index)."""
        if self.class_specific:
            if class_index is None:
                raise ValueError("class-specific context needs class_index for every text")
            class_index = torch.as_tensor(class_index, dtype=torch.long)
            if len(class_index) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(class_index)} class indices")
        tok = self.embedder.tokenizer
        rows, cut = [], 0
        for text_ids in tok(list(texts), add_special_tokens=False)["input_ids"]:
            if len(text_ids) > self.text_budget:
                cut += 1
                text_ids = text_ids[:self.text_budget]
            rows.append(self._layout(text_ids))
        if cut:
            self.truncated_count += cut
            log.warning("prompt: %d of %d texts cut to %d tokens (max_length %d minus %d context and fixed "
                        "tokens); %d so far", cut, len(rows), self.text_budget, self.embedder.max_length,
                        self.embedder.max_length - self.text_budget, self.truncated_count)
        length = max(len(r) for r in rows)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        left = getattr(tok, "padding_side", "right") == "left"
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        slot = torch.full((len(rows), length), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            start = length - len(row) if left else 0
            span = slice(start, start + len(row))
            row_t = torch.tensor(row)
            is_ctx = row_t == CONTEXT
            ids[b, span] = torch.where(is_ctx, torch.full_like(row_t, pad_id), row_t)
            slot[b, span] = torch.where(is_ctx, torch.cumsum(is_ctx.long(), 0) - 1, torch.full_like(row_t, -1))
            mask[b, span] = 1
        device = self.ctx.device
        ids, slot, mask = ids.to(device), slot.to(device), mask.to(device)
        word = self.embedder.input_embeddings()(ids)
        if self.n_ctx == 0:
            return word, mask, slot
        ctx = self.ctx.to(word.dtype)
        if self.class_specific:
            per_row = ctx[class_index.to(device)]  # (B, M, D)
        else:
            per_row = ctx.unsqueeze(0).expand(len(rows), -1, -1)
        gathered = torch.gather(per_row, 1, slot.clamp_min(0).unsqueeze(-1).expand(-1, -1, word.shape[-1]))
        embeds = torch.where((slot >= 0).unsqueeze(-1), gathered, word)
        return embeds, mask, slot

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many of `texts` exceed the token budget left beside the context; counts only."""
        ids = self.embedder.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return sum(len(seq) > self.text_budget for seq in ids)

    def forward(self, texts: Sequence[str], class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled embedder features (B, dim) of the prompted texts; gradients reach the context."""
        embeds, mask, _ = self.build(texts, class_index)
        return self.embedder.forward_embeds(embeds, mask).float()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], class_index: Optional[torch.Tensor] = None,
               batch_size: int = 64) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embedder.dim)
        parts = []
        for start in range(0, len(texts), batch_size):
            index = None if class_index is None else torch.as_tensor(class_index)[start:start + batch_size]
            parts.append(self(texts[start:start + batch_size], index).cpu())
        return torch.cat(parts)

    # ------------------------------------------------------------------ save / load
    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx.detach().cpu().contiguous()}

    def describe(self) -> dict[str, str]:
        """safetensors metadata (strings) needed to rebuild the learner."""
        return {"prompt_position": self.position, "prompt_class_specific": json.dumps(self.class_specific),
                "prompt_class_names": json.dumps(self.class_names, ensure_ascii=False),
                "prompt_role": self.role, "prompt_embedder": self.embedder.fingerprint()}

    @classmethod
    def from_state(cls, embedder: TextEmbedder, state: dict[str, torch.Tensor], metadata: dict,
                   where: str = "") -> "PromptLearner":
        if embedder is None:
            raise RuntimeError(f"{where}: holds a prompt context but the model has no embedder")
        if "ctx" not in state:
            raise KeyError(f"{where}: prompt entries without prompt.ctx")
        ctx = state["ctx"]
        width = embedder.input_embeddings().weight.shape[1]
        if ctx.shape[-1] != width:
            raise ValueError(f"{where}: prompt context width {ctx.shape[-1]} does not match the embedder's "
                             f"input embeddings ({width})")
        expected = metadata.get("prompt_embedder")
        if expected and expected != embedder.fingerprint():
            log.warning("%s: prompt context was learned with embedder %s, loading into %s", where, expected,
                        embedder.fingerprint())
        learner = cls(embedder, n_ctx=ctx.shape[-2], position=metadata.get("prompt_position", "end"),
                      class_specific=json.loads(metadata.get("prompt_class_specific", "false")),
                      class_names=json.loads(metadata.get("prompt_class_names", "[]")),
                      role=metadata.get("prompt_role"))
        with torch.no_grad():
            learner.ctx.copy_(ctx)
        return learner
