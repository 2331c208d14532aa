"""The demo's evaluation sets: the benchmark's splits decoded once, plus the long-caption test
(a fixed English preamble longer than the teacher's 77 tokens, then the concept's names)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..config import RunConfig
from ..data.cache import CachedTextFeatures
from ..data.shards import expand_shards
from ..eval.evaluator import EvalSet, Evaluator, clip_text_tower, image_encoder, llm_text_tower, load_shard_set
from ..models.proclip import ProCLIP
from ..models.towers import context_length, count_truncated


def dataset_name(shard: str) -> str:
    """`data_shards/styles-test-style-001.tar` -> `styles-test-style`."""
    return Path(shard).name.rsplit("-", 1)[0]


LONG = "long"
# The long caption: a preamble the same for every image, longer than the teacher's 77 tokens, then
# the concept's names in the eval languages (English last). Whatever the text tower keeps after its
# cut is the preamble alone; the discriminating names sit after it.
LONG_PREAMBLE = (
    "This is one picture from a large collection of small square colour drawings that were made for "
    "phones, computers and chat programs around the world. Every drawing in the collection shows one "
    "single thing in a flat and simple style, with bold outlines, bright colours and a plain empty "
    "background, and it is meant to be read at a glance by people in every country, whatever the "
    "language they speak. The same idea is drawn by several artists in slightly different ways. The "
    "thing shown in this particular picture is called, in several languages:")
SEPARATOR = " / "
# Images in the long-caption test (each caption runs through the embedder live, per model).
LONG_CAPTION_IMAGES = 400


def long_caption_metas(metas: dict, languages: Optional[Sequence[str]] = None) -> dict:
    """Each sample's caption: the preamble, then its names in `languages` (all: None), English last."""
    out = {}
    for key, meta in metas.items():
        caps = meta["captions"]
        names = [caps[lang][0] for lang in sorted(caps)
                 if lang != "en" and caps[lang] and (languages is None or lang in languages)]
        if caps.get("en"):
            out[key] = {"captions": {LONG: [f"{LONG_PREAMBLE} {SEPARATOR.join(names + [caps['en'][0]])}."]}}
    return out


def names_past_the_cut(tokenizer, context: int) -> bool:
    """The teacher's tokenizer reaches the first name only after `context` tokens (its start and
    end tokens included): what the 77-token tower keeps of a long caption is the preamble alone."""
    return count_truncated(tokenizer, [LONG_PREAMBLE], context - 1) == 1  # the preamble alone fills the context


class DemoEvaluation:
    """The demo's eval sets, decoded once (plus the long-caption set), and the rows of every model."""

    def __init__(self, cfg: RunConfig, model: ProCLIP, llm_features: CachedTextFeatures, languages,
                 progress: bool = False, clip_features: Optional[CachedTextFeatures] = None):
        self.model, self.llm_features, self.clip_features = model, llm_features, clip_features
        groups: dict[str, list[str]] = {}
        for shard in expand_shards(cfg.data.eval_shards):
            groups.setdefault(dataset_name(shard), []).append(shard)
        sets = [load_shard_set(name, shards, model.preprocess_eval, languages, cfg.data.max_eval_samples)
                for name, shards in groups.items()]
        self.evaluator = Evaluator(sets, progress)
        self.split_names = [s.name for s in sets]
        language_set = next((s for s in sets if s.name.endswith("test-language")), None)
        self.long_name, self.long_names_cut = None, False
        if language_set:  # the long-caption test, on the known images
            n = min(len(language_set.keys), LONG_CAPTION_IMAGES)
            keys = language_set.keys[:n]
            self.long_name = "long captions"
            self.evaluator.sets[self.long_name] = EvalSet(
                self.long_name, language_set.images[:n], keys,
                long_caption_metas({k: language_set.metas[k] for k in keys}, languages), [LONG])
            self.long_names_cut = names_past_the_cut(model.clip_tokenizer, context_length(model.clip))
        self.rows: list[dict] = []

    @property
    def sets(self) -> dict[str, EvalSet]:
        return {name: self.evaluator.sets[name] for name in self.split_names}

    def run(self, label: str, with_clip_text: bool = False) -> None:
        """Every split and the long captions with the cached LLM features (the long captions are
        encoded once, then kept), plus the CLIP text tower when `with_clip_text`."""
        model = self.model
        model.eval()
        towers = [clip_text_tower(model, cache=self.clip_features)] if with_clip_text else []
        towers.append(llm_text_tower(model, label, self.llm_features))
        names = list(self.split_names) + ([self.long_name] if self.long_name else [])
        self.rows += self.evaluator.evaluate(image_encoder(model), towers, names)
