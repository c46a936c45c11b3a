"""Loading a slide tower from wherever users keep one: the one loader WSI-CLIP and WSI-LLaVA both use.

A tower checkpoint (a converted Prov-GigaPath ``SlideEncoderModel``, an ABMIL or mean-pooling tower), a WSI-CLIP
checkpoint (its ``slide_model``), or a model instance holding one. Loading is strict: ``from_pretrained`` only *warns*
about missing or unexpected weights and leaves random ones in place, so a checkpoint with renamed keys would train or
embed from noise without a word.

Hub-shipped with the modeling files that build models from parts (imports only torch and transformers).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

SLIDE_ENCODER_MODEL_TYPE = "wsi_slide_encoder"
SLIDE_TOWER_MODEL_TYPES = (SLIDE_ENCODER_MODEL_TYPE, "wsi_abmil", "wsi_mean_pool")


class SlideCheckpointError(ValueError):
    """A slide-tower checkpoint's weights do not match its config (missing, unexpected or reshaped keys)."""


def from_pretrained_strict(model_class: Any, path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """``model_class.from_pretrained(path)`` (a model class or an ``Auto…`` class) that refuses missing, unexpected
    or mismatched weights instead of warning."""
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {
        k: sorted(str(x) for x in info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(
            f"{k.replace('_', ' ')} ({len(v)}): {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
            for k, v in problems.items()
        )
        raise SlideCheckpointError(
            f"{path}: the weights do not match {type(model).__name__} as configured by its "
            f"config.json: {listed}. Fix: re-convert the original checkpoint with "
            "wsi-convert-gigapath (it checks every key), or re-save the model with "
            "save_pretrained; do not edit the weight files by hand."
        )
    return model


def find_slide_tower(model: nn.Module, model_types: tuple[str, ...] = SLIDE_TOWER_MODEL_TYPES) -> nn.Module:
    """The slide tower inside ``model``: the model itself or its first sub-module whose ``config.model_type`` is one
    of ``model_types`` (duck-typed, so remote-code classes work too)."""
    for _, sub in model.named_modules():
        if getattr(getattr(sub, "config", None), "model_type", None) in model_types:
            return sub
    raise ValueError(
        f"{type(model).__name__} holds no slide tower (no sub-module with config.model_type in "
        f"{list(model_types)}); pass a slide-encoder or WSI-CLIP model / checkpoint."
    )


def load_slide_tower(
    source: str | os.PathLike | nn.Module, model_types: tuple[str, ...] = SLIDE_TOWER_MODEL_TYPES, **hub_kwargs: Any
) -> nn.Module:
    """A slide tower (``config.model_type`` in ``model_types``) from a model instance or a folder / Hub id holding a
    tower or a WSI-CLIP checkpoint. The checkpoint's classes must be registered (``import wsi_clip``) or shipped with
    it (``trust_remote_code=True`` in ``hub_kwargs``)."""
    if isinstance(source, nn.Module):
        return find_slide_tower(source, model_types)
    from transformers.utils import cached_file

    with open(cached_file(str(source), "config.json", **hub_kwargs), encoding="utf-8") as fh:
        model_type = json.load(fh).get("model_type")
    kinds = ", ".join(repr(t) for t in model_types)
    if model_type not in model_types and model_type != "wsi_clip":
        raise ValueError(
            f"{source}: config.json has model_type {model_type!r}; a slide tower must be one of {kinds} "
            "(e.g. a converted Prov-GigaPath encoder) or a 'wsi_clip' checkpoint holding one."
        )
    return find_slide_tower(from_pretrained_strict(AutoModel, str(source), **hub_kwargs), model_types)


def read_state_dict(source: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Tensor]:
    """Every tensor of a safetensors checkpoint (one file or an index of shards), from a folder or Hub id."""
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    source = str(source)
    single = cached_file(source, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if single is not None:
        return load_file(single)
    index = cached_file(
        source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if index is None:
        raise FileNotFoundError(
            f"{source}: no model.safetensors(.index.json) found; save the checkpoint with "
            "save_pretrained (safetensors)."
        )
    with open(index, encoding="utf-8") as fh:
        shards = sorted(set(json.load(fh)["weight_map"].values()))
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(cached_file(source, shard, **hub_kwargs)))
    return state


__all__ = [
    "load_slide_tower",
    "find_slide_tower",
    "from_pretrained_strict",
    "read_state_dict",
    "SlideCheckpointError",
    "SLIDE_ENCODER_MODEL_TYPE",
    "SLIDE_TOWER_MODEL_TYPES",
]
