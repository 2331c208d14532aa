"""`proalign serve`: a trained model behind a web page (text -> image search in any language,
image -> nearest images and zero-shot labels, LLM vs CLIP text tower)."""
from .app import ServeSettings, create_app, run_serve

__all__ = ["ServeSettings", "create_app", "run_serve"]
