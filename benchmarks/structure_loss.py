"""Structure-loss cost: proalign's float64-Gram distances (exact for near-duplicate rows, see
tests/test_losses.py) against the reference's float32 `F.pdist`, forward + backward, side by side
(1 thread). Reported two ways: the loss alone, and a whole stage-1 adapter step at the demo's
shape (e5-small 384-d -> adapter (1 block, x8) -> 128-d, batch 256), where the target is <= 1.15x."""
from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (puts the repo on sys.path)


def _reference_structure(student, teacher):
    import torch.nn.functional as F
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.smooth_l1_loss(F.pdist(s), F.pdist(t), reduction="sum")


def run(shapes=((256, 128), (256, 768), (1024, 768)), rounds: int = 7) -> dict:
    import torch
    from common import side_by_side
    from proalign.losses import instance_loss, structure_loss
    from proalign.models.adapter import MLPAdapter
    torch.set_num_threads(1)
    rows = []
    for n, d in shapes:
        g = torch.Generator().manual_seed(n + d)
        student = torch.randn(n, d, generator=g).requires_grad_(True)
        teacher = torch.randn(n, d, generator=g)
        timing = side_by_side(lambda: structure_loss(student, teacher, "sum").backward(),
                              lambda: _reference_structure(student, teacher).backward(), rounds)
        rows.append({"batch": n, "dim": d, "ours_ms": 1e3 * timing["a_s"], "pdist_ms": 1e3 * timing["b_s"],
                     "ratio": timing["ratio_a_over_b"]})
    adapter = MLPAdapter(384, 128, 1, 8)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    feats, teacher = torch.randn(256, 384), torch.randn(256, 128)

    def step(structure):
        out = adapter(feats)
        loss = instance_loss(out, teacher) + structure(out, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    timing = side_by_side(lambda: step(lambda s, t: structure_loss(s, t, "sum")),
                          lambda: step(_reference_structure), rounds)
    return {"benchmark": "structure loss fwd+bwd, float64 Gram / float32 pdist (1 thread)", "loss_alone": rows,
            "adapter_step_ms": 1e3 * timing["a_s"], "adapter_step_with_pdist_ms": 1e3 * timing["b_s"],
            "adapter_step_ratio": timing["ratio_a_over_b"], "target": "adapter step <= 1.15x"}


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(json.dumps(run(), indent=1))
