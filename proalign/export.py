"""`proalign export`: a run's model as a Hugging Face folder (and optionally a hub repo)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import yaml

from .config import ConfigError, HubConfig, apply_overrides, parse_yaml, section_from_dict
from .errors import ProalignError
from .loading import find_model_file

log = logging.getLogger(__name__)


def run_hub_section(run: Path, overrides: Sequence[str]) -> Optional[HubConfig]:
    """The run config's `hub:` section (licence, tags, title, description) with `hub.*` overrides;
    None when neither gives one."""
    raw: dict = {}
    config = run / "config.yaml"
    if config.is_file():
        try:
            loaded = parse_yaml(config.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{config}: not valid YAML: {err}") from None
        raw = {"hub": loaded.get("hub") or {}} if isinstance(loaded, dict) else {}
    for item in overrides:
        if not item.startswith("hub."):
            raise ConfigError(f"--set {item!r}: export sets only the model card's fields (hub.license, hub.tags, "
                              "hub.title, hub.description)")
    raw = apply_overrides(raw, list(overrides))
    if not raw.get("hub"):
        return None
    if not isinstance(raw["hub"], dict):
        raise ConfigError(f"hub: expected a mapping, got {raw['hub']!r}"[:200])
    return section_from_dict(HubConfig, raw["hub"], "hub")


def export_run(run: str | Path, out: str | Path, model_file: Optional[str | Path] = None,
               results: Optional[str | Path] = None, overrides: Sequence[str] = (),
               push_to: Optional[str] = None, private: Optional[bool] = None) -> Path:
    """Write the run's most trained model (or `model_file`) as a Hugging Face folder in `out`, with the
    run's `results.md` (or `results`) as the card's results; push it to `push_to` when given."""
    from .models.proclip import ProCLIP
    run = Path(run)
    if not run.is_dir():
        raise ProalignError(f"--run {run}: not a run folder")
    model = ProCLIP.from_file(Path(model_file) if model_file else find_model_file(run)).eval()
    hub = run_hub_section(run, overrides)
    if hub is not None:
        model.config.hub = hub
    if results is None and (run / "results.md").is_file():
        results = run / "results.md"
    out = Path(out)
    model.save_pretrained(out, results=results)
    log.info("wrote %s (%s)", out, ", ".join(sorted(p.name for p in out.iterdir())))
    if push_to:
        url = model.push_to_hub(push_to, results=results, private=private)
        print(f"pushed to {push_to}: {url}")
    return out
