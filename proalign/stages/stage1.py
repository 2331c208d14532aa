"""Stage 1 (distill): the frozen LLM embedder + a trainable MLP adapter learn CLIP's text
embeddings from cached features (instance + structure loss). Writes `stage1.safetensors`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import engine
from ..config import RunConfig, Stage1Config
from ..data.samplers import EpochSampler
from ..engine import StageTask
from ..losses import Objective
from ..models.proclip import ProCLIP
from ..models.towers import context_length
from .cache import build_caches, paired_features
from .common import append_summary

log = logging.getLogger(__name__)


class Stage1Task(StageTask):
    """Distil the CLIP text teacher into adapter(LLM(text)), from cached features."""

    name = "stage1"

    def __init__(self, adapter: nn.Module, llm_feats: torch.Tensor, teacher_feats: torch.Tensor,
                 stage1: Stage1Config, seed: int):
        super().__init__()
        if len(llm_feats) != len(teacher_feats) or len(llm_feats) == 0:
            raise ValueError(f"stage1: need matching, non-empty features (got {len(llm_feats)} LLM rows, "
                             f"{len(teacher_feats)} teacher rows)")
        self.train_cfg = stage1.train
        self.adapter = adapter
        self.register_buffer("llm_feats", llm_feats.float(), persistent=False)
        self.register_buffer("teacher_feats", teacher_feats.float(), persistent=False)
        self.objective = Objective({"instance": stage1.w_instance, "structure": stage1.w_structure},
                                   stage1.reduction, where="stage1")
        self.sampler = EpochSampler(len(llm_feats), self.train_cfg.batch_size, seed)

    def next_batch(self) -> dict:
        return {"index": self.sampler.next()}

    def forward(self, batch: dict):
        idx = batch["index"].to(self.llm_feats.device)
        return self.objective({"student": self.adapter(self.llm_feats[idx]), "teacher": self.teacher_feats[idx]})

    def data_state(self) -> dict:
        return {"position": self.sampler.position}

    def load_data_state(self, state: dict) -> None:
        self.sampler.position = int(state.get("position", 0))


@torch.no_grad()
def heldout_cosine(adapter: nn.Module, llm_feats: torch.Tensor, teacher_feats: torch.Tensor) -> float:
    """Mean cosine between distilled text embeddings and the teacher's."""
    if len(llm_feats) == 0:
        return float("nan")
    was = adapter.training
    adapter.eval()
    student = adapter(llm_feats.to(next(adapter.parameters()).device)).cpu()
    adapter.train(was)
    return F.cosine_similarity(student, teacher_feats, dim=-1).mean().item()


def run_stage1(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True) -> dict:
    """Build the caches, distil, report the held-out cosine before/after, export the model file."""
    torch.manual_seed(cfg.seed)
    model = model or ProCLIP.from_config(cfg)
    build_caches(cfg, model, progress=progress)
    llm, teacher, extra = paired_features(cfg, model, cfg.data.train_shards, cfg.data.train_languages)
    log.info("stage1: %d training captions; CLIP teacher truncated %d of them at %d tokens",
             len(llm), extra.get("truncated", 0), context_length(model.clip))
    eval_llm = eval_teacher = torch.empty(0)
    if cfg.data.eval_shards:
        eval_llm, eval_teacher, _ = paired_features(cfg, model, cfg.data.eval_shards, cfg.data.train_languages)
    before = heldout_cosine(model.adapter, eval_llm, eval_teacher)
    engine.seed_everything(cfg.seed)
    task = Stage1Task(model.adapter, llm, teacher, cfg.stage1, cfg.seed)
    last = engine.train(task, cfg, cfg.output_dir, resume=resume, progress=progress)
    after = heldout_cosine(model.adapter, eval_llm, eval_teacher)
    model.save(Path(cfg.output_dir) / "stage1.safetensors", {"stage": "stage1"})
    for reason, n in extra["skips"].items():
        log.warning("stage1: skipped %d training samples: %s", n, reason)
    summary = {"stage": "stage1", "train_captions": len(llm), "teacher_truncated": extra.get("truncated", 0),
               "shard_samples": extra["shard_samples"], **{f"skipped_{k}": v for k, v in extra["skips"].items()},
               "heldout_cosine_before": before, "heldout_cosine_after": after, **last}
    append_summary(cfg, summary)
    print(f"stage1: held-out cosine to the CLIP teacher {before:.4f} -> {after:.4f} "
          f"({len(eval_llm)} captions); teacher truncated {extra.get('truncated', 0)} training captions")
    return summary
