"""One run per output folder: the lock names its holder; a stale lock is taken over."""
import os
import json


def _lock_of(pid: int, tmp_path, host=None):
    import socket
    from proalign.runlock import LOCK_NAME, _process_start
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "start": _process_start(pid), "command": "proalign stage2",
                                             "since": "2026-12-02 10:00:00"}))
    return run


def test_a_second_run_on_a_busy_output_dir_refuses_naming_the_holder(tmp_path, capsys):
    import subprocess
    import sys
    from proalign.cli import main
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = _lock_of(holder.pid, tmp_path)
        code = main(["stage1", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={run}"])
        err = capsys.readouterr().err
        assert code == 1 and f"is in use by proalign stage2 (PID {holder.pid} on" in err
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
        other_host = _lock_of(holder.pid, tmp_path, host="node-7")
        assert main(["stage1", "--config", "configs/tiny-cpu.yaml", "--no-progress",
                     f"--set=output_dir={other_host}"]) == 1
        err = capsys.readouterr().err
        assert "on node-7" in err and f"remove {other_host / '.proalign-lock'}" in err
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_gone_after_the_run(tmp_path):
    import subprocess
    import sys
    from proalign.runlock import LOCK_NAME, run_lock
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = _lock_of(gone.pid, tmp_path)
    with run_lock(run, "proalign stage1"):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        with run_lock(run, "proalign stage2"):  # the demo runs its stages inside its own lock
            pass
        assert (run / LOCK_NAME).exists()
    assert not (run / LOCK_NAME).exists()
