"""WebDataset loader rate (samples/s, 2 workers, demo preprocessing) vs the rate at which a
stage-2 step on the demo model consumes samples. Target: loader >= 2x consumption."""
from __future__ import annotations

import argparse
import json
import time

from common import demo_config, model_without_embedder


def run(batch_size: int = 64, batches: int = 20, workers: int = 2) -> dict:
    import torch
    from proalign.data.shards import ImageTextStream
    from proalign.data.stream import Batcher
    from proalign.stages.stage2 import Stage2Task
    cfg = demo_config("embedder.arch={hidden_size: 384}")
    model = model_without_embedder(cfg)
    stream = ImageTextStream(cfg.data.train_shards, model.preprocess_train, ["en"], seed=0)
    batcher = Batcher(stream, batch_size, num_workers=workers)
    batcher.next_batch()  # start the workers
    start = time.perf_counter()
    for _ in range(batches):
        batcher.next_batch()
    loader_rate = batches * batch_size / (time.perf_counter() - start)
    del batcher

    task = Stage2Task(model, cfg.stage2, cfg.data, cfg.seed, shard_features=None)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5)
    batch = {"image": torch.randn(batch_size, 3, cfg.data.image_size, cfg.data.image_size),
             "llm": torch.randn(batch_size, model.adapter.in_dim)}
    steps = 5
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss, _ = task(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.after_step()
    consume_rate = steps * batch_size / (time.perf_counter() - start)
    return {"benchmark": f"loader ({workers} workers) vs stage-2 consumption (demo model, batch {batch_size})",
            "loader_samples_per_s": loader_rate, "stage2_samples_per_s": consume_rate,
            "ratio": loader_rate / consume_rate, "target": ">= 2x"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    print(json.dumps(run(workers=ap.parse_args().workers), indent=1))
