import pytest
import torch
import torch.nn.functional as F

from proalign.losses import infonce_loss, instance_loss, self_distillation_loss, structure_loss


def reference_code_structure(s, t):
    """ProCLIP's training code, in float64: smooth_l1_loss(pdist(S), pdist(T), reduction='sum')."""
    s, t = F.normalize(s.double(), dim=-1), F.normalize(t.double(), dim=-1)
    return F.smooth_l1_loss(F.pdist(s, p=2), F.pdist(t, p=2), reduction="sum")


@pytest.mark.parametrize("n,d", [(2, 8), (7, 16), (33, 64)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_instance_matches_float64(oracle, n, d, reduction):
    g = torch.Generator().manual_seed(n * d)
    s, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert instance_loss(s, t, reduction).item() == pytest.approx(oracle.instance(s, t, reduction), abs=1e-6, rel=1e-6)


def test_instance_sum_scales_with_batch():
    s, t = torch.randn(10, 8), torch.randn(10, 8)
    doubled = instance_loss(torch.cat([s, s]), torch.cat([t, t]), "sum")
    assert doubled.item() == pytest.approx(2 * instance_loss(s, t, "sum").item(), rel=1e-6)
    assert instance_loss(torch.cat([s, s]), torch.cat([t, t]), "mean").item() == pytest.approx(
        instance_loss(s, t, "mean").item(), rel=1e-6)


@pytest.mark.parametrize("n,d", [(2, 8), (9, 16), (40, 32)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_structure_matches_float64(oracle, n, d, reduction):
    g = torch.Generator().manual_seed(n + d)
    s, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 3
    assert structure_loss(s, t, reduction).item() == pytest.approx(oracle.structure(s, t, reduction), abs=1e-5,
                                                                   rel=1e-6)


def test_structure_sum_is_the_reference_code_and_scales_with_pairs():
    """`sum` is smooth_l1(pdist(S), pdist(T), reduction='sum'): at batch 64 that is 2016 pairs."""
    g = torch.Generator().manual_seed(64)
    s, t = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    ref = reference_code_structure(s, t).item()
    assert structure_loss(s, t, "sum").item() == pytest.approx(ref, rel=1e-6)
    assert structure_loss(s, t, "mean").item() == pytest.approx(ref / (64 * 63 / 2), rel=1e-6)


@pytest.mark.parametrize("separation", [1e-2, 1e-3, 1e-4])
def test_structure_near_duplicate_rows_match_float64_value_and_gradient(separation):
    """Gram-matrix distances cancel catastrophically for near-identical rows; value and gradient
    must still match float64 pdist to 1e-5."""
    g = torch.Generator().manual_seed(7)
    base = F.normalize(torch.randn(8, 64, generator=g), dim=-1)
    s = torch.cat([base, base + separation * torch.randn(8, 64, generator=g)])  # 8 near-duplicate pairs
    t = torch.randn(16, 64, generator=g)
    s32 = s.clone().requires_grad_(True)
    got = structure_loss(s32, t, "sum")
    got.backward()
    s64 = s.double().requires_grad_(True)
    ref = reference_code_structure(s64, t.double())
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(s32.grad.double(), s64.grad, atol=1e-5, rtol=0)


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
def test_infonce_matches_float64(oracle, scale):
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    got = infonce_loss(img, txt, torch.tensor(scale), gather=False).item()
    assert got == pytest.approx(oracle.infonce(img, txt, scale), abs=1e-5, rel=1e-6)


def test_self_distillation_is_instance_plus_structure(oracle):
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    total, parts = self_distillation_loss(a, b)
    assert total.item() == pytest.approx(oracle.instance(a, b, "sum") + oracle.structure(a, b, "sum"), abs=1e-5)
    assert set(parts) == {"sd_instance", "sd_structure"}
    assert parts["sd_structure"].item() == pytest.approx(reference_code_structure(a, b).item(), rel=1e-6)


def test_distillation_reduction_governs_both_terms():
    from proalign.losses import distillation_loss
    a, b = torch.randn(10, 8), torch.randn(10, 8)
    _, summed = distillation_loss(a, b, reduction="sum")
    _, mean = distillation_loss(a, b, reduction="mean")
    assert summed["loss_instance"].item() == pytest.approx(10 * mean["loss_instance"].item(), rel=1e-5)
    assert summed["loss_structure"].item() == pytest.approx(45 * mean["loss_structure"].item(), rel=1e-5)


def test_logit_scale_is_clamped_to_the_reference_range():
    """The reference clamps log(scale) to [0, ln 100] after every step."""
    import math
    from proalign.models.logit_scale import LogitScale
    scale = LogitScale(1 / 0.07, maximum=100.0)
    with torch.no_grad():
        scale.log_scale.fill_(-3.0)
    scale.clamp_()
    assert scale.log_scale.item() == 0.0 and scale().item() == 1.0
    with torch.no_grad():
        scale.log_scale.fill_(7.0)
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0))
