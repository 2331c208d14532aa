#!/usr/bin/env python
"""Writes configs/paper/*.yaml: ProCLIP (arXiv 2510.18795) at ViT-B/16 and ViT-L/14 x the paper's
embedders x 3M / 15M / 30M image-text pairs, with the reference code's hyper-parameters
(VisionXLab/ProCLIP training/params.py: AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay
0.2, 10k warm-up steps, cosine, batch 64 per GPU, 32 epochs, bf16, ZeRO-1). Steps are the 32 epochs
at 64 GPUs (global batch 4096); change `train.steps` with the GPU count.

Run it again after changing a setting here; the configs are its output, kept in the repository so
that `proalign check` and a cluster job read the same file."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GPUS, PER_GPU, EPOCHS = 64, 64, 32
TOWERS = {"vitb16": ("ViT-B-16", "openai"), "vitl14": ("ViT-L-14", "openai")}
EMBEDDERS = {
    # LLM2CLIP's caption-contrastive Llama-3-8B-Instruct (the embedder of ProCLIP's code): an LLM2Vec
    # model (bidirectional Llama), loaded with no code from its repository.
    "llama3-8b-cc": {
        "source": "llm2vec", "name": "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned", "pooling": "mean",
        "arch": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "max_position_embeddings": 8192, "rope_theta": 500000.0}},
    # NV-Embed-v2 (Mistral-7B with latent-attention pooling): it needs its own code, an explicit opt-in.
    "nv-embed-v2": {
        "source": "sentence-transformers", "name": "nvidia/NV-Embed-v2", "trust_remote_code": True,
        "arch": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                 "max_position_embeddings": 32768}},
    # Not one of the paper's: Qwen3-Embedding-0.6B, a small current embedder whose random copy a CPU
    # dry run builds and runs (the 8B ones are sized and reported only).
    "qwen3-embedding-0.6b": {
        "source": "transformers", "name": "Qwen/Qwen3-Embedding-0.6B", "pooling": "last",
        "instruction": "Given an image caption, retrieve the image it describes",
        "arch": {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                 "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151669,
                 "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True}},
}
# Image-text pairs (the paper's 3M / 15M / 30M): CC3M, + CC12M, + YFCC15M, as img2dataset writes them,
# with DreamLIP's re-captions in each sample's JSON.
SOURCES = {"cc3m": "/data/cc3m/{00000..00331}.tar", "cc12m": "/data/cc12m/{00000..01242}.tar",
           "yfcc15m": "/data/yfcc15m/{00000..01499}.tar"}


def _sources(*names: str) -> list[dict]:
    # weight 1 each: every epoch reads every shard once (other weights need data.resampled)
    return [{"name": name, "shards": SOURCES[name], "weight": 1} for name in names]


DATA = {"3m": (3_000_000, _sources("cc3m")), "15m": (15_000_000, _sources("cc3m", "cc12m")),
        "30m": (30_000_000, _sources("cc3m", "cc12m", "yfcc15m"))}
CAPTIONS = [{"field": "shortIB_captions", "role": "short"}, {"field": "longIB_captions", "role": "long"},
            {"field": "caption", "role": "raw"}]
EVAL = [{"name": "urban1k", "format": "urban1k", "path": "/data/eval/Urban1k"},
        {"name": "sharegpt4v-1k", "format": "sharegpt4v", "path": "/data/eval/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json",
         "options": {"images": "/data/eval/sharegpt4v/images", "limit": 1000}},
        {"name": "docci", "format": "docci", "path": "/data/eval/docci", "options": {"split": "test"}},
        {"name": "dci", "format": "dci", "path": "/data/eval/densely_captioned_images"},
        {"name": "xm3600", "format": "xm3600", "path": "/data/eval/xm3600"}]


def optim(steps: int) -> dict:
    return {"steps": steps, "batch_size": PER_GPU, "log_every": 100, "checkpoint_every": 2000,
            "optim": {"optimizer": "adamw", "lr": 5.0e-4, "betas": [0.9, 0.98], "eps": 1.0e-6, "weight_decay": 0.2,
                      "warmup_steps": 10000, "schedule": "cosine"}}


def config(tower: str, embedder: str, size: str) -> dict:
    model, pretrained = TOWERS[tower]
    samples, shards = DATA[size]
    steps = EPOCHS * samples // (GPUS * PER_GPU)
    name = f"proclip-{tower}-{embedder}-{size}"
    return {
        "output_dir": f"runs/{name}", "seed": 0, "device": "auto", "precision": "bf16", "deterministic": False,
        "deepspeed": "configs/deepspeed/zero1.json",
        "clip": {"model": model, "pretrained": pretrained},
        "embedder": {**EMBEDDERS[embedder], "dtype": "bfloat16", "max_length": 512, "batch_size": 64},
        "adapter": {"num_blocks": 1, "expansion": 8},
        "data": {"train_shards": shards, "train_samples": samples, "captions": CAPTIONS, "train_languages": ["en"],
                 "llm_cache_dtype": "bfloat16", "num_workers": 8, "cache_dir": f"/data/cache/{embedder}"},
        # the reference: each rank's own batch for the distillation terms, sums, two views in stage 1
        "stage1": {"reduction": "sum", "scope": "local", "views": ["short", "raw"], "train": optim(steps)},
        "stage2": {"reduction": "sum", "scope": "local", "losses": {"contrastive": 1.0, "self_distillation": 1.0},
                   "ema_momentum": 0.999, "train": optim(steps)},
        "eval": {"datasets": EVAL, "batch_size": 256},
        "hub": {"license": "mit", "tags": ["proclip", tower, embedder], "title": name},
    }


def main() -> None:
    folder = ROOT / "configs" / "paper"
    folder.mkdir(parents=True, exist_ok=True)
    for tower in TOWERS:
        for embedder in EMBEDDERS:
            for size in DATA:
                name = f"proclip-{tower}-{embedder}-{size}"
                header = (f"# ProCLIP at {TOWERS[tower][0]} with {EMBEDDERS[embedder]['name']}, {size.upper()} pairs.\n"
                          "# Written by tools/paper_configs.py (the reference's hyper-parameters; steps: 32 epochs at "
                          f"{GPUS} GPUs x {PER_GPU}).\n# Dry run first: proalign check --config configs/paper/{name}.yaml\n")
                text = yaml.safe_dump(config(tower, embedder, size), sort_keys=False, width=120)
                (folder / f"{name}.yaml").write_text(header + text)
                print(folder / f"{name}.yaml")


if __name__ == "__main__":
    main()
