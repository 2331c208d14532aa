"""The composed model: CLIP image tower (+ its text tower as teacher/baseline), the frozen
LLM embedder, the MLP adapter and an optional learned prompt context.

Model files are safetensors with `clip.`, `adapter.` and `prompt.` entries. The embedder's weights
are not stored (it is frozen); the file's metadata carries the model's own config (CLIP
architecture, embedder source and name, adapter shape, image size), with local paths relative to
the file, so `ProCLIP.from_file` rebuilds the model from the file alone, from any directory.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import RunConfig, config_from_dict
from ..errors import ProalignError
from ..storage import check_safetensors_file, save_tensors
from .adapter import MLPAdapter
from .embedder import TextEmbedder
from .towers import context_length, count_truncated, create_clip, encode_clip_text

log = logging.getLogger(__name__)


# safetensors metadata keys of a model file
CONFIG_KEY = "proalign_config"            # JSON: the config sections that define the model
LOCAL_PATHS_KEY = "proalign_local_paths"  # JSON: dotted fields stored relative to the file
# Config fields that may name a local file or directory (hub names and `pkg:` names stay as they are).
_PATH_FIELDS = ("embedder.name", "embedder.tokenizer")
# Fields a model file may not set, whatever its metadata says: they would let a downloaded file run
# code, size what gets built, or name a place on the loading machine to write (conversion caches).
# Only the user's own run config may set them.
_RUN_CONFIG_ONLY = ("embedder.trust_remote_code", "embedder.max_build_gb", "embedder.cache_dir")
# What the embedder computed when the adapter was trained (TextEmbedder.probe).
EMBEDDER_PROBE_KEY = "embedder_probe"
# Model-file metadata that travels with the weights when a loaded model is saved again.
KEPT_METADATA = ("stage", "training")


def clip_embed_dim(clip: nn.Module) -> int:
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if proj is not None:
        return proj.shape[-1]
    return clip.visual.output_dim


def model_config_sections(cfg: RunConfig, file_dir: Path) -> tuple[dict, list[str]]:
    """The config sections that define a model, ready to store in its file: CLIP weights travel
    in the file (so no `pretrained`/`checkpoint`), local paths become relative to `file_dir`."""
    import dataclasses
    embedder = {k: v for k, v in dataclasses.asdict(cfg.embedder).items()
                if f"embedder.{k}" not in _RUN_CONFIG_ONLY}
    sections = {"clip": {"model": cfg.clip.model, "arch": cfg.clip.arch}, "embedder": embedder,
                "adapter": dataclasses.asdict(cfg.adapter), "data": {"image_size": cfg.data.image_size},
                "hub": dataclasses.asdict(cfg.hub)}
    local = []
    for dotted in _PATH_FIELDS:
        section, field = dotted.split(".")
        value = sections[section].get(field)
        if value and not value.startswith("pkg:") and Path(value).exists():
            sections[section][field] = os.path.relpath(Path(value).resolve(), file_dir.resolve())
            local.append(dotted)
    return sections, local


def read_model_config(path: Path) -> RunConfig:
    """The config stored in a proalign model file, local paths resolved against the file's folder."""
    check_safetensors_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if CONFIG_KEY not in metadata:
        raise ProalignError(f"{path}: no '{CONFIG_KEY}' metadata (a file from an older proalign, or not a "
                            "proalign model file); load it with ProCLIP.from_config(load_config(<run>/config.yaml))"
                            ".load(path), or re-export it by re-running its stage")
    try:
        sections = json.loads(metadata[CONFIG_KEY])
        local = json.loads(metadata.get(LOCAL_PATHS_KEY, "[]"))
    except json.JSONDecodeError as err:
        raise ProalignError(f"{path}: metadata '{CONFIG_KEY}' is not valid JSON ({err})") from None
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ProalignError(f"{path}: metadata '{CONFIG_KEY}' is not a mapping of config sections")
    if not isinstance(local, list) or any(d not in _PATH_FIELDS + _RUN_CONFIG_ONLY for d in local):
        raise ProalignError(f"{path}: metadata '{LOCAL_PATHS_KEY}' must list fields among "
                            f"{', '.join(_PATH_FIELDS)}; it holds {str(local)[:200]}")
    for dotted in _RUN_CONFIG_ONLY:
        section, field = dotted.split(".")
        if isinstance(sections.get(section), dict) and sections[section].pop(field, None) is not None:
            log.warning("%s: its stored config sets %s; ignored (a model file never runs code or names a "
                        "place to write: set it in your own run config)", path, dotted)
    for dotted in local:
        if dotted in _RUN_CONFIG_ONLY:
            continue
        section, field = dotted.split(".")
        value = sections.get(section, {}).get(field)
        if not isinstance(value, str):
            raise ProalignError(f"{path}: {dotted} is listed as a local path but is {str(value)[:80]!r}")
        sections[section][field] = str((path.parent / value).resolve())
    from ..config import ConfigError
    try:
        return config_from_dict(sections)
    except ConfigError as err:
        raise ConfigError(f"{path} (stored config): {err}") from None


def _tqdm(iterable, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, disable=not enabled, unit=unit)


class ProCLIP(nn.Module, ModelHubMixin, library_name="proalign", paper_url="https://arxiv.org/abs/2510.18795",
              pipeline_tag="zero-shot-image-classification", tags=["clip", "multilingual", "long-context"]):
    """`save_pretrained` / `push_to_hub` / `from_pretrained` come from huggingface_hub's mixin and
    write or read a hub folder (proalign/models/hub.py): the model file, its config, a model card."""

    def __init__(self, clip: nn.Module, clip_tokenizer, embedder: Optional[TextEmbedder],
                 adapter: Optional[nn.Module], prompt: Optional[nn.Module] = None, preprocess_train=None,
                 preprocess_eval=None, run_config: Optional[RunConfig] = None):
        super().__init__()
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer
        self.embedder = embedder
        self.adapter = adapter
        self.prompt = prompt
        self.preprocess_train = preprocess_train
        self.preprocess_eval = preprocess_eval
        self.config = run_config  # what `save` writes into the model file
        self.file_metadata: dict[str, str] = {}  # KEPT_METADATA of the file this model was loaded from

    @classmethod
    def from_config(cls, cfg: RunConfig, embedder: Optional[TextEmbedder] = None, load_embedder: bool = True,
                    weights_follow: bool = False) -> "ProCLIP":
        """Build the configured model; `load_embedder=False` builds the CLIP alone (no embedder, no
        adapter: the teacher). `weights_follow`: the caller loads trained weights right after."""
        clip, pre_train, pre_eval, tokenizer = create_clip(cfg.clip, cfg.data.image_size,
                                                           weights_follow=weights_follow or bool(cfg.init_from))
        if embedder is None and load_embedder:
            embedder = TextEmbedder.from_config(cfg.embedder)  # on an RNG of its own
        adapter = None
        if embedder is not None:
            adapter = MLPAdapter(embedder.dim, clip_embed_dim(clip), cfg.adapter.num_blocks, cfg.adapter.expansion,
                                 cfg.adapter.dropout)
        model = cls(clip, tokenizer, embedder, adapter, None, pre_train, pre_eval, cfg)
        if cfg.init_from:
            model.load(cfg.init_from)
        return model

    @classmethod
    def from_file(cls, path: str | Path, embedder: Optional[TextEmbedder] = None,
                  allow_embedder_mismatch: bool = False) -> "ProCLIP":
        """Rebuild a model from its file alone (config from the file's metadata, then its weights).
        The embedder built must be the one the adapter was trained on (see `load`)."""
        path = Path(path)
        if not path.is_file():
            raise ProalignError(f"model file {path} does not exist")
        if path.suffix != ".safetensors":
            raise ProalignError(f"{path}: proalign model files are .safetensors")
        cfg = read_model_config(path)
        with safe_open(str(path), "pt") as handle:
            has_adapter = any(k.startswith("adapter.") for k in handle.keys())
        from ..config import ConfigError
        try:
            model = cls.from_config(cfg, embedder=embedder, load_embedder=has_adapter, weights_follow=True)
        except ConfigError as err:  # a field of the file's stored config: name the file too
            raise ConfigError(f"{path} (stored config): {err}") from None
        return model.load(path, allow_embedder_mismatch)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def _require_text_tower(self) -> None:
        if self.embedder is None or self.adapter is None:
            raise ProalignError("this model has no LLM text tower (a teacher CLIP file, or built with "
                                "load_embedder=False); load a stage1, stage2 or coop model file")

    # ------------------------------------------------------------------ inference API
    def tokenize(self, texts: Union[str, Sequence[str]]):
        """The embedder's tokenizer with the role prefix and counted truncation (input_ids +
        attention_mask); `encode_text` accepts what this returns."""
        self._require_text_tower()
        return self.embedder.tokenize([texts] if isinstance(texts, str) else list(texts))

    def image_tensor(self, item) -> torch.Tensor:
        """One image (path, PIL image or preprocessed tensor) as a preprocessed tensor."""
        from PIL import Image, UnidentifiedImageError
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, (str, os.PathLike)):
            from ..data.images import open_rgb
            try:
                item = open_rgb(item)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise ProalignError(f"{item}: not a readable image ({err})") from None
        if not isinstance(item, Image.Image):
            raise TypeError(f"encode_image takes PIL images, paths or tensors, got {type(item).__name__}")
        if self.preprocess_eval is None:
            raise RuntimeError("this model has no image preprocessing; pass preprocessed tensors")
        return self.preprocess_eval(item.convert("RGB"))

    def encode_image(self, images, batch_size: int = 64, show_progress_bar: bool = False,
                     convert_to_numpy: bool = False, normalize: bool = True):
        """Image embeddings (B, d) of PIL images, image paths or preprocessed tensors ((3, H, W),
        a list of them, or a (B, 3, H, W) batch); one image gives a (d,) vector."""
        from PIL import Image
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, torch.Tensor) and images.dim() == 3)
        items = [images] if single else images
        batches = range(0, len(items), batch_size)
        with torch.inference_mode():
            outs = []
            for start in _tqdm(batches, "images", show_progress_bar, "batch"):
                chunk = items[start:start + batch_size]
                batch = chunk if isinstance(chunk, torch.Tensor) else torch.stack(
                    [self.image_tensor(item) for item in chunk])
                outs.append(self.clip.encode_image(batch.to(self.device)).float())
            out = torch.cat(outs) if outs else torch.empty(0, clip_embed_dim(self.clip), device=self.device)
            if normalize:
                out = F.normalize(out, dim=-1)
        return _output(out, single, convert_to_numpy)

    def encode_llm_features(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Adapter on (cached) embedder features; differentiable (used by training and eval)."""
        out = self.adapter(feats)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts, prompt: bool = False, class_index: Optional[torch.Tensor] = None,
                    batch_size: int = 64, show_progress_bar: bool = False, convert_to_numpy: bool = False,
                    normalize: bool = True):
        """Text embeddings (B, d) through the LLM embedder (+ the learned CoOp context when `prompt`)
        and the adapter. `texts`: a string, a list of strings, or what `tokenize` returns. A
        class-specific context also needs each text's `class_index`. One string gives a (d,) vector."""
        self._require_text_tower()
        single = isinstance(texts, str)
        with torch.inference_mode():
            if isinstance(texts, Mapping):
                if prompt:
                    raise ValueError("prompt=True takes strings (the context is spliced in around the text)")
                feats = self.embedder(texts["input_ids"].to(self.embedder.device),
                                      texts["attention_mask"].to(self.embedder.device))
            elif prompt:
                if self.prompt is None:
                    raise ProalignError("prompt=True but no prompt context is loaded (train one with `proalign coop`)")
                feats = self.prompt.encode([texts] if single else list(texts), class_index, batch_size)
            else:
                feats = self.embedder.encode([texts] if single else list(texts), batch_size=batch_size,
                                             progress=show_progress_bar)
            out = self.encode_llm_features(feats.to(self.device), normalize)
        return _output(out, single, convert_to_numpy)

    @torch.no_grad()
    def encode_text_clip(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Baseline: the original CLIP text tower (truncates at its context length)."""
        out = encode_clip_text(self.clip, self.clip_tokenizer, texts, device=self.device)
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
        if self.adapter is not None:
            out.update({f"adapter.{k}": v for k, v in self.adapter.state_dict().items()})
        if self.prompt is not None:
            out.update({f"prompt.{k}": v for k, v in self.prompt.learnable_state_dict().items()})
        return out

    def stored_config(self, file_dir: Path) -> dict:
        """The config sections a model file in `file_dir` carries (local paths relative to it)."""
        return model_config_sections(self.config, file_dir)[0]

    def save(self, path: str | Path, metadata: Optional[dict] = None) -> None:
        """A self-contained model file: the weights plus the config that rebuilds the model."""
        path = Path(path)
        meta = {**self.file_metadata, **(metadata or {})}
        if self.config is not None:
            sections, local = model_config_sections(self.config, path.parent)
            meta[CONFIG_KEY] = json.dumps(sections, sort_keys=True, ensure_ascii=False)
            meta[LOCAL_PATHS_KEY] = json.dumps(local)
        if self.embedder is not None:
            meta["embedder"] = self.embedder.fingerprint()
            meta[EMBEDDER_PROBE_KEY] = json.dumps(self.embedder.probe())
        if self.prompt is not None:
            meta.update(self.prompt.describe())
        save_tensors(self.weights(), path, meta)
        # The model now is that file: a later stage on the same object extends its history.
        self.file_metadata = {k: meta[k] for k in KEPT_METADATA if k in meta}

    def load(self, path: str | Path, allow_embedder_mismatch: bool = False) -> "ProCLIP":
        """Load whichever parts (clip, adapter, prompt) the file holds. An adapter trained on another
        embedder than this model's is refused (`allow_embedder_mismatch=True`: loaded, with a warning)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: proalign model files are .safetensors")
        check_safetensors_file(path)
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if self.embedder is not None and any(k.startswith("adapter.") for k in state):
            self._check_embedder(path, metadata.get(EMBEDDER_PROBE_KEY), allow_embedder_mismatch)
        self.file_metadata = {k: metadata[k] for k in KEPT_METADATA if k in metadata}
        parts = {"clip": self.clip, "adapter": self.adapter}
        for prefix, module in parts.items():
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if sub:
                if module is None:
                    raise ProalignError(f"{path}: holds {prefix} weights but this model has no {prefix}")
                try:
                    module.load_state_dict(sub, strict=True)
                except RuntimeError as err:
                    raise RuntimeError(f"{path}: the {prefix} weights do not fit this config: {err}") from err
        prompt_state = {k[len("prompt."):]: v for k, v in state.items() if k.startswith("prompt.")}
        if prompt_state:
            from .prompt import PromptLearner
            self.prompt = PromptLearner.from_state(self.embedder, prompt_state, metadata, str(path))
        return self

    def _check_embedder(self, path: Path, recorded: Optional[str], allow: bool) -> None:
        from .embedder import same_embedder
        if recorded is None:
            log.info("%s records no embedder probe (an older file): not checked", path)
            return
        try:
            probe = json.loads(recorded)
        except json.JSONDecodeError:
            probe = None
        if isinstance(probe, list) and same_embedder(probe, self.embedder.probe()):
            return
        message = (f"{path}: its adapter was trained on another embedder than the one built here from "
                   f"{self.embedder.identity!r} (other weights, architecture, tokenizer, pooling or prefix: their "
                   "embeddings of fixed probe texts differ). Its text embeddings would be silently wrong")
        if not allow:
            raise ProalignError(message + "; load the embedder it names, or pass allow_embedder_mismatch=True")
        log.warning("%s (allow_embedder_mismatch=True)", message)

    # ------------------------------------------------------------------ Hugging Face hub (ModelHubMixin)
    def save_pretrained(self, save_directory: str | Path, *, results: Optional[str | Path] = None,
                        push_to_hub: bool = False, repo_id: Optional[str] = None, **push_kwargs) -> Optional[str]:
        """A Hugging Face model folder (proalign/models/hub.py): `model.safetensors` (this model
        file), `config.json` (the config it carries), `README.md` (a model card; with `results`, a
        markdown eval table, also kept as `results.md`), and the files that make the folder a
        sentence-transformers model. `push_to_hub=True` then uploads it to `repo_id`."""
        from .hub import write_hub_folder
        write_hub_folder(self, Path(save_directory), results)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, results=results, **push_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        self.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *, results: Optional[str | Path] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, commit_message: str = "Upload proalign model",
                    **upload_kwargs) -> str:
        """`save_pretrained` into a temporary folder, then one commit to the hub model repo `repo_id`
        (created if missing); returns the commit's URL."""
        from .hub import push_folder
        return push_folder(self, repo_id, results, private=private, token=token, commit_message=commit_message,
                           **upload_kwargs)

    def generate_model_card(self, *args, **kwargs):
        from .hub import model_card
        return model_card(self, results=kwargs.get("results"))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str] = None, cache_dir=None,
                         force_download: bool = False, local_files_only: bool = False, token=None,
                         **model_kwargs) -> "ProCLIP":
        """`ProCLIP.from_pretrained(repo id or folder)`: the folder's model file (config keys that
        huggingface_hub passes on as keyword arguments are already in the file)."""
        from .hub import HUB_MODEL_FILE, hub_folder
        folder = Path(model_id) if Path(model_id).is_dir() else hub_folder(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token)
        return cls.from_file(folder / HUB_MODEL_FILE).eval()


def _output(out: torch.Tensor, single: bool, convert_to_numpy: bool):
    # Cloned outside inference mode: callers may use the result in autograd or in-place ops.
    out = out.clone()
    out = out[0] if single else out
    return out.cpu().numpy() if convert_to_numpy else out
