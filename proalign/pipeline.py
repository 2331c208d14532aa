"""Stage drivers shared by the CLI and the launch scripts in stages/.

Each run writes into `output_dir`: config.yaml, metrics.jsonl, tensorboard/, per-stage
checkpoints/, the stage's model file `<stage>.safetensors` and results.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from . import engine
from .config import RunConfig
from .data.cache import EmbeddingCache
from .data.shards import expand_shards
from .models.proclip import ProCLIP
from .models.towers import context_length, count_truncated, encode_clip_text, module_fingerprint

log = logging.getLogger(__name__)


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")


def _all_shards(cfg: RunConfig) -> list[str]:
    return expand_shards(list(cfg.data.train_shards) + list(cfg.data.eval_shards))


def llm_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "llm", model.embedder.fingerprint())


def teacher_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "clip", module_fingerprint(model.clip))


def build_caches(cfg: RunConfig, model: ProCLIP, teacher: bool = True, progress: bool = True) -> dict:
    """Encode all captions once with the LLM embedder and (optionally) the CLIP text teacher."""
    shards = _all_shards(cfg)
    bs = cfg.embedder.batch_size
    stats = {"llm": llm_cache(cfg, model).build(
        shards, lambda texts: model.embedder.encode(texts, batch_size=bs, progress=False), progress=progress)}
    if teacher:
        ctx, tok = context_length(model.clip), model.clip_tokenizer
        model.clip.eval()
        stats["clip"] = teacher_cache(cfg, model).build(
            shards, lambda texts: encode_clip_text(model.clip, tok, texts),
            extra=lambda texts: {"truncated": count_truncated(tok, texts, ctx)}, progress=progress)
    stats["embedder_truncated"] = model.embedder.truncated_count
    return stats


def _paired(cfg: RunConfig, model: ProCLIP, shards, languages):
    ids_l, llm, _ = llm_cache(cfg, model).load(shards, languages)
    ids_t, clip, extra = teacher_cache(cfg, model).load(shards, languages)
    if ids_l != ids_t:
        raise RuntimeError("LLM and CLIP caches disagree on caption ids; rebuild with `proalign cache`")
    return llm, clip, extra


def run_stage1(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True) -> dict:
    from .tasks import Stage1Task, heldout_cosine
    torch.manual_seed(cfg.seed)
    model = model or ProCLIP.from_config(cfg)
    build_caches(cfg, model, progress=progress)
    llm, teacher, extra = _paired(cfg, model, cfg.data.train_shards, cfg.data.train_languages)
    log.info("stage1: %d training captions; CLIP teacher truncated %d of them at %d tokens",
             len(llm), extra.get("truncated", 0), context_length(model.clip))
    eval_llm = eval_teacher = torch.empty(0)
    if cfg.data.eval_shards:
        eval_llm, eval_teacher, _ = _paired(cfg, model, cfg.data.eval_shards, cfg.data.train_languages)
    before = heldout_cosine(model.adapter, eval_llm, eval_teacher)
    engine.seed_everything(cfg.seed)
    task = Stage1Task(model.adapter, llm, teacher, cfg)
    last = engine.train(task, cfg, cfg.stage1.train, cfg.output_dir, resume=resume, progress=progress)
    after = heldout_cosine(model.adapter, eval_llm, eval_teacher)
    model.save(Path(cfg.output_dir) / "stage1.safetensors", {"stage": "stage1"})
    summary = {"stage": "stage1", "train_captions": len(llm), "teacher_truncated": extra.get("truncated", 0),
               "heldout_cosine_before": before, "heldout_cosine_after": after, **last}
    _append_summary(cfg, summary)
    print(f"stage1: held-out cosine to the CLIP teacher {before:.4f} -> {after:.4f} "
          f"({len(eval_llm)} captions); teacher truncated {extra.get('truncated', 0)} training captions")
    return summary


def _text_cache_dict(cfg: RunConfig, model: ProCLIP) -> dict[str, torch.Tensor]:
    ids, feats, _ = llm_cache(cfg, model).load(cfg.data.train_shards, cfg.data.train_languages)
    return dict(zip(ids, feats))


def run_stage2(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True) -> dict:
    import torch.distributed as dist
    from .tasks import Stage2Task
    rank, world = engine.init_distributed(engine.resolve_device(cfg.device), bool(cfg.deepspeed))
    torch.manual_seed(cfg.seed)
    model = model or ProCLIP.from_config(cfg)
    if rank == 0:  # one writer; the other ranks wait, then read
        llm_cache(cfg, model).build(_all_shards(cfg), lambda t: model.embedder.encode(t, batch_size=cfg.embedder.batch_size),
                                    progress=progress)
    if world > 1:
        dist.barrier()
    before = evaluate_heldout(cfg, model) if cfg.data.eval_shards and rank == 0 else {}
    engine.seed_everything(cfg.seed)
    task = Stage2Task(model, cfg, _text_cache_dict(cfg, model))
    if cfg.data.eval_shards:
        task.evaluator = lambda: evaluate_heldout(cfg, model)
    last = engine.train(task, cfg, cfg.stage2.train, cfg.output_dir, resume=resume, progress=progress)
    task.export_logit_scale(model.clip)
    _write_replica_checksum(cfg, task, rank)
    after = evaluate_heldout(cfg, model) if cfg.data.eval_shards and rank == 0 else {}
    if _is_main():
        model.save(Path(cfg.output_dir) / "stage2.safetensors", {"stage": "stage2"})
    summary = {"stage": "stage2", **last, **{f"before_{k}": v for k, v in before.items()},
               **{f"after_{k}": v for k, v in after.items()}}
    _append_summary(cfg, summary)
    if before:
        print(f"stage2: held-out image->text R@1 {before['i2t_R@1']:.3f} -> {after['i2t_R@1']:.3f}, "
              f"text->image R@1 {before['t2i_R@1']:.3f} -> {after['t2i_R@1']:.3f}")
    return summary


def run_teacher(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Pre-train the small English CLIP on the training shards (the demo's teacher)."""
    from .tasks import TeacherTask
    engine.seed_everything(cfg.seed)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    task = TeacherTask(model, cfg)
    last = engine.train(task, cfg, cfg.teacher.train, cfg.output_dir, resume=resume, progress=progress)
    task.export_logit_scale(model.clip)
    path = Path(cfg.output_dir) / "teacher.safetensors"
    if _is_main():
        from .models.checkpoint import save_tensors
        save_tensors({f"clip.{k}": v for k, v in model.clip.state_dict().items()}, path, {"stage": "teacher"})
    _append_summary(cfg, {"stage": "teacher", **last})
    return {"stage": "teacher", "path": str(path), **last}


@torch.no_grad()
def evaluate_heldout(cfg: RunConfig, model: ProCLIP) -> dict:
    """Image-text R@k on the eval shards with the training languages, through the adapter."""
    from .eval.benchmark import evaluate_retrieval
    model.eval()
    rows = evaluate_retrieval(model.encode_image, {"proclip": lambda texts, ids: model.encode_text(texts)},
                              cfg.data.eval_shards, model.preprocess_eval, cfg.data.train_languages,
                              cfg.data.max_eval_samples, "heldout")
    model.train()
    keys = [k for k in rows[0] if "R@" in k]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def _write_replica_checksum(cfg: RunConfig, task: torch.nn.Module, rank: int) -> None:
    """Each rank records a hash of its trained weights: replicas must agree after data-parallel training."""
    from .models.towers import module_fingerprint
    folder = Path(cfg.output_dir) / "replicas"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task.name}-rank{rank}.txt").write_text(module_fingerprint(task) + "\n")


def _is_main() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _append_summary(cfg: RunConfig, summary: dict) -> None:
    if not _is_main():
        return
    path = Path(cfg.output_dir) / "summary.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), **summary}, default=float) + "\n")
