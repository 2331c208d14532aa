"""User extensions from the command line: a module named in the run config's `imports` is imported
in every process of the run (the CLI, and each rank of a torchrun launch), and a loss term it
registers takes its own settings from `losses: {term: {weight: w, <setting>: value}}`."""
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from proalign.config import ConfigError, load_config

TERM = '''
import torch
from proalign.losses import LossTerm, register_loss


@register_loss("{name}")
class NormPenalty(LossTerm):
    """The student's mean norm to the power `power` (a term with a setting of its own)."""
    needs = ("student",)

    def __init__(self, reduction="sum", scope="global", power: float = 1.0):
        super().__init__(reduction, scope)
        self.power = float(power)

    def forward(self, f):
        value = f["student"].norm(dim=-1).mean() ** self.power
        return {{self.term: value, "norm_penalty_power": torch.tensor(self.power)}}
'''


@pytest.fixture
def user_module(tmp_path):
    """(module name, term name, PYTHONPATH folder): a module of the user's own, not importable
    until its folder is on the path."""
    suffix = uuid.uuid4().hex[:8]
    module, term = f"my_terms_{suffix}", f"norm_penalty_{suffix}"
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{module}.py").write_text(textwrap.dedent(TERM.format(name=term)))
    return module, term, folder


def _settings(module, term, out, cache, power="3"):
    return ["--set", f"imports=[{module}]", "--set", f"output_dir={out}", "--set", f"data.cache_dir={cache}",
            "--set", "stage1.train.steps=4", "--set", "stage1.train.log_every=1",
            "--set", f"stage1.losses={{instance: 1.0, structure: 1.0, {term}: {{weight: 0.5, power: {power}}}}}"]


def _logged(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_a_term_from_a_module_named_in_the_config_trains_under_the_cli(run_cli, user_module, tmp_path, shared_cache):
    module, term, folder = user_module
    out = tmp_path / "run"
    proc = run_cli(["stage1", "--config", "configs/tiny-cpu.yaml", "--no-progress",
                    *_settings(module, term, out, shared_cache)], env={"PYTHONPATH": str(folder)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _logged(out, "norm_penalty_power") == [3.0] * 4  # its own setting reached it
    assert len(_logged(out, f"loss_{term}")) == 4


def test_a_setting_the_term_does_not_take_is_a_config_error_naming_it(run_cli, user_module, tmp_path, shared_cache):
    module, term, folder = user_module
    args = _settings(module, term, tmp_path / "run", shared_cache)
    args[-1] = args[-1].replace("power: 3", "pwoer: 3")
    proc = run_cli(["stage1", "--config", "configs/tiny-cpu.yaml", "--no-progress", *args],
                   env={"PYTHONPATH": str(folder)})
    assert proc.returncode == 2
    assert f"stage1.losses.{term}.pwoer: the '{term}' loss term has no such setting (it takes: weight, power)" \
        in proc.stderr


@pytest.mark.parametrize("imports,message", [
    ("[no_such_module_anywhere]", "imports[0]: cannot import 'no_such_module_anywhere'"),
    ("[../evil.py]", "imports[0]: a module name such as my_pkg.terms"),
    ("os.path", "imports: a list of module names"),
])
def test_imports_that_cannot_be_imported_are_config_errors(repo_root, imports, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"imports={imports}"])


def test_a_model_files_stored_config_never_imports(rewrite_stored_config, model_file, user_module, tmp_path,
                                                   monkeypatch):
    """Only a run config imports: `imports` written into a model file's stored config is not run."""
    import proalign
    module, _, folder = user_module
    marker = tmp_path / "imported.txt"
    (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(folder))
    crafted = rewrite_stored_config(model_file, tmp_path / "crafted.safetensors",
                                    lambda stored: stored.update(imports=[module]))
    from proalign.errors import ProalignError
    with pytest.raises(ProalignError, match="not a mapping of config sections"):  # refused as a whole
        proalign.load(str(crafted), device="cpu")
    assert not marker.exists() and module not in sys.modules


@pytest.mark.slow  # a 2-rank torchrun launch
def test_a_user_term_trains_under_torchrun_on_two_ranks(repo_root, user_module, free_port, tmp_path, shared_cache):
    module, term, folder = user_module
    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "stages/stage1_distill.py",
           "--config", "configs/tiny-cpu.yaml", "--no-progress", *_settings(module, term, out, shared_cache, "2")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), str(folder)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _logged(out, "norm_penalty_power") == [2.0] * 4
    sums = [(out / "replicas" / f"stage1-rank{r}.txt").read_text() for r in range(2)]
    assert sums[0] == sums[1]
