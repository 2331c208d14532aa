"""The stage tasks' objectives against float64 references, their wiring, the loss-term registry,
and that stage 2 improves held-out retrieval on the tiny config."""
import copy

import pytest
import torch



def _batch(model, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    llm_dim = model.adapter.in_dim if model.adapter is not None else 64  # the teacher has no adapter
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "llm": torch.randn(n, llm_dim, generator=g),
            "text": [f"caption {i}" for i in range(n)]}


def test_teacher_task_is_symmetric_infonce_of_both_towers_and_exports_its_scale(oracle, tiny_cfg):
    from proalign.models.proclip import ProCLIP
    from proalign.stages.teacher import TeacherTask
    torch.manual_seed(0)
    model = ProCLIP.from_config(tiny_cfg, load_embedder=False)
    start_scale = model.clip.logit_scale.exp().item()
    task = TeacherTask(model, tiny_cfg.teacher, tiny_cfg.data, tiny_cfg.seed)
    batch = _batch(model)
    batch["tokens"] = task.tokenizer(batch["text"])
    loss, logged = task(batch)
    with torch.no_grad():
        image = model.clip.encode_image(batch["image"])
        text = model.clip.encode_text(batch["tokens"])
    assert loss.item() == pytest.approx(oracle.infonce(image, text, start_scale), abs=1e-5)
    assert logged["logit_scale"].item() == pytest.approx(start_scale, rel=1e-6)
    # the trained (1,)-shaped scale goes back into open_clip's 0-dim parameter, clamped
    with torch.no_grad():
        task.logit_scale.log_scale.fill_(10.0)
    task.after_step()
    task.export_logit_scale(model.clip)
    assert model.clip.logit_scale.shape == () and model.clip.logit_scale.exp().item() == pytest.approx(100.0)
    # teacher.max_logit_scale is the teacher's own bound, not stage 2's
    tiny_cfg.teacher.max_logit_scale = 50.0
    fresh = TeacherTask(ProCLIP.from_config(tiny_cfg, load_embedder=False), tiny_cfg.teacher, tiny_cfg.data, 0)
    with torch.no_grad():
        fresh.logit_scale.log_scale.fill_(10.0)
    fresh.after_step()
    assert fresh.logit_scale().item() == pytest.approx(50.0)


@pytest.mark.parametrize("lambda_sd", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stage2_forward_is_infonce_plus_lambda_sd_times_self_distillation(oracle, tiny_cfg, lambda_sd, reduction):
    from proalign.models.proclip import ProCLIP
    from proalign.stages.stage2 import Stage2Task
    torch.manual_seed(0)
    model = ProCLIP.from_config(tiny_cfg)
    tiny_cfg.stage2.losses["self_distillation"], tiny_cfg.stage2.reduction = lambda_sd, reduction
    task = Stage2Task(model, tiny_cfg.stage2, tiny_cfg.data, tiny_cfg.seed, shard_features=None)
    # make the EMA copy differ from the student, so the self-distillation term is not zero
    with torch.no_grad():
        for p in task.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference_ema = copy.deepcopy(task.ema)
    calls = []
    task.ema.register_forward_hook(lambda *args: calls.append(1))
    batch = _batch(model)
    loss, logged = task(batch)
    with torch.no_grad():
        image = task.visual(batch["image"])
        text = task.adapter(batch["llm"])
        ema_image = reference_ema(batch["image"])
    scale = tiny_cfg.stage2.init_logit_scale
    expected = oracle.infonce(image, text, scale)
    if lambda_sd:
        expected += lambda_sd * (oracle.instance(image, ema_image, reduction) + oracle.structure(image, ema_image, reduction))
        assert logged["sd_instance"].item() == pytest.approx(oracle.instance(image, ema_image, reduction), rel=1e-4)
        assert calls, "the EMA teacher must run when lambda_sd > 0"
    else:
        assert not calls and "loss_self_distillation" not in logged  # no teacher forward at lambda_sd = 0
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert logged["loss_contrastive"].item() == pytest.approx(oracle.infonce(image, text, scale), abs=1e-5)


def test_loss_terms_are_registered_and_named_in_errors(oracle, tiny_cfg):
    import torch.nn as nn
    from proalign.config import ConfigError
    from proalign.losses import LOSS_TERMS, LossTerm, Objective, register_loss
    with pytest.raises(ConfigError, match=r"stage2.losses.nope: unknown loss term 'nope' \(registered: .*contrastive"):
        Objective({"contrastive": 1.0, "nope": 1.0}, where="stage2.losses")
    with pytest.raises(ConfigError, match="every loss weight is zero"):
        Objective({"instance": 0.0}, where="stage1")

    @register_loss("test_text_norm")
    class TextNorm(LossTerm):
        needs = ("text",)

        def forward(self, f):
            return {self.term: f["text"].norm(dim=-1).mean()}
    try:
        text = torch.randn(4, 8)
        objective = Objective({"instance": 2.0, "test_text_norm": 0.25})
        loss, logged = objective({"student": text, "teacher": text.flip(0), "text": text})
        expected = 2.0 * oracle.instance(text, text.flip(0), "sum") + 0.25 * text.norm(dim=-1).mean().item()
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert set(logged) == {"loss_instance", "loss_test_text_norm"}
        assert objective.needs == {"student", "teacher", "text"}
        assert isinstance(objective.terms["test_text_norm"], nn.Module)
    finally:
        LOSS_TERMS.unregister("test_text_norm")


@pytest.mark.slow  # a 150-step training run (CI runs the slow set after the default one)
def test_stage2_raises_heldout_retrieval_on_the_tiny_config(tiny_cfg):
    """150 steps from the tiny config's random start (seed 0): mean held-out R@10 over both
    directions (100 unseen emoji, chance 0.10) rises."""
    from proalign.stages.stage2 import run_stage2
    tiny_cfg.stage2.train.steps = 150
    tiny_cfg.stage2.train.eval_every = 0
    summary = run_stage2(tiny_cfg, progress=False)

    def recall(when):
        return (summary[f"{when}_t2i_R@10"] + summary[f"{when}_i2t_R@10"]) / 2
    assert recall("after") >= recall("before") + 0.04, summary
