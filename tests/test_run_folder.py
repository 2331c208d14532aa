"""Writes stay inside the run: planted symbolic links in output_dir are never followed, and a
folder of the user's own files is not taken as an output_dir."""
import json
import os

import pytest


def _plant(run, victims, names):
    """Symbolic links `names` in `run` to files holding the user's text."""
    (run / "replicas").mkdir(parents=True, exist_ok=True)
    (run / ".proalign-run").write_text("{}\n")  # a real run folder: only the links are planted
    for name in names:
        victim = victims / name.replace("/", "_")
        victim.write_text("the user's own text\n")
        os.symlink(victim, run / name)


@pytest.mark.parametrize("name", ["config.yaml", "replicas/stage1-rank0.txt", "metrics.jsonl", "summary.jsonl"])
def test_a_planted_symlink_in_output_dir_is_never_written_through(tiny_cfg, tmp_path, name):
    from proalign.stages.common import write_run_config
    from proalign.stages.stage1 import run_stage1
    from proalign.storage import UnsafeTargetError
    run, victims = tmp_path / "run", tmp_path / "victims"
    victims.mkdir()
    _plant(run, victims, [name])
    tiny_cfg.stage1.train.steps = 2
    with pytest.raises(UnsafeTargetError, match=f"{run / name}: is a symbolic link"):
        write_run_config(tiny_cfg, "stage1")
        run_stage1(tiny_cfg, progress=False)
    assert (victims / name.replace("/", "_")).read_text() == "the user's own text\n"


def test_a_folder_of_the_users_files_is_refused_as_output_dir(run_cli, tmp_path):
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "notes.jsonl").write_text('{"mine": 1}\n')
    proc = run_cli(["eval", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={mine}"])
    assert proc.returncode == 1
    assert f"output_dir {mine}: a non-empty folder that is not a proalign run" in proc.stderr
    assert "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (mine / "config.yaml").read_text() == "my: own\n" and (mine / "notes.jsonl").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.jsonl"]


def test_an_empty_or_new_folder_becomes_a_run_and_stays_one(tmp_path):
    from proalign.runlock import RUN_MARKER, run_lock
    for folder in (tmp_path / "new", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        with run_lock(folder, "test"):
            (folder / "config.yaml").write_text("seed: 0\n")
        assert (folder / RUN_MARKER).is_file()
        with run_lock(folder, "test again"):  # a run folder, no longer empty: still accepted
            pass
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    with run_lock(mine, "forced", force=True):
        pass
    assert json.loads((mine / RUN_MARKER).read_text())
