"""Stage drivers shared by the CLI and the launch scripts in stages/.

Each run writes into `output_dir`: config.yaml, metrics.jsonl, tensorboard/, per-stage
checkpoints/, the stage's model file `<stage>.safetensors` and results.md.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from . import engine
from .config import OptimConfig, RunConfig, TrainConfig
from .data.cache import EmbeddingCache
from .models.proclip import ProCLIP
from .models.towers import context_length, count_truncated, encode_clip_text, module_fingerprint

log = logging.getLogger(__name__)


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")


def llm_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "llm", model.embedder.fingerprint())


def teacher_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "clip", module_fingerprint(model.clip))


def cache_languages(cfg: RunConfig) -> list[tuple[list[str], Optional[list[str]]]]:
    """(shards, languages) to encode: the training shards in the training languages, the eval
    shards in `data.eval_languages` (plus the training ones; empty: every language)."""
    train = list(cfg.data.train_shards)
    evals = [s for s in cfg.data.eval_shards if s not in train]
    eval_langs = sorted(set(cfg.data.eval_languages) | set(cfg.data.train_languages)) if cfg.data.eval_languages else None
    return [(shards, langs) for shards, langs in ((train, list(cfg.data.train_languages)), (evals, eval_langs)) if shards]


def build_caches(cfg: RunConfig, model: ProCLIP, teacher: bool = True, progress: bool = True) -> dict:
    """Encode the captions once with the LLM embedder and (optionally) the CLIP text teacher."""
    bs = cfg.embedder.batch_size
    stats: dict = {"llm": Counter(), "clip": Counter()}
    ctx, tok = context_length(model.clip), model.clip_tokenizer
    model.clip.eval()
    for shards, languages in cache_languages(cfg):
        stats["llm"].update(llm_cache(cfg, model).build(
            shards, lambda texts: model.embedder.encode(texts, batch_size=bs, progress=False), languages,
            progress=progress))
        if teacher:
            stats["clip"].update(teacher_cache(cfg, model).build(
                shards, lambda texts: encode_clip_text(model.clip, tok, texts), languages,
                extra=lambda texts: {"truncated": count_truncated(tok, texts, ctx)}, progress=progress))
    stats = {k: dict(v) for k, v in stats.items() if v}
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
    for reason, n in extra["skips"].items():
        log.warning("stage1: skipped %d training samples: %s", n, reason)
    summary = {"stage": "stage1", "train_captions": len(llm), "teacher_truncated": extra.get("truncated", 0),
               "shard_samples": extra["shard_samples"], **{f"skipped_{k}": v for k, v in extra["skips"].items()},
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
        build_caches(cfg, model, teacher=False, progress=progress)
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
        print("stage2: held-out retrieval, before -> after")
        for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
            cells = ", ".join(f"R@{k} {before[f'{direction}_R@{k}']:.3f} -> {after[f'{direction}_R@{k}']:.3f}"
                              for k in (1, 5, 10))
            print(f"  {label}: {cells}")
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


def coop_train_config(cfg: RunConfig, n_train: int) -> TrainConfig:
    """CoOp's epoch-based schedule as engine steps: SGD, cosine, `warmup_epochs` of warm-up."""
    per_epoch = max(1, -(-n_train // cfg.coop.batch_size))
    c = cfg.coop
    return TrainConfig(steps=c.epochs * per_epoch, batch_size=c.batch_size, log_every=c.log_every,
                       checkpoint_every=per_epoch,
                       optim=OptimConfig(optimizer="sgd", lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                         warmup_steps=c.warmup_epochs * per_epoch, schedule="cosine"))


@torch.no_grad()
def encode_images(model: ProCLIP, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    device = next(model.clip.parameters()).device
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def run_coop(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True) -> dict:
    """Few-shot CoOp head on the (stage-2) model; per-language accuracy hand-written vs learned."""
    from .data.classes import read_labelled
    from .eval.report import coop_report, coop_table
    from .eval.zeroshot import accuracy_handwritten_vs_learned
    from .models.prompt import PromptLearner
    from .tasks import CoopTask
    c = cfg.coop
    engine.seed_everything(cfg.seed)
    model = model or ProCLIP.from_config(cfg)
    train_set = read_labelled(c.train_shards or cfg.data.train_shards, model.preprocess_eval, c.shots, cfg.seed)
    eval_set = read_labelled(c.eval_shards or cfg.data.eval_shards, model.preprocess_eval,
                             max_samples=cfg.data.max_eval_samples)
    names = [[n for lang in c.train_languages for n in train_set.names[k].get(lang, [])]
             for k in range(len(train_set.classes))]
    usable = torch.tensor([bool(n) for n in names])
    if not usable.any():
        raise ValueError(f"coop.train_languages={c.train_languages}: no training class has a name in them")
    if not usable.all():
        log.warning("coop: %d of %d training classes have no name in %s and are left out",
                    int((~usable).sum()), len(names), c.train_languages)
    keep_rows = usable[train_set.labels]
    train_feats = encode_images(model, train_set.images[keep_rows])
    eval_feats = encode_images(model, eval_set.images)
    print(f"coop: {len(train_set.classes)} classes, {int(keep_rows.sum())} training images "
          f"(<= {c.shots} shots each); eval {len(eval_set.classes)} classes, {len(eval_set.labels)} images")

    p = c.prompt
    model.prompt = PromptLearner(model.embedder, p.n_ctx, p.position, p.class_specific, train_set.classes,
                                 p.init_phrase)
    class_index_of = None
    if p.class_specific:
        train_index = {cls: i for i, cls in enumerate(train_set.classes)}
        missing = [cls for cls in eval_set.classes if cls not in train_index]
        if missing:
            raise ValueError(f"coop.prompt.class_specific: eval class {missing[0]!r} has no learned context "
                             "(class-specific context only covers the training classes)")
        lookup = torch.tensor([train_index[cls] for cls in eval_set.classes])
        class_index_of = lambda index: lookup[index]  # noqa: E731
    languages = c.eval_languages or None
    embedder_sum = module_fingerprint(model.embedder)
    logit_scale = model.clip.logit_scale.exp().item()
    task = CoopTask(model.prompt, model.adapter, train_feats, train_set.labels[keep_rows], names, logit_scale, cfg)
    train_cfg = coop_train_config(cfg, len(train_feats))
    last = engine.train(task, cfg, train_cfg, cfg.output_dir, resume=resume, progress=progress)
    model.eval()
    after = accuracy_handwritten_vs_learned(eval_feats, eval_set, model, c.templates, languages,
                                            class_index_of=class_index_of)
    out = Path(cfg.output_dir)
    if _is_main():
        model.save(out / "coop.safetensors", {"stage": "coop"})
        coop_report(after, out / "coop_results.md", out / "coop_accuracy.png")
    if module_fingerprint(model.embedder) != embedder_sum:
        raise RuntimeError("coop: the frozen embedder's weights changed during training")
    summary = {"stage": "coop", **last, "rows": after, "truncated_prompts": model.prompt.truncated_count,
               "embedder_checksum": embedder_sum}
    print(coop_table(after))
    _append_summary(cfg, summary)
    return summary


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
