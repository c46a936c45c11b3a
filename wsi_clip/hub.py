"""Publishing checkpoints: model cards, a local dry run that proves the folder loads, and the upload.

A checkpoint folder (``save_pretrained`` output of any model of this package, with its processor) is staged
with a generated ``README.md`` model card. Validation checks that the card's YAML metadata parses, that every
file named by ``auto_map`` is present, and that the model loads both ways a user will try:
``Auto…from_pretrained(dir)`` after importing the package, and ``trust_remote_code=True`` in a fresh
interpreter where this package **cannot** be imported (a meta-path blocker makes sure of it).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BASE_PACKAGES = ("processing", "wsi_clip")
KIND_ENTRY_POINTS = "wsi_mm.model_kinds"  # setup.cfg: packages above this one that add checkpoint kinds


@dataclass(frozen=True)
class ModelKind:
    """How a checkpoint of one ``model_type`` is loaded, tagged and described on the Hub."""

    auto_class: str  # transformers Auto class that loads it
    pipeline_tag: str
    package: str  # the package whose import registers its classes
    title: str  # human name for the model card


MODEL_KINDS: dict[str, ModelKind] = {
    "wsi_clip": ModelKind("AutoModel", "zero-shot-classification", "wsi_clip", "WSI-CLIP slide-text model"),
    "wsi_slide_encoder": ModelKind(
        "AutoModel", "feature-extraction", "wsi_clip", "Prov-GigaPath-compatible slide encoder"
    ),
}


def register_model_kind(model_type: str, *, auto_class: str, pipeline_tag: str, package: str, title: str) -> None:
    """Called by a higher package for the checkpoint kind it adds (this module never names it)."""
    MODEL_KINDS[model_type] = ModelKind(auto_class, pipeline_tag, package, title)


def _load_kind_plugins() -> None:
    """Import every installed package that declares checkpoint kinds (entry point group ``wsi_mm.model_kinds``)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=KIND_ENTRY_POINTS):
        try:
            entry.load()
        except Exception as err:  # noqa: BLE001 - one broken plugin must not stop the checks of the others
            logger.warning("checkpoint kinds of %s could not be loaded: %s: %s", entry.value, type(err).__name__, err)


def model_kind(model_type: str) -> ModelKind:
    """The :class:`ModelKind` of a ``model_type``, importing the packages that declare kinds when it is unknown."""
    if model_type not in MODEL_KINDS:
        _load_kind_plugins()
    if model_type not in MODEL_KINDS:
        raise CheckpointError(
            f"model_type {model_type!r} is not a checkpoint kind of this package (known: "
            f"{sorted(MODEL_KINDS)}); is the package that defines it installed (pip install -e . in a checkout: its "
            f"entry point {KIND_ENTRY_POINTS!r} declares it)?"
        )
    return MODEL_KINDS[model_type]


def own_packages() -> tuple[str, ...]:
    """Every package of this distribution (hidden by the remote-code check)."""
    _load_kind_plugins()
    return tuple(sorted(set(BASE_PACKAGES) | {kind.package for kind in MODEL_KINDS.values()}))


_BLOCKER = """
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f'{{name}} is hidden: this check proves the checkpoint loads without the package')
        return None
sys.meta_path.insert(0, _Blocker())
"""


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not load; the message names the folder, file and fix."""


@dataclass
class ValidationReport:
    folder: Path
    model_type: str
    checks: dict[str, str] = field(default_factory=dict)  # name -> "ok" or the error

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.checks.values())

    def __str__(self) -> str:
        lines = [f"{self.folder} ({self.model_type}):"] + [
            f"  [{'x' if v == 'ok' else ' '}] {k}: {v}" for k, v in self.checks.items()
        ]
        return "\n".join(lines)


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, with clear errors for missing or non-model folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json — not a save_pretrained folder (for a LoRA adapter, "
            "export a merged model first with --merge)."
        )
    config = json.loads(config_path.read_text())
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(
            f"{folder}: no *.safetensors weights next to config.json; the checkpoint is "
            "incomplete (interrupted save?). Re-save it with save_pretrained."
        )
    return config


def missing_checkpoint_files(folder: str | Path) -> list[str]:
    """Files a complete checkpoint needs but ``folder`` lacks: weights shards of the index, auto_map modules."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    missing = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing += [s for s in sorted(shards) if not (folder / s).is_file()]
    for ref in (config.get("auto_map") or {}).values():
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        if ref and "--" not in ref:
            module = ref.rsplit(".", 1)[0] + ".py"
            if not (folder / module).is_file():
                missing.append(module)
    # modules imported by the shipped modules (sibling relative imports) must be there too
    for py in folder.glob("*.py"):
        for line in py.read_text().splitlines():
            line = line.strip()
            if line.startswith("from .") and " import " in line:
                sibling = line[len("from .") :].split(" import ")[0].strip()
                if sibling and "." not in sibling and not (folder / f"{sibling}.py").is_file():
                    missing.append(f"{sibling}.py (imported by {py.name})")
    return sorted(set(missing))


def require_checkpoint_files(folder: str | Path | None) -> None:
    """Refuse a local checkpoint folder that lacks files (weights, shards, shipped modules) before anything loads.

    ``None`` and Hub ids (no such local folder) pass: they are resolved by ``from_pretrained`` itself.
    """
    if folder is None or not Path(folder).expanduser().is_dir():
        return
    missing = missing_checkpoint_files(Path(folder).expanduser())
    if missing:
        raise CheckpointError(
            f"{folder}: checkpoint folder is missing {missing}. It was copied or saved incompletely; "
            "re-save it with save_pretrained (or copy the whole folder)."
        )


def _run_python(code: str, cwd: Path, timeout: int = 600) -> str | None:
    """Run ``code`` in a fresh interpreter; ``None`` on success, else the tail of its error output."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_clean_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if proc.returncode == 0:
        return None
    return (
        (proc.stderr or proc.stdout).strip().splitlines()[-1][-500:]
        if (proc.stderr or proc.stdout)
        else f"exit code {proc.returncode}"
    )


def _clean_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def load_check_code(folder: Path, auto_class: str, *, remote: bool, package: str) -> str:
    """Python source that loads ``folder`` with ``auto_class`` and runs nothing else (for a subprocess)."""
    packages = own_packages()
    header = _BLOCKER.format(blocked=set(packages)) if remote else f"import {package}\n"
    check_hidden = (
        f"for name in {packages!r}:\n"
        "    try:\n        __import__(name)\n    except ImportError:\n        pass\n"
        "    else:\n        raise AssertionError(name + ' is still importable')\n"
        if remote
        else ""
    )
    return (
        header
        + check_hidden
        + textwrap.dedent(f"""
        import transformers
        model = getattr(transformers, {auto_class!r}).from_pretrained({str(folder)!r},
                                                                       trust_remote_code={remote!r})
        assert type(model).__name__.startswith(("WSI", "Slide")), type(model)
        print(type(model).__name__, sum(p.numel() for p in model.parameters()))
    """)
        + (
            textwrap.dedent(f"""
        processor = transformers.AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code={remote!r})
        assert type(processor).__name__ == "WSIProcessor", type(processor)
    """)
            if (folder / "processor_config.json").is_file()
            else ""
        )
    )


def validate_checkpoint(folder: str | Path, *, check_loading: bool = True) -> ValidationReport:
    """Everything a user needs from a published folder: card metadata, auto_map files, both loading paths."""
    from huggingface_hub import ModelCard

    folder = Path(folder).resolve()
    config = read_checkpoint_config(folder)
    model_type = config.get("model_type", "?")
    report = ValidationReport(folder, model_type)
    readme = folder / "README.md"
    try:
        card = ModelCard.load(readme)
        if not card.data.to_dict().get("library_name"):
            raise ValueError("library_name missing from the card metadata")
        report.checks["model card metadata parses"] = "ok"
    except Exception as err:  # noqa: BLE001 - reported, not raised
        report.checks["model card metadata parses"] = f"{type(err).__name__}: {err}"
    missing = missing_checkpoint_files(folder)
    report.checks["auto_map / sibling files present"] = "ok" if not missing else f"missing {missing}"
    if check_loading:
        kind = model_kind(model_type)
        auto_class, package = kind.auto_class, kind.package
        with_pkg = _run_python(load_check_code(folder, auto_class, remote=False, package=package), folder.parent)
        what = auto_class + (" + AutoProcessor" if (folder / "processor_config.json").is_file() else "")
        report.checks[f"{what} load with the package installed"] = with_pkg or "ok"
        remote = _run_python(load_check_code(folder, auto_class, remote=True, package=package), folder.parent)
        report.checks[f"{what} load with trust_remote_code, package hidden"] = remote or "ok"
    return report


def build_model_card(
    folder: str | Path,
    *,
    repo_id: str,
    metrics: dict[str, Any] | None = None,
    datasets: list[str] | None = None,
    base_models: list[str] | None = None,
) -> str:
    """Model card text (YAML metadata + usage with and without the package + metrics table)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_checkpoint_config(folder)
    model_type = config.get("model_type", "wsi_clip")
    kind = model_kind(model_type)
    auto_class, pipeline_tag, package, human = kind.auto_class, kind.pipeline_tag, kind.package, kind.title
    metrics = metrics or {}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    bases = [b for b in (base_models or []) if b and not Path(b).exists()]  # local paths are not Hub ids
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license="apache-2.0",
        tags=[
            "pathology",
            "histopathology",
            "whole-slide-image",
            model_type.replace("_", "-"),
            "multiple-instance-learning",
            "custom_code",
        ],
        base_model=bases or None,
        datasets=datasets or None,
        metrics=sorted(numeric) or None,
    )
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(numeric.items())) or "| (none recorded) | |"
    load = f'{auto_class}.from_pretrained("{repo_id}")'
    body = f"""
# {repo_id.split("/")[-1]}

A {human} (`model_type: {model_type}`) trained with the open `wsi-mm` package: whole-slide-image
multimodal learning on tile features (`features [N, D]` + level-0 `(x, y)` tile coordinates per slide).

## Usage

With the package installed (`pip install wsi-mm`), no remote code is executed:

```python
import {package}  # registers the model classes
from transformers import {auto_class}, AutoProcessor

model = {load}
processor = AutoProcessor.from_pretrained("{repo_id}")
batch = processor(slides=["slide.h5"], text=["a pathology report"])
```

Without the package (only `torch`, `transformers`, `safetensors`, `h5py`), the modeling files shipped in this
repository are used:

```python
from transformers import {auto_class}

model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)
```

## Inputs

Tile features of the slide (one row per tile, the tile encoder the model was trained on), tile coordinates in
level-0 pixels `(x, y)`, and a mask of real tiles — exactly what `WSIProcessor` returns.

## Evaluation

| metric | value |
|---|---|
{rows}

## Limitations

Research use only; not a medical device. Metrics above come from the data named in the metadata and do not
transfer to other sites, scanners or tile encoders without validation.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def stage_checkpoint(
    folder: str | Path,
    output_dir: str | Path,
    *,
    repo_id: str,
    metrics_file: str | Path | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Copy ``folder`` to ``output_dir`` and write its model card: the exact folder an upload would send."""
    folder, output_dir = Path(folder), Path(output_dir)
    config = read_checkpoint_config(folder)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    shutil.copytree(
        folder,
        output_dir,
        ignore=shutil.ignore_patterns(
            "optimizer.pt",
            "scheduler.pt",
            "rng_state*",
            "trainer_state.json",
            "training_args.bin",
            "training_args.json",
            "global_step*",
            "__pycache__",
            ".checkpoint-staging",
            "checkpoint-*",
        ),
    )
    metrics: dict[str, Any] = {}
    metrics_path = Path(metrics_file) if metrics_file else folder / "metrics.json"
    if metrics_path.is_file():
        loaded = json.loads(metrics_path.read_text())
        metrics = _flatten(loaded)
    bases = [v for k, v in _flatten(config).items() if k.endswith("_name_or_path") and isinstance(v, str)]
    (output_dir / "README.md").write_text(
        build_model_card(output_dir, repo_id=repo_id, metrics=metrics, datasets=datasets, base_models=bases)
    )
    return output_dir


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def push_checkpoint(staged: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a staged folder with ``huggingface_hub``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(staged), repo_id=repo_id, repo_type="model", commit_message="Upload with wsi-mm push_to_hub"
    )
    return str(getattr(info, "commit_url", info))


__all__ = [
    "CheckpointError",
    "ValidationReport",
    "build_model_card",
    "stage_checkpoint",
    "validate_checkpoint",
    "push_checkpoint",
    "missing_checkpoint_files",
    "require_checkpoint_files",
    "read_checkpoint_config",
    "load_check_code",
]
