"""The training engine, on top of data, models, methods, retrieval and tracking: a run config
resolved from its layers (:mod:`.resolution`), everything a run needs prepared and checked
(:mod:`.setup`), the loop (:mod:`.loop`) with one optimiser step (:mod:`.step`), the reported
checkpoint (:mod:`.selection`), per-epoch checkpoints and resuming (:mod:`.checkpoint`,
:mod:`.resume`), what failures become (:mod:`.failures`), progress lines (:mod:`.progress`) and
what MLflow records (:mod:`.runlog`)."""

from harness.training.loop import train
from harness.training.resolution import resolve
from harness.training.setup import build_model, make_optimizer, make_scheduler, prepare, prepare_for_device, splits_for
from harness.training.state import Best, Run, RunResult
from harness.training.step import train_step

__all__ = [
    "Best",
    "Run",
    "RunResult",
    "build_model",
    "make_optimizer",
    "make_scheduler",
    "prepare",
    "prepare_for_device",
    "resolve",
    "splits_for",
    "train",
    "train_step",
]
