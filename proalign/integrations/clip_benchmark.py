"""`proalign clip-benchmark ...`: clip_benchmark's own command line with a `proalign` model type.

    proalign clip-benchmark eval --model runs/demo --dataset crossmodal3600 \
        --dataset_root data/xm3600-root --language de --task zeroshot_retrieval

`--model` takes what `proalign.load` takes (run folder, model file, hub folder, `hf-hub:org/name`);
`--pretrained` is ignored unless it names a proalign model file (then that file is loaded). Every
other option is clip_benchmark's (`clip_benchmark eval --help`), datasets and result files included.
The model runs in proalign's own precision (clip_benchmark's autocast is switched off inside it),
so its numbers equal `proalign eval`'s on the same data.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

MODEL_TYPE = "proalign"
# Without --output, results go to one JSON per (dataset, model, language, task) in the working
# directory; clip_benchmark's own default puts the model name (a path here) into the file name.
DEFAULT_OUTPUT = "{dataset}_{pretrained}_{language}_{task}.json"


class ClipBenchmarkModel(torch.nn.Module):
    """The two calls clip_benchmark makes on a model: `encode_image(pixel batch)` and
    `encode_text(what the tokenizer returned)`, both unit-length, in float32."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.model.device.type, enabled=False):
            return self.model.encode_image(images.float(), batch_size=max(len(images), 1))

    def encode_text(self, tokens) -> torch.Tensor:
        with torch.autocast(self.model.device.type, enabled=False):
            return self.model.encode_text(tokens)


def load_for_clip_benchmark(model_name: str, pretrained: Optional[str] = None, cache_dir=None, device="cpu"):
    """clip_benchmark's loader signature -> (model, transform, tokenizer)."""
    from ..loading import load
    source = pretrained if pretrained and pretrained.endswith(".safetensors") and Path(pretrained).is_file() \
        else model_name
    model, preprocess, tokenizer = load(source, device=str(device))
    return ClipBenchmarkModel(model).eval(), preprocess, tokenizer


def register() -> None:
    """Add the `proalign` model type to clip_benchmark (its CLI reads the same list and table)."""
    from clip_benchmark import models
    models.TYPE2FUNC[MODEL_TYPE] = load_for_clip_benchmark
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def _label(model: str) -> str:
    """A file-name-safe tag for a model path or hub name (`runs/demo` -> `runs-demo`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "proalign"


def clip_benchmark_argv(argv: Sequence[str]) -> list[str]:
    """The arguments for clip_benchmark's CLI: `--model_type proalign`, and for `eval` without
    `--pretrained`, each `--model` paired with a tag of its own (`--pretrained_model model,tag`) and
    an output name without the model's path in it."""
    argv = list(argv)
    if not argv or argv[0] != "eval":
        return argv
    peek = argparse.ArgumentParser(add_help=False)
    for flag in ("--model", "--pretrained", "--pretrained_model"):
        peek.add_argument(flag, nargs="+")
    for flag in ("--model_type", "--output"):
        peek.add_argument(flag)
    known, rest = peek.parse_known_args(argv[1:])
    out = ["eval", *rest, "--model_type", known.model_type or MODEL_TYPE]
    if known.pretrained_model:
        out += ["--pretrained_model", *known.pretrained_model]
    elif known.pretrained:
        out += ["--model", *(known.model or []), "--pretrained", *known.pretrained]
    elif known.model:
        if any("," in m for m in known.model):
            raise ValueError(f"--model {known.model}: a comma in a model path; pass --pretrained_model 'path,tag'")
        out += ["--pretrained_model", *[f"{m},{_label(m)}" for m in known.model]]
    out += ["--output", known.output or DEFAULT_OUTPUT]
    return out


def main(argv: Sequence[str]) -> int:
    try:
        from clip_benchmark import cli
    except ImportError as err:
        print(f"error: clip_benchmark cannot be imported ({err}): pip install -e '.[clip-benchmark]'",
              file=sys.stderr)
        return 1
    register()
    saved = sys.argv
    sys.argv = ["proalign clip-benchmark", *clip_benchmark_argv(argv)]
    try:
        cli.main()
    finally:
        sys.argv = saved
    return 0
