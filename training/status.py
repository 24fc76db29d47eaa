"""A fine-tuning run's progress as a small JSON record, rewritten atomically, for whoever watches the run.

    status = RunStatus("run.status.json")                 # or RunStatus(None): records nothing
    status.update(state="running", step=3, total=24, train_loss=1.9)
    RunStatus.read("run.status.json")                      # the latest record (a dict), or None

`python -m training.finetune --status FILE` writes it; the app's fine-tune panel runs that command in a child
process and polls the file, so a crash in training never reaches the app (chatapp/finetune_job.py). Fields:
state (running|done|failed|cancelled), phase, step, total, train_loss, val_loss, checkpoint, message, losses
(one per step), evals ([{iter, train_loss, val_loss}]), report (recall and retention), pid, updated.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class RunStatus:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.record: dict = {"state": "running", "phase": "starting", "step": 0, "total": 0, "train_loss": None,
                             "val_loss": None, "checkpoint": None, "message": "", "losses": [], "evals": [],
                             "report": None, "pid": os.getpid()}

    def update(self, **fields) -> None:
        self.record.update(fields)
        self.record["updated"] = time.time()
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)  # a reader never sees half a record

    def on_step(self, state, loss: float) -> None:
        """Trainer hook: the step count, its loss, and the evaluations so far."""
        losses = self.record["losses"] + [round(float(loss), 4)]
        evals = [{k: h[k] for k in ("iter", "train_loss", "val_loss")} for h in state.history]
        self.update(phase="training", step=state.iteration, train_loss=losses[-1], losses=losses, evals=evals,
                    val_loss=evals[-1]["val_loss"] if evals else None)

    @staticmethod
    def read(path: str | Path) -> dict | None:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
