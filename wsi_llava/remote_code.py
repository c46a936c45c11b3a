"""The Python files of a WSI-LLaVA checkpoint, so it loads with ``trust_remote_code=True`` where this package is not
installed.

Why not transformers' own copy (``register_for_auto_class``): it copies the class's file and the files its relative
imports name *in the same folder*. The LLaVA files import the slide encoder relatively
(``from .modeling_slide_encoder import ...``) but its single source lives in ``wsi_clip/``: inside the package,
``wsi_llava/__init__`` aliases those ``wsi_clip`` modules under ``wsi_llava.`` (one class per process, no copy in
git). Here every relative import is resolved through ``sys.modules`` to the module's real file, wherever it lives,
and all files land flat beside ``config.json``. In a checkpoint the same code finds the copies next to it.

Hub-shipped with the configuration file: stdlib only.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

# auto class -> "module.Class" of the checkpoint's code (modules relative to the checkpoint folder)
AUTO_MAP = {
    "AutoConfig": "configuration_wsillava.WSILlavaConfig",
    "AutoModel": "modeling_wsillava.WSILlavaModel",
    "AutoModelForImageTextToText": "modeling_wsillava.WSILlavaForConditionalGeneration",
}
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)  # the form transformers follows


def source_files(module_name: str) -> list[Path]:
    """The file of ``module_name`` and of every module it imports relatively (recursively, lazy imports included)."""
    files: list[Path] = []
    seen: set[str] = set()
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name) or importlib.import_module(name)
        path = Path(module.__file__)
        if path not in files:
            files.append(path)
        text = path.read_text(encoding="utf-8")
        todo.extend(f"{module.__package__}.{sibling}" for sibling in _RELATIVE_IMPORT.findall(text))
    return files


def save_remote_code(config: Any, save_directory: str | os.PathLike) -> list[Path]:
    """Copy the configuration and modeling files (and all they import) into ``save_directory`` and point
    ``config.auto_map`` at them. Called by ``WSILlavaConfig.save_pretrained``, so every model save runs it too."""
    package = type(config).__module__.rsplit(".", 1)[0]
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    copied: dict[str, Path] = {}
    for module in sorted({entry.split(".")[0] for entry in AUTO_MAP.values()}):
        for source in source_files(f"{package}.{module}"):
            if source.name in copied and copied[source.name] != source:
                raise RuntimeError(
                    f"two modules named {source.name} ({copied[source.name]}, {source}) would "
                    f"overwrite each other in {folder}; rename one of them."
                )
            copied[source.name] = source
            target = folder / source.name
            if not (target.exists() and os.path.samefile(source, target)):
                shutil.copyfile(source, target)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP}
    return [folder / name for name in sorted(copied)]


__all__ = ["save_remote_code", "source_files", "AUTO_MAP"]
