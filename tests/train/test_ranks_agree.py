"""Decisions the ranks of a data-parallel run take together: a non-finite loss on one rank skips
the step on every rank (no collective mismatch), and the replicas stay equal; periodic eval runs on
every rank, so none waits in a collective while rank 0 evaluates."""
import os

import torch
import torch.nn as nn

from proalign.config import TrainConfig
from proalign.train import StageTask

WORLD, NAN_STEP, NAN_RANK = 2, 2, 1


class _Regression(StageTask):
    """A linear layer fit to fixed targets; rank NAN_RANK's loss is NaN at step NAN_STEP."""

    name = "toy"

    def __init__(self, rank):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.train_cfg = TrainConfig(steps=5, batch_size=8, log_every=1, checkpoint_every=100, eval_every=2)
        self.rank, self.step, self.evaluated_at = rank, 0, []
        self.gen = torch.Generator().manual_seed(rank)

    def next_batch(self):
        self.step += 1
        return {"x": torch.randn(8, 4, generator=self.gen)}

    def forward(self, batch, accumulated=None):
        loss = self.layer(batch["x"]).pow(2).mean()
        if self.rank == NAN_RANK and self.step == NAN_STEP + 1:
            loss = loss * float("nan")
        return loss, {}

    def evaluate(self):
        self.evaluated_at.append(self.step)
        return {"score": float(self.rank)}


def _worker(rank, port, out_dir):
    from proalign.train import Runtime, train
    from proalign.train.loop import _Run  # noqa: F401  (the loop module is imported in the worker)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    task = _Regression(rank)
    last = train(task, Runtime(device="cpu"), f"{out_dir}/run", progress=False)
    torch.save({"weight": task.layer.weight.detach().clone(), "skipped": last["nonfinite_skipped"],
                "evaluated_at": task.evaluated_at},
               f"{out_dir}/rank{rank}.pt")
    import torch.distributed as dist
    dist.destroy_process_group()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(free_port, tmp_path):
    import time
    import torch.multiprocessing as mp
    context = mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):  # a collective mismatch hangs gloo: fail instead of waiting
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the ranks hang in mismatched collectives (one skipped the step alone)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert ranks[0]["evaluated_at"] == ranks[1]["evaluated_at"] == [2, 4]  # every rank, at the same steps
    import json
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval_score"] for row in logged if "eval_score" in row] == [0.0, 0.0]  # rank 0 reports
