"""Convert an original Prov-GigaPath slide-encoder checkpoint into a Hugging Face folder.

Training-side module (not Hub-shipped). The command-line front end is ``wsi-convert-gigapath``
(``scripts/convert_gigapath.py`` in a checkout)::

    wsi-convert-gigapath --checkpoint slide_encoder.pth --output_dir gigapath-slide-encoder

Input: the ``"model"`` dict of the original ``slide_encoder.pth`` (loaded with ``weights_only=True``) or a
safetensors file / plain ``state_dict`` with the original key names. Depth, width, FFN width and input dim are
inferred from the tensors, heads default to 16 (every upstream configuration). Keys are checked strictly (the
12-layer model has 247); nothing is ever built silently from random weights.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from .configuration_slide_encoder import SlideEncoderConfig
from .modeling_slide_encoder import SlideEncoderModel

_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# Per-layer tensors of the original model (torchscale EncoderLayer with Sub-LN); same names on our side.
LAYER_PARAMS = tuple(
    f"{module}.{p}"
    for module in (
        "self_attn_layer_norm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "self_attn.inner_attn_ln",
        "final_layer_norm",
        "ffn.fc1",
        "ffn.fc2",
        "ffn.ffn_layernorm",
    )
    for p in ("weight", "bias")
)
# Top-level renames, original → ours (everything under encoder.layers.{i} keeps its name under layers.{i}).
TOP_LEVEL_KEYS = {
    "cls_token": "cls_token",
    "patch_embed.proj.weight": "patch_embed.weight",
    "patch_embed.proj.bias": "patch_embed.bias",
    "encoder.layer_norm.weight": "layer_norm.weight",
    "encoder.layer_norm.bias": "layer_norm.bias",
    "norm.weight": "head_norm.weight",
    "norm.bias": "head_norm.bias",
}


class GigaPathConversionError(ValueError):
    """The original checkpoint cannot be converted (unreadable file, wrong or missing keys, bad shapes)."""


def load_original_state_dict(checkpoint: str | Path) -> dict[str, Tensor]:
    """Tensors of an original checkpoint: ``.safetensors`` as is, a torch file's ``"model"`` entry (or the file
    itself when it is already a flat ``state_dict``), loaded with ``weights_only=True``."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass the path of the original "
            "slide_encoder.pth (hf_hub prov-gigapath/prov-gigapath) or a .safetensors state dict."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise GigaPathConversionError(
            f"{path}: torch.load(weights_only=True) refused the file ({str(err).splitlines()[0]}). It pickles "
            "objects other than tensors; if you trust it, re-save only its tensors: "
            "torch.save(torch.load(path, weights_only=False)['model'], 'slide_encoder_weights.pth') (or "
            "safetensors.torch.save_file(...)) and convert that file."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise GigaPathConversionError(
            f"{path}: expected a dict with a 'model' state_dict (the original "
            f"slide_encoder.pth) or a flat state_dict of tensors, found {found}."
        )
    return dict(obj)


def infer_config(
    state_dict: dict[str, Tensor],
    *,
    num_attention_heads: int = 16,
    max_wsi_size: int = 262144,
    tile_size: int = 256,
    slide_ngrids: int = 1000,
    pooling: str = "cls",
    source: str = "state_dict",
    **config_kwargs,
) -> SlideEncoderConfig:
    """Depth, width, FFN width and input dim from the tensors; the segment layout from ``max_wsi_size`` /
    ``tile_size`` exactly as upstream."""
    for key in ("patch_embed.proj.weight", "encoder.layers.0.ffn.fc1.weight"):
        if key not in state_dict:
            raise GigaPathConversionError(
                f"{source}: key {key!r} is missing, so this is not a Prov-GigaPath slide "
                f"encoder state_dict (first keys: {sorted(state_dict)[:6]})."
            )
    layer_ids = {int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k))}
    hidden, input_dim = state_dict["patch_embed.proj.weight"].shape
    return SlideEncoderConfig(
        input_dim=int(input_dim),
        hidden_size=int(hidden),
        num_hidden_layers=max(layer_ids) + 1,
        num_attention_heads=num_attention_heads,
        intermediate_size=int(state_dict["encoder.layers.0.ffn.fc1.weight"].shape[0]),
        max_wsi_size=max_wsi_size,
        tile_size=tile_size,
        slide_ngrids=slide_ngrids,
        pooling=pooling,
        **config_kwargs,
    )


def original_key_map(num_layers: int) -> dict[str, str]:
    """Every original key of a ``num_layers``-layer model → our key (12 layers: 247 keys)."""
    mapping = dict(TOP_LEVEL_KEYS)
    for i in range(num_layers):
        mapping.update({f"encoder.layers.{i}.{p}": f"layers.{i}.{p}" for p in LAYER_PARAMS})
    return mapping


def convert_state_dict(
    state_dict: dict[str, Tensor], config: SlideEncoderConfig, source: str = "state_dict"
) -> dict[str, Tensor]:
    """Rename original keys to ours after a strict check: same key set, same shapes, else one error with the diff."""
    mapping = original_key_map(config.num_hidden_layers)
    with torch.device("meta"):  # shapes only, no memory
        expected = SlideEncoderModel(config).state_dict()
    missing = sorted(k for k in mapping if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in mapping)
    wrong_shape = [
        f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(expected[mapping[k]].shape)})"
        for k in mapping
        if k in state_dict and state_dict[k].shape != expected[mapping[k]].shape
    ]
    if missing or unexpected or wrong_shape:
        lines = [
            f"{source}: the state_dict does not match the Prov-GigaPath slide encoder with "
            f"{config.num_hidden_layers} layers, width {config.hidden_size}, FFN {config.intermediate_size}, "
            f"input {config.input_dim} ({len(mapping)} keys expected, {len(state_dict)} found)."
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        if unexpected and all(k.startswith("module.") for k in unexpected):
            lines.append("  fix: the keys carry a DDP 'module.' prefix; strip it before converting.")
        else:
            lines.append(
                "  fix: pass the original slide_encoder.pth (its 'model' entry) or a state_dict saved from "
                "gigapath.slide_encoder.create_model(...) without renaming keys."
            )
        raise GigaPathConversionError("\n".join(lines))
    return {mapping[k]: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}


def convert_gigapath_checkpoint(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    max_wsi_size: int = 262144,
    tile_size: int = 256,
    pooling: str = "cls",
    num_attention_heads: int = 16,
    slide_ngrids: int = 1000,
) -> SlideEncoderModel:
    """Load, check and convert an original checkpoint; save it as an HF folder when ``output`` is given
    (``config.json`` + ``model.safetensors`` + the modeling code with ``auto_map``). Returns the model in eval mode."""
    source = str(checkpoint)
    original = load_original_state_dict(checkpoint)
    config = infer_config(
        original,
        num_attention_heads=num_attention_heads,
        max_wsi_size=max_wsi_size,
        tile_size=tile_size,
        slide_ngrids=slide_ngrids,
        pooling=pooling,
        source=source,
    )
    weights = convert_state_dict(original, config, source=source)
    model = SlideEncoderModel(config)
    model.load_state_dict(weights, strict=True)
    model.eval()
    if output is not None:
        model.save_pretrained(str(output))
    return model


__all__ = [
    "GigaPathConversionError",
    "convert_gigapath_checkpoint",
    "convert_state_dict",
    "infer_config",
    "load_original_state_dict",
    "original_key_map",
]
