"""CLIP towers from open_clip: a registered name + `pretrained` tag/path, or an inline architecture."""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..config import ClipConfig, ConfigError

log = logging.getLogger(__name__)


def _register_arch(name: str, arch: dict) -> None:
    import open_clip
    registered = open_clip.factory._MODEL_CONFIGS.get(name)
    if registered == arch:
        return
    folder = Path(tempfile.mkdtemp(prefix="proalign_clip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder / f"{name}.json")


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever `pretrained`
    is unset, also when proalign loads the weights right after: that notice is wrong then."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_clip(cfg: ClipConfig, image_size: int | None = None, weights_follow: bool = False):
    """Return (model, preprocess_train, preprocess_eval, tokenizer) for the configured CLIP.
    `weights_follow`: the caller loads trained weights next (open_clip's random-init notice is dropped)."""
    import open_clip
    if cfg.arch is not None:
        _register_arch(cfg.model, cfg.arch)
    elif cfg.model not in open_clip.list_models() and not cfg.model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"clip.model: unknown open_clip model {cfg.model!r}; give clip.arch for a custom one")
    kwargs = {"force_image_size": image_size} if image_size else {}
    quiet = _DropRandomInitNotice() if (weights_follow or cfg.checkpoint) else None
    root = logging.getLogger()
    if quiet:
        root.addFilter(quiet)
    try:
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            cfg.model, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(f"clip.pretrained: could not load {cfg.pretrained!r} for {cfg.model}: {err}") from err
    finally:
        if quiet:
            root.removeFilter(quiet)
    if cfg.checkpoint:
        from ..storage import load_module_weights
        load_module_weights(model, cfg.checkpoint, prefix="clip.")
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return model, preprocess_train, preprocess_eval, tokenizer


def context_length(model) -> int:
    return int(getattr(model, "context_length", 77))


def count_truncated(tokenizer, texts: Sequence[str], ctx_len: int) -> int:
    """Captions longer than the CLIP text tower's context (start/end tokens included)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:  # HF-backed tokenizers
        encode = getattr(getattr(tokenizer, "tokenizer", None), "encode", None)
    if encode is None:
        return 0
    return sum(len(encode(t)) + 2 > ctx_len for t in texts)


def module_fingerprint(module: torch.nn.Module) -> str:
    """Content hash of a module's weights (identifies a CLIP teacher for the embedding cache)."""
    return state_fingerprint(module.state_dict())


def state_fingerprint(state: dict) -> str:
    """Content hash of named tensors."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_clip_text(model, tokenizer, texts: Sequence[str], batch_size: int = 256, device="cpu") -> torch.Tensor:
    outs = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        outs.append(model.encode_text(tokens).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0, model.text_projection.shape[-1] if hasattr(model, "text_projection") else 0)
