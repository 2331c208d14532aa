"""The composed model: CLIP image tower (+ its text tower as teacher/baseline), the frozen
LLM embedder, the MLP adapter and an optional learned prompt context.

Model files are safetensors with `clip.`, `adapter.` and `prompt.` entries; the embedder is
not stored (it is frozen and named by the config).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import RunConfig
from .adapter import MLPAdapter
from ..storage import save_tensors
from .embedder import TextEmbedder
from .towers import context_length, count_truncated, create_clip, encode_clip_text

log = logging.getLogger(__name__)


def clip_embed_dim(clip: nn.Module) -> int:
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if proj is not None:
        return proj.shape[-1]
    return clip.visual.output_dim


class ProCLIP(nn.Module):
    def __init__(self, clip: nn.Module, clip_tokenizer, embedder: Optional[TextEmbedder],
                 adapter: nn.Module, prompt: Optional[nn.Module] = None, preprocess_train=None,
                 preprocess_eval=None):
        super().__init__()
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer
        self.embedder = embedder
        self.adapter = adapter
        self.prompt = prompt
        self.preprocess_train = preprocess_train
        self.preprocess_eval = preprocess_eval

    @classmethod
    def from_config(cls, cfg: RunConfig, embedder: Optional[TextEmbedder] = None,
                    load_embedder: bool = True) -> "ProCLIP":
        clip, pre_train, pre_eval, tokenizer = create_clip(cfg.clip, cfg.data.image_size,
                                                           weights_follow=bool(cfg.init_from))
        if embedder is None and load_embedder:
            embedder = TextEmbedder.from_config(cfg.embedder)
        llm_dim = embedder.dim if embedder is not None else int(cfg.embedder.arch.get("hidden_size", 0)) if cfg.embedder.arch else 0
        adapter = MLPAdapter(llm_dim, clip_embed_dim(clip), cfg.adapter.num_blocks, cfg.adapter.expansion,
                             cfg.adapter.dropout)
        model = cls(clip, tokenizer, embedder, adapter, None, pre_train, pre_eval)
        if cfg.init_from:
            model.load(cfg.init_from)
        return model

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.clip.encode_image(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_llm_features(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.adapter(feats)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts: Sequence[str], prompt: bool = False, normalize: bool = True,
                    batch_size: int = 64, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Texts through the LLM embedder (+ the learned context when `prompt`) and the adapter.
        A class-specific context also needs each text's `class_index`."""
        if self.embedder is None:
            raise RuntimeError("this ProCLIP was built without its embedder")
        if prompt:
            if self.prompt is None:
                raise RuntimeError("prompt=True but no prompt context is loaded (train one with `proalign coop`)")
            feats = self.prompt.encode(texts, class_index, batch_size).to(self.adapter.proj.weight.device)
        else:
            feats = self.embedder.encode(texts, batch_size=batch_size).to(self.adapter.proj.weight.device)
        return self.encode_llm_features(feats, normalize)

    @torch.no_grad()
    def encode_text_clip(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Baseline: the original CLIP text tower (truncates at its context length)."""
        device = next(self.clip.parameters()).device
        out = encode_clip_text(self.clip, self.clip_tokenizer, texts, device=device)
        return F.normalize(out, dim=-1) if normalize else out

    def count_truncated(self, texts: Sequence[str], tower: str) -> int:
        """Captions the given text path cuts: `clip` (CLIP's context length), `llm` (the
        embedder's max_length) or `prompt` (max_length minus the learned context)."""
        if tower == "clip":
            return count_truncated(self.clip_tokenizer, texts, context_length(self.clip))
        if tower == "llm":
            return self.embedder.count_truncated(texts)
        if tower == "prompt":
            return self.prompt.count_truncated(texts)
        raise ValueError(f"unknown text tower {tower!r} (clip|llm|prompt)")

    # ------------------------------------------------------------------ save / load
    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"clip.{k}": v for k, v in self.clip.state_dict().items()}
        out.update({f"adapter.{k}": v for k, v in self.adapter.state_dict().items()})
        if self.prompt is not None:
            out.update({f"prompt.{k}": v for k, v in self.prompt.learnable_state_dict().items()})
        return out

    def save(self, path: str | Path, metadata: Optional[dict] = None) -> None:
        meta = dict(metadata or {})
        if self.embedder is not None:
            meta["embedder"] = self.embedder.fingerprint()
        if self.prompt is not None:
            meta.update(self.prompt.describe())
        save_tensors(self.weights(), path, meta)

    def load(self, path: str | Path) -> "ProCLIP":
        """Load whichever parts (clip, adapter, prompt) the file holds."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: proalign model files are .safetensors")
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        parts = {"clip": self.clip, "adapter": self.adapter}
        for prefix, module in parts.items():
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if sub:
                try:
                    module.load_state_dict(sub, strict=True)
                except RuntimeError as err:
                    raise RuntimeError(f"{path}: the {prefix} weights do not fit this config: {err}") from err
        prompt_state = {k[len("prompt."):]: v for k, v in state.items() if k.startswith("prompt.")}
        if prompt_state:
            from .prompt import PromptLearner
            self.prompt = PromptLearner.from_state(self.embedder, prompt_state, metadata, str(path))
        return self
