"""`stage1.views` and `scope: local|global` against float64 oracles of the reference's formulas
(VisionXLab/ProCLIP training/train.py: per view `mse_loss(S_v, T_v, sum)`, `smooth_l1_loss(pdist(S_0),
pdist(T_0), sum)` on the first view, each rank on its own batch, DDP averaging the ranks), at 1
and 2 ranks."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proalign.config import Stage1Config

B, D, VIEWS, WORLD = 6, 8, 2, 2


def reference_stage1(views_s, views_t):
    """The reference code's stage-1 loss on one batch, in float64 (rows: one tensor per view)."""
    s = [F.normalize(v.double(), dim=-1) for v in views_s]
    t = [F.normalize(v.double(), dim=-1) for v in views_t]
    instance = sum(F.mse_loss(sv, tv, reduction="sum") for sv, tv in zip(s, t))
    structure = F.smooth_l1_loss(F.pdist(s[0]), F.pdist(t[0]), reduction="sum")
    return instance + structure


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(WORLD * B, VIEWS, D, generator=g), torch.randn(WORLD * B, VIEWS, D, generator=g)


def _task(scope="global", views=VIEWS):
    from proalign.stages.stage1 import Stage1Task
    torch.manual_seed(0)
    adapter = nn.Linear(D, D)
    return Stage1Task(adapter, stream=None, stage1=Stage1Config(scope=scope, views=["short", "raw"][:views]))


def test_views_equal_the_reference_on_one_rank():
    llm, teacher = _batch()
    task = _task()
    loss, logged = task({"llm": llm, "teacher": teacher})
    with torch.no_grad():
        student = task.adapter(llm)
    expected = reference_stage1([student[:, v] for v in range(VIEWS)], [teacher[:, v] for v in range(VIEWS)])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    structure_only_first = F.smooth_l1_loss(F.pdist(F.normalize(student[:, 0].double(), dim=-1)),
                                            F.pdist(F.normalize(teacher[:, 0].double(), dim=-1)), reduction="sum")
    assert logged["loss_structure"].item() == pytest.approx(structure_only_first.item(), rel=1e-6)


def _scope_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from proalign.losses import Objective
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    llm, teacher = _batch()
    mine = slice(rank * B, (rank + 1) * B)
    out = {}
    for scope in ("local", "global"):
        task = _task(scope)
        loss, _ = task({"llm": llm[mine], "teacher": teacher[mine]})
        loss.backward()  # then DDP averages the replicated adapter's gradient over the ranks
        out[f"s1_{scope}"] = loss.detach()
        out[f"s1_grad_{scope}"] = task.adapter.weight.grad.clone()
        image = llm[mine, 0].clone().requires_grad_(True)
        sd, _ = Objective({"self_distillation": 1.0}, scope=scope)({"image": image, "ema_image": teacher[mine, 0]})
        (sd / world).backward()  # rows are not replicated: each gets the rank-averaged loss's gradient
        out[f"sd_{scope}"], out[f"sd_grad_{scope}"] = sd.detach(), image.grad
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_local_scope_is_the_reference_and_global_scope_the_whole_batch_at_two_ranks(free_port, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_scope_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    llm, teacher = _batch()
    halves = [slice(r * B, (r + 1) * B) for r in range(WORLD)]

    def stage1_reference(rows_of):
        """(loss averaged over the ranks, gradient of the adapter weight) in float64."""
        adapter = _task().adapter.double()
        student = adapter(llm.double())
        losses = [reference_stage1([student[rows, v] for v in range(VIEWS)], [teacher[rows, v] for v in range(VIEWS)])
                  for rows in rows_of]
        mean = torch.stack(losses).mean()
        mean.backward()
        return mean.item(), adapter.weight.grad.float()
    local_loss, local_grad = stage1_reference(halves)            # the reference: each rank its own batch
    global_loss, global_grad = stage1_reference([slice(None)])   # the whole global batch, as one process
    for scope, loss, grad in (("local", local_loss, local_grad), ("global", global_loss, global_grad)):
        mean = torch.stack([r[f"s1_{scope}"] for r in ranks]).mean().item()
        assert mean == pytest.approx(loss, rel=1e-5), scope
        # DDP all-reduces (averages) the adapter's gradient: the mean of the ranks' gradients
        assert torch.allclose(torch.stack([r[f"s1_grad_{scope}"] for r in ranks]).mean(0), grad, atol=1e-5), scope
    assert local_loss < global_loss  # fewer structure pairs per rank: the terms' balance differs

    def self_distillation_reference(rows_of):
        image = llm[:, 0].double().clone().requires_grad_(True)
        losses = []
        for rows in rows_of:
            s, t = F.normalize(image[rows], dim=-1), F.normalize(teacher[rows, 0].double(), dim=-1)
            losses.append(F.mse_loss(s, t, reduction="sum") + F.smooth_l1_loss(F.pdist(s), F.pdist(t), reduction="sum"))
        mean = torch.stack(losses).mean()
        mean.backward()
        return mean.item(), image.grad.float()
    for scope, rows_of in (("local", halves), ("global", [slice(None)])):
        loss, grad = self_distillation_reference(rows_of)
        assert torch.stack([r[f"sd_{scope}"] for r in ranks]).mean().item() == pytest.approx(loss, rel=1e-5), scope
        # each rank's rows get the gradient of the rank-averaged loss
        assert torch.allclose(torch.cat([r[f"sd_grad_{scope}"] for r in ranks]), grad, atol=1e-5), scope
