import numpy as np
import pytest
import torch

from proalign.losses import infonce_loss, instance_loss, self_distillation_loss, structure_loss


def _norm64(x):
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_instance(s, t, reduction):
    per = ((_norm64(s) - _norm64(t)) ** 2).sum(1)
    return per.sum() if reduction == "sum" else per.mean()


def ref_structure(s, t):
    s, t = _norm64(s), _norm64(t)
    n = len(s)
    ds = [np.linalg.norm(s[i] - s[j]) for i in range(n) for j in range(i + 1, n)]
    dt = [np.linalg.norm(t[i] - t[j]) for i in range(n) for j in range(i + 1, n)]
    diff = np.abs(np.array(ds) - np.array(dt))
    return np.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).mean()


def ref_infonce(img, txt, scale):
    i, t = _norm64(img), _norm64(txt)
    logits = scale * i @ t.T

    def ce(lg):
        lg = lg - lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return -np.mean(np.diag(logp))
    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.mark.parametrize("n,d", [(2, 8), (7, 16), (33, 64)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_instance_matches_float64(n, d, reduction):
    g = torch.Generator().manual_seed(n * d)
    s, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert instance_loss(s, t, reduction).item() == pytest.approx(ref_instance(s, t, reduction), abs=1e-6, rel=1e-6)


def test_instance_sum_scales_with_batch():
    s, t = torch.randn(10, 8), torch.randn(10, 8)
    doubled = instance_loss(torch.cat([s, s]), torch.cat([t, t]), "sum")
    assert doubled.item() == pytest.approx(2 * instance_loss(s, t, "sum").item(), rel=1e-6)
    assert instance_loss(torch.cat([s, s]), torch.cat([t, t]), "mean").item() == pytest.approx(
        instance_loss(s, t, "mean").item(), rel=1e-6)


@pytest.mark.parametrize("n,d", [(2, 8), (9, 16), (40, 32)])
def test_structure_matches_float64(n, d):
    g = torch.Generator().manual_seed(n + d)
    s, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 3
    assert structure_loss(s, t).item() == pytest.approx(ref_structure(s, t), abs=1e-6)


def test_structure_batch_of_one_is_zero_with_finite_grad():
    s = torch.randn(1, 8, requires_grad=True)
    loss = structure_loss(s, torch.randn(1, 8))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


def test_identical_inputs_give_zero_loss_and_finite_grads():
    s = torch.randn(6, 8)
    s[3] = s[2]  # duplicate rows: zero pairwise distance
    s.requires_grad_(True)
    ins, struct = instance_loss(s, s.detach()), structure_loss(s, s.detach())
    (ins + struct).backward()
    assert ins.item() == pytest.approx(0.0, abs=1e-10)
    assert struct.item() == pytest.approx(0.0, abs=1e-10)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_infonce_matches_float64(scale):
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    got = infonce_loss(img, txt, torch.tensor(scale), gather=False).item()
    assert got == pytest.approx(ref_infonce(img, txt, scale), abs=1e-5, rel=1e-6)


def test_self_distillation_is_instance_plus_structure():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    total, parts = self_distillation_loss(a, b)
    assert total.item() == pytest.approx(ref_instance(a, b, "sum") + ref_structure(a, b), abs=1e-5)
    assert set(parts) == {"sd_instance", "sd_structure"}
