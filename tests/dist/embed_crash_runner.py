"""Run ``scripts/embed_slides.py`` and SIGKILL it while it publishes its K-th slide file: the stand-in for a pre-empted
embedding job (the K-th file is fully written under its temporary name, the rename never happens).

    python embed_crash_runner.py K SCRIPT [script arguments ...]
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

import wsi_clip.slide_embedding as slide_embedding


def main() -> None:
    kill_at, script, *args = sys.argv[1:]
    original = slide_embedding._publish
    calls = {"n": 0}

    def publish(tmp, final):
        calls["n"] += 1
        if calls["n"] == int(kill_at):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(tmp, final)

    slide_embedding._publish = publish
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
