"""A callback for tests/serve/test_remote_rollout_ddp.py, loaded by `astrai-train` through
--trainer.callbacks: every rollout a rank generates writes its weights versions to
<default_root_dir>/versions-rank<r>.jsonl (one line per rollout batch, in order)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordRolloutVersions(L.Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / f"versions-rank{trainer.global_rank}.jsonl"
        workflow, run = pl_module.workflow, pl_module.workflow.run

        def recorded(engine, *args, **kwargs):
            rollout = run(engine, *args, **kwargs)
            with path.open("a") as f:  # the producer's thread or the trainer's: one writer per rank
                f.write(json.dumps({"versions": rollout.versions, "leader": getattr(engine, "leader", None)}) + "\n")
            return rollout

        workflow.run = recorded
