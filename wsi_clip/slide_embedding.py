"""Slide embeddings of a cohort: one vector per slide from a slide encoder or a WSI-CLIP checkpoint.

What users run before any downstream study (linear probes, survival, retrieval). Training-side module (not
Hub-shipped); the command is ``wsi-embed-slides`` (:mod:`wsi_clip.commands.embed`).

* **Ragged batches** sorted by tile count (largest first), so padding stays small; the slide encoder gives every
  slide of a padded batch its one-slide result (``tile_mask``).
* **Output** in TRIDENT's layout: ``<output_dir>/slide_features_<name>/<slide_id>.h5`` with ``features [D]`` whose
  attributes name the model, layer, pooling and source file, plus one ``embeddings.safetensors`` (``embeddings
  [S, D]``; slide ids in its metadata and in ``index.csv``) for the whole cohort.
* **Resumable**: a slide whose file exists (written by the same settings) is skipped; files are written to a
  temporary name and renamed, so a killed run leaves no truncated file.
* **Several processes** (``torchrun``): each takes every world-size-th slide of the size-sorted list, so the split
  is the same whatever was already written, and every slide is embedded once.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from processing import SlideFormatError, WSIDataError, pad_slides, read_slide, slide_num_tiles
from processing.annotations import row_patch_size

from .slide_towers import SLIDE_ENCODER_MODEL_TYPE, find_slide_tower, from_pretrained_strict, load_slide_tower

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COHORT_FILE = "embeddings.safetensors"
INDEX_FILE = "index.csv"
REPORT_FILE = "embedding_report.json"
# A slide joins a batch only with at least this fraction of the batch's largest slide's tiles: the linear layers
# run on padded rows too, so a batch of very different sizes costs more than its slides one by one.
MIN_BATCH_FILL = 0.75
# the attributes a per-slide file must share with this run to count as done (anything else is another run's)
_SETTINGS = ("model", "embedding_layer", "pooling", "projected", "max_tiles")


@dataclass
class SlideEmbeddingModel:
    """A loaded model that turns a padded batch of slides into ``[B, D]`` float32 embeddings, and what it is."""

    module: nn.Module
    name: str
    source: str
    model_type: str
    embedding_layer: str
    pooling: str
    projected: bool
    tile_size: int

    @property
    def settings(self) -> dict[str, str]:
        return {
            "model": self.source,
            "model_type": self.model_type,
            "embedding_layer": self.embedding_layer,
            "pooling": self.pooling,
            "projected": str(self.projected).lower(),
        }

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        param = next(self.module.parameters())
        feats = batch["tile_features"].to(param.device, param.dtype)  # [B, N, D_in]
        coords, mask = batch["tile_coords"].to(param.device), batch["tile_mask"].to(param.device)
        if self.projected:
            out = self.module.get_slide_features(feats, coords, mask)  # projected, not normalised
        else:
            out = self.module(feats, coords, mask)
        return out.pooler_output.float()  # [B, D]


def load_embedding_model(
    model_name_or_path: str,
    *,
    embedding_layer: str | int | None = None,
    pooling: str | None = None,
    projected: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
    name: str | None = None,
    **hub_kwargs: Any,
) -> SlideEmbeddingModel:
    """A converted slide encoder, an ABMIL / mean tower or a WSI-CLIP checkpoint (its slide tower; with
    ``projected=True`` its projected slide embedding, the space zero-shot and retrieval use), loaded strictly.

    ``embedding_layer`` / ``pooling`` override the checkpoint's config (LongNet slide encoders only); ``None`` keeps
    it (a converted Prov-GigaPath checkpoint: layer 11, mean pooling, as TRIDENT and upstream fine-tuning).
    """
    from transformers import AutoModel

    import wsi_clip  # noqa: F401  (registers the model classes with the Auto classes)

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
    if projected:
        model = from_pretrained_strict(AutoModel, model_name_or_path, **hub_kwargs)
        if not hasattr(model, "get_slide_features"):
            raise ValueError(
                f"{model_name_or_path}: projected=True needs a WSI-CLIP checkpoint (it has a projection); this is a "
                f"{type(model).__name__}. Drop --projected to embed with the slide tower itself."
            )
        tower = find_slide_tower(model)
    else:
        model = tower = load_slide_tower(model_name_or_path, **hub_kwargs)
    model_type = str(getattr(tower.config, "model_type", type(tower).__name__))
    if embedding_layer is not None or pooling is not None:
        if model_type != SLIDE_ENCODER_MODEL_TYPE:
            raise ValueError(
                f"{model_name_or_path}: embedding_layer / pooling choose among the LongNet slide encoder's layers and "
                f"poolings; a {model_type!r} tower has one output. Drop those options."
            )
        config = tower.config.to_dict()
        if embedding_layer is not None:
            config["embedding_layer"] = str(embedding_layer)
        if pooling is not None:
            config["pooling"] = pooling
        tower.config = type(tower.config).from_dict(config)  # validates (layer range, pooling names)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    return SlideEmbeddingModel(
        module=model,
        name=name or default_model_name(model_name_or_path),
        source=str(model_name_or_path),
        model_type=model_type,
        embedding_layer=str(getattr(tower.config, "embedding_layer", "final")),
        pooling=str(getattr(tower.config, "pooling", getattr(tower.config, "model_type", ""))),
        projected=projected,
        tile_size=int(getattr(tower.config, "tile_size", 256)),
    )


def default_model_name(model_name_or_path: str) -> str:
    """The ``<name>`` of ``slide_features_<name>``: the checkpoint folder's name (a Hub id with ``/`` → ``_``)."""
    path = Path(str(model_name_or_path).rstrip("/"))
    name = path.name if path.exists() else str(model_name_or_path).replace("/", "_")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


@dataclass
class EmbeddingReport:
    """What a run did: slides written, skipped (already done) and failed (with the reason), and its speed."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    tiles: int = 0

    def merge(self, other: EmbeddingReport) -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.failed.update(other.failed)
        self.tiles += other.tiles
        self.seconds = max(self.seconds, other.seconds)


def slide_file(features_dir: Path, slide_id: str) -> Path:
    return features_dir / f"{slide_id}.h5"


def read_slide_embedding(path: str | Path) -> tuple[Tensor, dict[str, Any]]:
    """``features [D]`` float32 and the attributes of one per-slide file (TRIDENT's slide-feature layout)."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f["features"]
        return torch.from_numpy(ds[()]).float(), {k: _plain(v) for k, v in ds.attrs.items()}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def _completed(path: Path, settings: dict[str, str]) -> bool:
    """Whether ``path`` holds a finished embedding from these settings; another run's file is an error."""
    if not path.exists():
        return False
    try:
        _, attrs = read_slide_embedding(path)
    except (OSError, KeyError) as err:
        raise WSIDataError(
            f"{path}: exists but is not a readable slide-embedding file ({err}); delete it and run again."
        ) from err
    different = {k: (attrs.get(k), settings[k]) for k in _SETTINGS if str(attrs.get(k)) != settings[k]}
    if different:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in different.items())
        raise WSIDataError(
            f"{path}: was written by a run with other settings ({listed}). Use another --output_dir or --name, "
            "or delete the folder to start over."
        )
    return True


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)  # atomic on POSIX: readers see the old state or the whole new file


def write_slide_embedding(path: Path, embedding: Tensor, attrs: dict[str, Any]) -> None:
    """Write ``features [D]`` with ``attrs`` to a temporary file beside ``path`` and rename it into place."""
    import h5py

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("features", data=embedding.detach().cpu().float().numpy())
        ds.attrs.update({k: v for k, v in attrs.items() if v is not None})
    _publish(tmp, path)


def batches_by_size(
    sizes: Sequence[int], batch_size: int, max_batch_tiles: int, min_fill: float = MIN_BATCH_FILL
) -> list[list[int]]:
    """Indices into ``sizes`` (already sorted largest first) grouped into batches of at most ``batch_size`` slides
    whose padded size (slides × largest slide) stays within ``max_batch_tiles`` (a bigger slide goes alone) and whose
    slides each have at least ``min_fill`` × the largest one's tiles (padding is computed like real tiles)."""
    batches: list[list[int]] = []
    for i, size in enumerate(sizes):
        current = batches[-1] if batches else None
        if (
            current
            and len(current) < batch_size
            and (len(current) + 1) * sizes[current[0]] <= max_batch_tiles
            and size >= min_fill * sizes[current[0]]
        ):
            current.append(i)
        else:
            batches.append([i])
    return batches


def embed_cohort(
    slides: Sequence[dict[str, Any]],
    model: SlideEmbeddingModel,
    output_dir: str | Path,
    *,
    max_tiles: int | None = None,
    batch_size: int = 8,
    max_batch_tiles: int = 65536,
    patch_size_level0: int | None = None,
    skip_bad_samples: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> EmbeddingReport:
    """Embed this process's share of ``slides`` (rows ``{"slide_id", "h5_path"[, "patch_size_level0"]}``, e.g. from
    :func:`processing.annotations.list_slide_files`) into ``<output_dir>/slide_features_<model.name>/``.

    ``max_tiles``: a uniform (deterministic, spatially even) subset per slide; ``None`` embeds every tile.
    Raises :class:`WSIDataError` naming the slide and the reason on a bad slide, unless ``skip_bad_samples``.
    """
    from tqdm.auto import tqdm

    features_dir = Path(output_dir) / f"slide_features_{model.name}"
    features_dir.mkdir(parents=True, exist_ok=True)
    settings = {**model.settings, "max_tiles": str(max_tiles or "all")}
    report = EmbeddingReport()

    sizes: dict[str, int] = {}
    for row in slides:
        try:
            sizes[row["slide_id"]] = slide_num_tiles(row["h5_path"])
        except WSIDataError as err:
            sizes[row["slide_id"]] = -1  # sorted last, reported when its turn comes
            if not skip_bad_samples:
                raise WSIDataError(
                    f"slide {row['slide_id']}: {err} (pass --skip_bad_samples to embed the rest)"
                ) from err
    ordered = sorted(slides, key=lambda r: (-sizes[r["slide_id"]], r["slide_id"]))
    mine = ordered[rank::world_size]  # the same split whatever was already written
    for row in mine:
        for stale in features_dir.glob(f".{row['slide_id']}.h5.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
    todo = []
    for row in mine:
        if _completed(slide_file(features_dir, row["slide_id"]), settings):
            report.skipped.append(row["slide_id"])
        else:
            todo.append(row)
    capped = [max(1, min(sizes[r["slide_id"]], max_tiles or sizes[r["slide_id"]])) for r in todo]
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"embedding ({model.name})", unit="slide", disable=not progress or not todo)
    for batch_rows in batches_by_size(capped, batch_size, max_batch_tiles):
        loaded, kept = [], []
        for i in batch_rows:
            row = todo[i]
            try:
                slide = read_slide(
                    row["h5_path"],
                    max_tiles=max_tiles,
                    tile_sampling="uniform",
                    patch_size_level0=row_patch_size(row, patch_size_level0),
                )
            except WSIDataError as err:
                if not skip_bad_samples:
                    raise WSIDataError(
                        f"slide {row['slide_id']}: {err} (pass --skip_bad_samples to embed the rest)"
                    ) from err
                logger.warning("skipping slide %s: %s", row["slide_id"], err)
                report.failed[row["slide_id"]] = str(err)
                bar.update(1)
                continue
            loaded.append(slide)
            kept.append(row)
        if not loaded:
            continue
        try:
            embeddings = model(pad_slides(loaded, model.tile_size))  # [B, D]
        except (SlideFormatError, ValueError) as err:  # e.g. a feature dimension the model does not take
            if not skip_bad_samples:
                raise WSIDataError(
                    f"slides {[r['slide_id'] for r in kept]}: {err} (pass --skip_bad_samples to embed the rest)"
                ) from err
            for row in kept:
                report.failed[row["slide_id"]] = str(err)
            bar.update(len(kept))
            continue
        for row, slide, embedding in zip(kept, loaded, embeddings):
            attrs = {
                **settings,
                "name": row["slide_id"],
                "source_file": str(row["h5_path"]),
                "num_tiles": slide.num_tiles,
                "num_tiles_in_file": sizes[row["slide_id"]],
                "patch_size_level0": slide.patch_size_level0,
                "patch_size_source": slide.patch_size_source,
                "dtype": str(next(model.module.parameters()).dtype).replace("torch.", ""),
            }
            write_slide_embedding(slide_file(features_dir, row["slide_id"]), embedding, attrs)
            report.written.append(row["slide_id"])
            report.tiles += slide.num_tiles
        bar.update(len(kept))
        elapsed = time.perf_counter() - start
        bar.set_postfix(tiles_per_s=f"{report.tiles / max(elapsed, 1e-9):,.0f}")
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def write_cohort_file(slides: Sequence[dict[str, Any]], features_dir: str | Path) -> Path | None:
    """Gather every written per-slide file of ``slides`` (in their order) into ``embeddings.safetensors``
    (``embeddings [S, D]`` float32; metadata: ``slide_ids`` as JSON and the model settings) and ``index.csv``."""
    from safetensors.torch import save_file

    features_dir = Path(features_dir)
    vectors, rows, attrs = [], [], {}
    for row in slides:
        path = slide_file(features_dir, row["slide_id"])
        if not path.exists():
            continue
        vector, attrs = read_slide_embedding(path)
        vectors.append(vector)
        rows.append({"index": len(rows), "slide_id": row["slide_id"], "h5_path": row["h5_path"], **_counts(attrs)})
    if not vectors:
        return None
    metadata = {k: str(attrs[k]) for k in (*_SETTINGS, "model_type") if k in attrs}
    metadata["slide_ids"] = json.dumps([r["slide_id"] for r in rows])
    out = features_dir / COHORT_FILE
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({"embeddings": torch.stack(vectors)}, str(tmp), metadata=metadata)  # [S, D]
    _readable_by_all(tmp)
    _publish(tmp, out)
    index_tmp = features_dir / f".{INDEX_FILE}.{os.getpid()}.tmp"
    with index_tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _publish(index_tmp, features_dir / INDEX_FILE)
    return out


def _readable_by_all(path: Path) -> None:
    """The permissions of a normally created file (safetensors writes its file owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _counts(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: attrs.get(k) for k in ("num_tiles", "num_tiles_in_file", "patch_size_level0")}


def load_cohort_embeddings(path: str | Path) -> tuple[Tensor, list[str], dict[str, str]]:
    """``embeddings [S, D]``, the slide ids in row order and the settings of an ``embeddings.safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / COHORT_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        embeddings = f.get_tensor("embeddings")
    return embeddings, json.loads(metadata.pop("slide_ids", "[]")), metadata


__all__ = [
    "SlideEmbeddingModel",
    "EmbeddingReport",
    "load_embedding_model",
    "embed_cohort",
    "write_cohort_file",
    "load_cohort_embeddings",
    "read_slide_embedding",
    "batches_by_size",
    "default_model_name",
    "DTYPES",
]
