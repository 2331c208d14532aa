"""Stage 1 (distill): the frozen LLM embedder + a trainable MLP adapter learn CLIP's text
embeddings from cached features (instance + structure loss). Writes `stage1.safetensors`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from ..config import RunConfig, Stage1Config
from ..data.cache import paired_rows
from ..data.shards import expand_shards
from ..distributed import is_main
from ..models.proclip import ProCLIP
from ..models.towers import context_length
from .cache import build_caches, embedder_built, llm_cache, paired_stream, teacher_cache, training_model
from ..train import StageTask, seed_everything
from .common import (StreamBatches, append_summary, join_run, stage_metadata, train_stage, warn_if_batch_exceeds_data,
                     write_replica_checksum)

log = logging.getLogger(__name__)


class Stage1Task(StreamBatches, StageTask):
    """Distil the CLIP text teacher into adapter(LLM(text)), from cached features streamed shard
    by shard (each rank its own part of every epoch)."""

    name = "stage1"
    # with stage1.views, `student`/`teacher` are the first view's rows and the other views' rows
    # come as `student_views`/`teacher_views`
    provides = ("student", "teacher", "student_views", "teacher_views")

    def __init__(self, adapter: nn.Module, stream: IterableDataset, stage1: Stage1Config, num_workers: int = 0):
        super().__init__()
        self.train_cfg = stage1.train
        self.adapter = adapter
        self.objective = self.build_objective(stage1.losses, stage1.reduction, "stage1.losses", stage1.scope)
        self._use_stream(stream, self.train_cfg.batch_size, num_workers)

    def next_batch(self) -> dict:
        return self._next_stream_batch()

    def features(self, batch: dict) -> dict:
        device = next(self.adapter.parameters()).device
        llm, teacher = batch["llm"].to(device), batch["teacher"].to(device)
        if llm.dim() == 2:
            return {"student": self.adapter(llm), "teacher": teacher}
        student = self.adapter(llm.flatten(0, 1)).unflatten(0, llm.shape[:2])  # (B, views, D)
        return {"student": student[:, 0], "teacher": teacher[:, 0],
                "student_views": student[:, 1:].flatten(0, 1), "teacher_views": teacher[:, 1:].flatten(0, 1)}

    def loss(self, features: dict):
        return self.objective(features)


@torch.no_grad()
def heldout_cosine(adapter: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """(mean cosine between distilled text embeddings and the teacher's, captions), over
    (LLM rows, teacher rows) chunks."""
    was = adapter.training
    adapter.eval()
    device = next(adapter.parameters()).device
    total, count = 0.0, 0
    for llm, teacher in pairs:
        if len(llm):
            student = adapter(llm.to(device)).cpu()
            total += F.cosine_similarity(student, teacher, dim=-1).double().sum().item()
            count += len(llm)
    adapter.train(was)
    return (total / count if count else float("nan")), count


def heldout_pairs(cfg: RunConfig, model: ProCLIP):
    """() -> the eval shards' cached (LLM, teacher) rows, one shard at a time."""
    llm, teacher = llm_cache(cfg, model), teacher_cache(cfg, model)
    return lambda: (paired_rows(llm, teacher, url, cfg.data.train_languages)
                    for url in expand_shards(cfg.data.eval_shards))


def run_stage1(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True,
               hooks=()) -> dict:
    """Build the caches (every rank its share), distil, report the held-out cosine before/after,
    export the model file."""
    rank, world = join_run(cfg)
    torch.manual_seed(cfg.seed)
    model = model or training_model(cfg)
    build_caches(cfg, model, progress=progress)
    extra = teacher_cache(cfg, model).summary(cfg.data.train_shards, cfg.data.train_languages)
    log.info("stage1: %d training captions; CLIP teacher truncated %d of them at %d tokens",
             extra["captions"], extra.get("truncated", 0), context_length(model.clip))
    train = cfg.stage1.train
    warn_if_batch_exceeds_data("stage1", "cached samples" if cfg.stage1.views else "cached captions",
                               sum(extra["shard_samples"].values()) if cfg.stage1.views else extra["captions"],
                               train.batch_size, train.accum_steps, world)
    heldout = heldout_pairs(cfg, model) if cfg.data.eval_shards else (lambda: iter(()))
    before, _ = heldout_cosine(model.adapter, heldout())
    seed_everything(cfg.seed)
    stream = paired_stream(cfg, model, cfg.data.train_shards, cfg.data.train_languages, cfg.seed)
    task = Stage1Task(model.adapter, stream, cfg.stage1, cfg.data.num_workers)
    last = train_stage(task, cfg, resume, progress, hooks)
    write_replica_checksum(cfg, task, rank)
    after, heldout_count = heldout_cosine(model.adapter, heldout())
    if is_main():
        model.save(Path(cfg.output_dir) / "stage1.safetensors", stage_metadata(cfg, model, "stage1"))
    for reason, n in extra["skips"].items():
        log.warning("stage1: skipped %d training samples: %s", n, reason)
    summary = {"stage": "stage1", "train_captions": extra["captions"], "teacher_truncated": extra.get("truncated", 0),
               "shard_samples": extra["shard_samples"], **{f"skipped_{k}": v for k, v in extra["skips"].items()},
               "heldout_cosine_before": before, "heldout_cosine_after": after, "embedder_built": embedder_built(model),
               **last}
    append_summary(cfg, summary)
    if rank == 0:
        print(f"stage1: held-out cosine to the CLIP teacher {before:.4f} -> {after:.4f} "
              f"({heldout_count} captions); teacher truncated {extra.get('truncated', 0)} training captions")
    return summary
