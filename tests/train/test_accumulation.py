"""Gradient accumulation equals the whole batch; checkpoints hold only what trains; eval shares one embedder pass."""
import json
import pytest
import torch


class _Contrastive:
    """A toy two-tower contrastive task over fixed rows (stage 2's loss: InfoNCE + a learned scale)."""

    @staticmethod
    def make(batch_size, accum_steps, steps=2):
        from proalign.config import OptimConfig, TrainConfig
        from proalign.train import StageTask
        from proalign.models.logit_scale import LogitScale

        class Task(StageTask):
            name = "toy"

            provides = ("image", "text", "logit_scale", "student", "teacher")

            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.rows = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
                torch.manual_seed(1)
                self.image, self.text = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
                self.logit_scale = LogitScale(10.0, 100.0)
                self.objective = self.build_objective({"contrastive": 1.0, "structure": 0.5})
                self.train_cfg = TrainConfig(steps=steps, batch_size=batch_size, accum_steps=accum_steps,
                                             checkpoint_every=100, log_every=1,
                                             optim=OptimConfig(optimizer="sgd", lr=0.5, momentum=0.0, grad_clip=None))
                self.at = 0

            def next_batch(self):
                idx = torch.arange(self.at, self.at + batch_size) % 64
                self.at += batch_size
                return {"a": self.rows[0][idx], "b": self.rows[1][idx]}

            def features(self, batch):
                image, text = self.image(batch["a"]), self.text(batch["b"])
                return {"image": image, "text": text, "logit_scale": self.logit_scale(),
                        "student": image, "teacher": text.detach()}

            def loss(self, features):
                return self.objective(features)
        return Task()


def test_checkpoints_and_checksums_hold_only_what_trains(tiny_cfg):
    """The CoOp head's frozen adapter (and the embedder behind its prompt) stay out of checkpoints."""
    from proalign.models.prompt import PromptLearner
    from proalign.models.proclip import ProCLIP
    from proalign.stages.coop import CoopTask
    model = ProCLIP.from_config(tiny_cfg)
    prompt = PromptLearner(model.embedder, 2, "end", False, ["a", "b"])
    task = CoopTask(prompt, model.adapter, torch.randn(4, 64), torch.tensor([0, 1, 0, 1]), [["cat"], ["dog"]],
                    10.0, tiny_cfg.coop, 0)
    assert set(task.training_state()) == {"prompt.ctx"}
    tiny_cfg.coop.train_adapter = True
    task = CoopTask(prompt, model.adapter.requires_grad_(True), torch.randn(4, 64), torch.tensor([0, 1, 0, 1]),
                    [["cat"], ["dog"]], 10.0, tiny_cfg.coop, 0)
    assert {k.split(".")[0] for k in task.training_state()} == {"prompt", "adapter"}


def test_eval_runs_the_llm_once_per_caption_for_models_sharing_an_embedder(tiny_cfg, tmp_path, monkeypatch):
    from collections import Counter
    from proalign.config import EvalDatasetConfig
    from proalign.eval.runner import run_eval
    from proalign.models.embedder import TextEmbedder
    from proalign.models.proclip import ProCLIP
    files = {}
    for label in ("a", "b"):
        torch.manual_seed(len(files))  # two different adapters, one embedder
        files[label] = str(tmp_path / f"{label}.safetensors")
        ProCLIP.from_config(tiny_cfg).save(files[label])
    tiny_cfg.eval.models = files
    tiny_cfg.eval.datasets = [EvalDatasetConfig("emoji", "shards", "data_shards/emoji-test-000.tar",
                                                ["en", "de"], 15)]
    encoded: Counter = Counter()
    real = TextEmbedder.encode

    def counting(self, texts, *args, **kwargs):
        encoded.update(texts)
        return real(self, texts, *args, **kwargs)
    monkeypatch.setattr(TextEmbedder, "encode", counting)
    run_eval(tiny_cfg, progress=False)
    rows = [json.loads(line) for line in open(f"{tiny_cfg.output_dir}/eval_rows.jsonl")]
    assert {r["model"] for r in rows} >= {"a", "b"}
    assert encoded and max(encoded.values()) == 1  # every caption through the LLM once, for both models
    # the second model's numbers are those it gets evaluated alone
    tiny_cfg.eval.models = {"b": files["b"]}
    tiny_cfg.output_dir = str(tmp_path / "alone")
    run_eval(tiny_cfg, progress=False)
    alone = [json.loads(line) for line in open(tmp_path / "alone" / "eval_rows.jsonl")]
    key = lambda r: (r["language"], r["t2i_R@1"], r["i2t_R@1"], r["t2i_R@10"])  # noqa: E731
    assert [key(r) for r in rows if r["model"] == "b"] == [key(r) for r in alone if r["model"] == "b"]


def test_gradient_accumulation_equals_the_whole_batch(tiny_cfg, tmp_path):
    """2 x 8 accumulated = one batch of 16: InfoNCE negatives, structure pairs and the logit
    scale's gradient (counted once) span the accumulated batch."""
    from proalign.train import Runtime, train
    whole, accumulated = _Contrastive.make(16, 1), _Contrastive.make(8, 2)
    train(whole, Runtime.of(tiny_cfg), tmp_path / "whole", progress=False)
    train(accumulated, Runtime.of(tiny_cfg), tmp_path / "accum", progress=False)
    for (name, a), b in zip(whole.training_state().items(), accumulated.training_state().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    rows = lambda run: [json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")]  # noqa: E731
    assert rows("whole") == pytest.approx(rows("accum"), rel=1e-6)
