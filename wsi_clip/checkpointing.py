"""Crash-safe training checkpoints and resumption, shared by the WSI-CLIP and WSI-LLaVA trainers (training-side).

Training runs are long and get killed (pre-emption, OOM killer, SIGKILL). Three things make a killed run resume to
the same weights as an uninterrupted one:

* **atomic checkpoints** — :class:`ResumableTrainerMixin` lets the Hugging Face ``Trainer`` write each checkpoint into
  ``<output_dir>/.checkpoint-staging/checkpoint-N`` and, once every process has written its part (weights, optimizer,
  scheduler, RNG states, ``trainer_state.json``) and the files are flushed to disk, renames it to
  ``<output_dir>/checkpoint-N`` in one ``rename``. A folder named ``checkpoint-N`` is therefore always complete; a
  crash while saving leaves only a staging folder, which nothing ever resumes from.
* **automatic resumption** — ``resume_from_checkpoint`` accepts ``auto`` / ``true`` / ``latest`` (the latest complete
  checkpoint in ``output_dir``; none yet: start from scratch), or a path (which must be complete, else
  :class:`~wsi_clip.hub.CheckpointError`).
* **reproducible data** — collators with a ``seed`` draw each slide's random tiles from ``(seed, epoch, row)``
  instead of the global RNG (see :class:`processing.collators.ContrastiveCollator`); the mixin keeps their ``epoch``
  in step with the Trainer's, so a resumed run, any number of DataLoader workers and any number of processes all
  sample the same tiles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .hub import CheckpointError

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
AUTO_RESUME_VALUES = ("auto", "true", "latest", "last", "yes", "1")
NO_RESUME_VALUES = ("", "none", "false", "no", "0")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
_RESUME_FLAG = "--resume_from_checkpoint"


# ------------------------------------------------------------------------------------------------ completeness
def checkpoint_problems(folder: str | Path) -> list[str]:
    """What a Trainer checkpoint folder lacks to resume exactly (empty list: complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["the folder does not exist"]
    problems = []
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        problems.append(f"no weights ({' / '.join(_WEIGHT_FILES)})")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            problems.append(f"unreadable model.safetensors.index.json ({err})")
        else:
            problems += [f"missing weight shard {s}" for s in shards if not (folder / s).is_file()]
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        problems.append("no trainer_state.json")
    except ValueError as err:
        problems.append(f"trainer_state.json is not valid JSON ({err})")
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            problems.append(f"no {name} (a resumed run would restart the optimizer / schedule)")
    if not any(folder.glob("rng_state*.pth")):
        problems.append("no rng_state*.pth")
    return problems


def require_complete_checkpoint(folder: str | Path) -> Path:
    """``folder`` if it is a complete Trainer checkpoint, else :class:`CheckpointError` naming what is missing."""
    problems = checkpoint_problems(folder)
    if problems:
        raise CheckpointError(
            f"{folder}: not a complete training checkpoint: {'; '.join(problems)}. The save was "
            "probably interrupted. Resume from an earlier checkpoint-N folder, or pass "
            "--resume_from_checkpoint auto to pick the latest complete one."
        )
    return Path(folder)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-N`` folder of ``output_dir`` with the highest N (incomplete ones are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))),
        reverse=True,
    )
    for _, folder in found:
        problems = checkpoint_problems(folder)
        if not problems:
            return folder
        logger.warning("skipping incomplete checkpoint %s: %s", folder, "; ".join(problems))
    return None


def resolve_resume_checkpoint(value: str | bool | os.PathLike | None, output_dir: str | Path) -> str | None:
    """``resume_from_checkpoint`` as given on the command line → a checkpoint folder to resume from, or ``None``.

    ``auto`` / ``true`` / ``latest`` (or ``True``): the latest complete checkpoint in ``output_dir``, or ``None`` (start
    from scratch, logged) when there is none yet, so a restarted job needs no other command. A path must be complete.
    """
    if value is None or value is False:
        return None
    text = str(value).strip()
    if value is True or text.lower() in AUTO_RESUME_VALUES:
        found = latest_checkpoint(output_dir)
        if found is None:
            logger.warning(
                "resume_from_checkpoint=%s: no complete checkpoint in %s yet; starting from scratch.", text, output_dir
            )
            return None
        logger.info("resuming from the latest complete checkpoint %s", found)
        return str(found)
    if text.lower() in NO_RESUME_VALUES:
        return None
    return str(require_complete_checkpoint(text))


def normalize_resume_argv(argv: Sequence[str]) -> list[str]:
    """Let ``--resume_from_checkpoint`` be given without a value (meaning ``auto``) on a command line."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == _RESUME_FLAG and (i + 1 == len(out) or out[i + 1].startswith("--")):
            out.insert(i + 1, "auto")
    return out


# ------------------------------------------------------------------------------------------------ atomic saving
def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folder entries) to disk, so a rename publishes durable data."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint from its staging folder to its final name with an atomic rename."""
    _fsync_tree(staged)
    if final.exists():  # re-saving the same step: swap, never leave a half-old, half-new folder
        trash = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


class _CollatorEpochCallback(TrainerCallback):
    """Tell seeded collators the epoch about to start (their random tiles depend on it)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        collator = getattr(self.trainer, "data_collator", None)
        if collator is not None and hasattr(collator, "epoch"):
            collator.epoch = int(math.floor(state.epoch + 1e-6))


class ResumableTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before ``Trainer``): atomic checkpoints, ``resume_from_checkpoint``
    with ``auto`` and completeness checks, and epoch-seeded tile sampling. See the module docstring."""

    _staging_root: str | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_callback(_CollatorEpochCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's model save, with the training arguments as JSON instead of a pickled ``training_args.bin``
        (nothing this package writes needs ``torch.load`` with pickles to be read back)."""
        super()._save(output_dir, state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (folder / "training_args.bin").is_file():
            (folder / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")
            (folder / "training_args.bin").unlink()

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / STAGING_DIR
        staged, final = staging_root / name, run_dir / name
        if self.args.should_save and staged.exists():  # left over by a save that crashed
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self._staging_root, self.args.save_total_limit = str(staging_root), None  # rotate after publishing
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root, self.args.save_total_limit = None, limit
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging_root:
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        if self.args.should_save:
            if best != self.state.best_model_checkpoint:
                self.state.save_to_json(str(staged / "trainer_state.json"))
            publish_checkpoint(staged, final)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


__all__ = [
    "ResumableTrainerMixin",
    "checkpoint_problems",
    "require_complete_checkpoint",
    "latest_checkpoint",
    "resolve_resume_checkpoint",
    "normalize_resume_argv",
    "publish_checkpoint",
    "STAGING_DIR",
]
