"""A stop signal is honoured within one micro-batch: with train.accum_steps = 4 a SIGTERM in the
middle of a step abandons it (its batches already drawn), names the last checkpoint and exits
128 + 15, instead of finishing every remaining micro-batch first."""
import os
import signal

import pytest
import torch
import torch.nn as nn

from proalign.config import TrainConfig
from proalign.train import StageTask


class _Accumulating(StageTask):
    name = "toy"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 2)
        self.train_cfg = TrainConfig(steps=10, batch_size=4, accum_steps=4, log_every=1, checkpoint_every=2)
        self.micro_batches = 0

    def next_batch(self):
        return {"x": torch.randn(4, 4)}

    def features(self, batch):
        return {"out": self.layer(batch["x"])}

    def loss(self, features):
        self.micro_batches += 1
        if self.micro_batches == 2 * 4 + 2:  # step 3's second micro-batch (4 losses a step)
            os.kill(os.getpid(), signal.SIGTERM)
        return features["out"].pow(2).mean(), {}


def test_sigterm_between_micro_batches_stops_the_step_and_names_the_last_checkpoint(tmp_path):
    from proalign.train import Runtime, TrainingInterrupted, train
    task = _Accumulating()
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM during step 3, after step 2; checkpoint .*"
                                                  "step-0000002. Resume") as stopped:
        train(task, Runtime(device="cpu"), tmp_path, progress=False)
    assert stopped.value.exit_code == 143
    assert task.micro_batches == 2 * 4 + 2  # no micro-batch ran after the signal
    assert sorted(p.name for p in (tmp_path / "toy" / "checkpoints").iterdir() if p.is_dir()) == ["step-0000002"]
