"""proalign: ProCLIP-style LLM text towers for CLIP.

    model, preprocess, tokenizer = proalign.load("runs/demo")   # a run folder or a model file

`import proalign` stays light (no torch): the CLI validates configs before the models load.
"""


def load(path, device=None, allow_embedder_mismatch=False):
    """(model, preprocess, tokenizer) from a run folder or a proalign model file, as open_clip's
    `create_model_and_transforms` returns them; see `proalign.loading.load`."""
    from .loading import load as _load
    return _load(path, device, allow_embedder_mismatch)
