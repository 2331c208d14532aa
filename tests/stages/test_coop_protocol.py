"""CoOp's protocol: every (shots, seed), skips finished runs, resumes an interrupted one, base-to-new."""
import os
import pytest


def _split(root, name):
    from proalign.config import EvalDatasetConfig, _format_options
    ds = EvalDatasetConfig(name, "coop-split", str(root), options={"images": "images", "split": name})
    ds.options = _format_options(ds, "coop")
    return ds


def test_coop_protocol_runs_every_shot_and_seed_then_skips_finished_runs(tiny_cfg, model_file, coop_split,
                                                                       tmp_path, capsys):
    from proalign.stages.coop_protocol import run_protocol
    tiny_cfg.init_from = str(model_file)
    tiny_cfg.output_dir = str(tmp_path / "protocol")
    tiny_cfg.coop.epochs, tiny_cfg.coop.batch_size = 2, 4
    tiny_cfg.coop.eval_languages = ["en"]
    tiny_cfg.coop.train_data, tiny_cfg.coop.eval_data = _split(coop_split, "train"), _split(coop_split, "test")
    tiny_cfg.coop.max_classes = 3  # a fixed random subset of the classes, the same for every seed
    results = run_protocol(tiny_cfg, shots=[1, 2], seeds=[1, 2], progress=False)
    assert sorted((r["shots"], r["seed"]) for r in results) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert {r["parts"]["all"][0]["classes"] for r in results} == {3}
    table = (tmp_path / "protocol" / "coop_protocol.md").read_text()
    assert "| 0 (hand-written prompt) |" in table and "| 2 |" in table and "±" in table
    assert (tmp_path / "protocol" / "coop_protocol.png").exists()
    stamp = os.path.getmtime(tmp_path / "protocol" / "shots-1" / "seed-1" / "result.json")
    capsys.readouterr()
    again = run_protocol(tiny_cfg, shots=[1, 2], seeds=[1, 2], progress=False)
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert again == results
    assert os.path.getmtime(tmp_path / "protocol" / "shots-1" / "seed-1" / "result.json") == stamp


def test_coop_protocol_resumes_an_interrupted_run_from_its_checkpoints(tiny_cfg, model_file, coop_split, tmp_path,
                                                                       monkeypatch):
    """A (shots, seed) run with checkpoints but no result.json (killed mid-way) is resumed, not
    restarted: the engine writes them under `<run>/coop/checkpoints`."""
    import proalign.stages.coop as coop_stage
    from proalign.stages.coop_protocol import run_dir, run_protocol
    tiny_cfg.init_from = str(model_file)
    tiny_cfg.output_dir = str(tmp_path / "protocol")
    tiny_cfg.coop.epochs, tiny_cfg.coop.batch_size = 2, 4
    tiny_cfg.coop.eval_languages = ["en"]
    tiny_cfg.coop.train_data, tiny_cfg.coop.eval_data = _split(coop_split, "train"), _split(coop_split, "test")
    run_protocol(tiny_cfg, shots=[1], seeds=[1], progress=False)
    folder = run_dir(tmp_path / "protocol", 1, 1)
    assert list((folder / "coop" / "checkpoints").glob("step-*"))
    (folder / "result.json").unlink()  # as if killed after its last checkpoint
    resumed = []
    real = coop_stage.run_coop

    def spy(cfg, resume=False, **kwargs):
        resumed.append(resume)
        return real(cfg, resume=resume, **kwargs)
    monkeypatch.setattr(coop_stage, "run_coop", spy)
    run_protocol(tiny_cfg, shots=[1], seeds=[1], progress=False)
    assert resumed == [True] and (folder / "result.json").exists()


def test_coop_base_to_new_reports_both_halves_and_their_harmonic_mean(tiny_cfg, model_file, coop_split, tmp_path):
    from proalign.eval.report import harmonic_mean
    from proalign.stages.coop_protocol import run_protocol
    tiny_cfg.init_from = str(model_file)
    tiny_cfg.output_dir = str(tmp_path / "b2n")
    tiny_cfg.coop.epochs, tiny_cfg.coop.batch_size = 2, 4
    tiny_cfg.coop.eval_languages = ["en"]
    tiny_cfg.coop.train_data, tiny_cfg.coop.eval_data = _split(coop_split, "train"), _split(coop_split, "test")
    results = run_protocol(tiny_cfg, shots=[2], seeds=[1], base_to_new=True, progress=False)
    parts = results[0]["parts"]
    assert parts["base"][0]["classes"] == 2 and parts["new"][0]["classes"] == 2
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3) and harmonic_mean(0.0, 0.0) == 0.0
    assert "Base-to-new" in (tmp_path / "b2n" / "coop_protocol.md").read_text()
