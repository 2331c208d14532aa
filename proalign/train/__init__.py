"""Training: the stage interface (`task`), the loop (`loop`), where it executes (`backends`), the
optimizer and schedule (`optim`), checkpoint state (`state`) and metrics (`metrics`)."""
from .backends import Runtime, join
from .loop import NonFiniteLossError, TrainingInterrupted, seed_everything, train
from .task import StageTask

__all__ = ["NonFiniteLossError", "Runtime", "StageTask", "TrainingInterrupted", "join", "seed_everything", "train"]
