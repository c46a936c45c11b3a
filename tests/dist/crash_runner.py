"""Run a training script and SIGKILL it at a chosen point: the interrupted-training tests' stand-in for a pre-empted job.

    python crash_runner.py STEP WHERE SCRIPT [script arguments ...]

``WHERE`` is ``step`` (killed as the optimizer step after global step ``STEP`` begins, i.e. mid-training after the
checkpoint of step ``STEP`` was published) or ``save`` (killed while the checkpoint of step ``STEP`` is being written:
weights and optimizer are on disk, RNG states and trainer state are not). SIGKILL, so nothing gets to clean up.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from transformers import Trainer


def main() -> None:
    step, where, script, *args = sys.argv[1:]
    step = int(step)
    target = {"step": "training_step", "save": "_save_rng_state"}[where]
    original = getattr(Trainer, target)

    def killing(self, *a, **k):
        if self.state.global_step == step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *a, **k)

    setattr(Trainer, target, killing)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
