"""Convert an original Prov-GigaPath slide-encoder checkpoint into a Hugging Face folder.

Training-side module (not Hub-shipped). The command-line front end is ``wsi-convert-gigapath``
(``scripts/convert_gigapath.py`` in a checkout)::

    wsi-convert-gigapath --checkpoint slide_encoder.pth --output_dir gigapath-slide-encoder

Input: the ``"model"`` dict of the original ``slide_encoder.pth`` (loaded with ``weights_only=True``) or a
safetensors file / plain ``state_dict`` with the original key names. Depth, width, FFN width and input dim are
inferred from the tensors; the attention heads (which no tensor shape reveals) come from upstream's LongNet
configuration table (:data:`LONGNET_CONFIGS`), looked up by (depth, width, FFN). Every model of the upstream
family converts, the released ``gigapath_slide_enc12l768d`` and Prov-GigaPath-Flash
(``gigapath_slide_enc12l384d``, 384-d tile features) included. Keys are checked strictly (the 12-layer model has
247); nothing is ever built silently from random weights.

Default output (``pooler_output``) of a converted checkpoint: mean pooling, and for 12-layer models the raw output
of layer 11 (``embedding_layer="11"``, no final LayerNorm), else the final state. That is what TRIDENT's GigaPath
wrapper and upstream's fine-tuning scripts (``FEATLAYER="11"``, ``global_pool``) use; the released CLS token was
never trained. The upstream default call ``model(x, coords)`` is ``pooling="cls", embedding_layer="final"``.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .configuration_slide_encoder import SlideEncoderConfig
from .modeling_slide_encoder import SlideEncoderModel

logger = logging.getLogger(__name__)


class LongNetConfigEntry(NamedTuple):
    """One configuration of upstream ``gigapath/torchscale/model/LongNetConfig.py``."""

    name: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    timm_arch: str = ""  # the gigapath.slide_encoder model registered with timm, if any


# Upstream ``make_longnet_from_name`` takes only depth, width, FFN width and heads from this table (it overwrites
# ``dilated_ratio`` with [1, 2, 4, 8, 16] and ``segment_length`` with the one LongNetViT computes from
# max_wsi_size / tile_size, which SlideEncoderConfig reproduces). ``LongNetViT`` names its encoder
# ``LongNet_{depth}_layers_{dim}_dim`` (+ ``_mlp{ratio}`` when mlp_ratio != 4), so the ``LongNet_Vanilla_*`` and
# ``LongNet_test`` entries of the upstream file are unreachable from a slide-encoder checkpoint and left out
# (``LongNet_Vanilla_12_layers_256_dim`` would also collide with the 12-layer 256-d mlp2 shape, with 8 heads).
LONGNET_CONFIGS: tuple[LongNetConfigEntry, ...] = (
    LongNetConfigEntry("LongNet_8_layers_256_dim_mlp2", 8, 256, 512, 16),
    LongNetConfigEntry("LongNet_12_layers_256_dim_mlp2", 12, 256, 512, 16),
    LongNetConfigEntry("LongNet_8_layers_256_dim", 8, 256, 1024, 16),
    LongNetConfigEntry("LongNet_12_layers_256_dim", 12, 256, 1024, 16),
    LongNetConfigEntry("LongNet_3_layers_384_dim", 3, 384, 1536, 16),
    LongNetConfigEntry("LongNet_6_layers_384_dim", 6, 384, 1536, 16),
    LongNetConfigEntry("LongNet_12_layers_384_dim", 12, 384, 1536, 16, "gigapath_slide_enc12l384d"),  # Flash
    LongNetConfigEntry("LongNet_12_layers_512_dim", 12, 512, 1024, 8),
    LongNetConfigEntry("LongNet_3_layers_768_dim", 3, 768, 3072, 16),
    LongNetConfigEntry("LongNet_6_layers_768_dim", 6, 768, 3072, 16),
    LongNetConfigEntry("LongNet_8_layers_768_dim", 8, 768, 3072, 16),
    LongNetConfigEntry("LongNet_12_layers_768_dim", 12, 768, 3072, 16, "gigapath_slide_enc12l768d"),  # released
    LongNetConfigEntry("LongNet_8_layers_1024_dim", 8, 1024, 4096, 16),
    LongNetConfigEntry("LongNet_24_layers_1024_dim", 24, 1024, 4096, 16, "gigapath_slide_enc24l1024d"),
    LongNetConfigEntry("LongNet_3_layers_1536_dim", 3, 1536, 6144, 16),
    LongNetConfigEntry("LongNet_6_layers_1536_dim", 6, 1536, 6144, 16),
    LongNetConfigEntry("LongNet_8_layers_1536_dim", 8, 1536, 6144, 16),
    LongNetConfigEntry("LongNet_12_layers_1536_dim", 12, 1536, 6144, 16, "gigapath_slide_enc12l1536d"),
)
_BY_SHAPE = {(c.num_hidden_layers, c.hidden_size, c.intermediate_size): c for c in LONGNET_CONFIGS}  # all distinct

# 12-layer upstream models are used through layer 11 of the all-layer outputs (TRIDENT, upstream fine-tuning).
FEATURE_LAYER_12L = "11"


def find_longnet_config(num_layers: int, hidden_size: int, intermediate_size: int) -> LongNetConfigEntry | None:
    """The upstream LongNet configuration with this depth, width and FFN width, or ``None``."""
    return _BY_SHAPE.get((int(num_layers), int(hidden_size), int(intermediate_size)))


def describe_longnet_config(entry: LongNetConfigEntry | None) -> str:
    """``LongNet_12_layers_384_dim (gigapath_slide_enc12l384d)`` / ``not an upstream configuration``."""
    if entry is None:
        return "not an upstream LongNet configuration"
    return entry.name + (f" ({entry.timm_arch})" if entry.timm_arch else "")


def default_output(num_layers: int) -> tuple[str, str]:
    """``(pooling, embedding_layer)`` of a converted checkpoint: mean pooling of layer 11 for 12-layer models (what
    TRIDENT and upstream fine-tuning use: ``FEATLAYER="11"``, ``global_pool``), of the final state otherwise. The
    released CLS token was never trained, so ``"cls"`` is opt-in."""
    return "mean", (FEATURE_LAYER_12L if num_layers == 12 else "final")


def _describe_layer(embedding_layer: str) -> str:
    if embedding_layer == "final":
        return "the final state (after the encoder LayerNorm)"
    return f"all_layer_embed[{embedding_layer}] (no final LayerNorm)"


def _known_configs() -> str:
    return "; ".join(
        f"{c.name}: {c.num_hidden_layers} layers, width {c.hidden_size}, FFN {c.intermediate_size}, "
        f"{c.num_attention_heads} heads"
        for c in LONGNET_CONFIGS
    )


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
    num_attention_heads: int | None = None,
    max_wsi_size: int = 262144,
    tile_size: int = 256,
    slide_ngrids: int = 1000,
    pooling: str | None = None,
    embedding_layer: str | int | None = None,
    source: str = "state_dict",
    **config_kwargs,
) -> SlideEncoderConfig:
    """Depth, width, FFN width and input dim from the tensors; heads from :data:`LONGNET_CONFIGS`; the segment layout
    from ``max_wsi_size`` / ``tile_size`` exactly as upstream.

    ``num_attention_heads=None``: from the upstream table (a shape not in it raises
    :class:`GigaPathConversionError`); a value overrides the table (with a warning when they disagree).
    ``pooling`` / ``embedding_layer`` are passed through as given; ``None`` takes :func:`default_output`.
    Tensors may live on the ``meta`` device (only shapes are read).
    """
    for key in ("patch_embed.proj.weight", "encoder.layers.0.ffn.fc1.weight"):
        if key not in state_dict:
            raise GigaPathConversionError(
                f"{source}: key {key!r} is missing, so this is not a Prov-GigaPath slide "
                f"encoder state_dict (first keys: {sorted(state_dict)[:6]})."
            )
    layer_ids = {int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k))}
    hidden, input_dim = (int(n) for n in state_dict["patch_embed.proj.weight"].shape)
    num_layers = max(layer_ids) + 1
    ffn = int(state_dict["encoder.layers.0.ffn.fc1.weight"].shape[0])
    shape = f"{num_layers} layers, width {hidden}, FFN {ffn}"
    entry = find_longnet_config(num_layers, hidden, ffn)
    if num_attention_heads is None:
        if entry is None:
            raise GigaPathConversionError(
                f"{source}: the inferred shape ({shape}, input {input_dim}) is not an upstream LongNet "
                f"configuration, so the number of attention heads is unknown (no tensor shape reveals it). "
                f"Known configurations: {_known_configs()}. Pass --num_attention_heads (num_attention_heads=...) "
                "with the value the checkpoint was trained with."
            )
        num_attention_heads = entry.num_attention_heads
    elif entry is not None and num_attention_heads != entry.num_attention_heads:
        logger.warning(
            "%s: num_attention_heads=%d overrides the %d heads of the upstream configuration %s (%s)",
            source,
            num_attention_heads,
            entry.num_attention_heads,
            entry.name,
            shape,
        )
    elif entry is None:
        logger.warning(
            "%s: %s is not an upstream LongNet configuration; using num_attention_heads=%d as given",
            source,
            shape,
            num_attention_heads,
        )
    default_pooling, default_layer = default_output(num_layers)
    return SlideEncoderConfig(
        input_dim=input_dim,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=int(num_attention_heads),
        intermediate_size=ffn,
        max_wsi_size=max_wsi_size,
        tile_size=tile_size,
        slide_ngrids=slide_ngrids,
        pooling=default_pooling if pooling is None else pooling,
        embedding_layer=default_layer if embedding_layer is None else embedding_layer,
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
    pooling: str | None = None,
    embedding_layer: str | int | None = None,
    num_attention_heads: int | None = None,
    slide_ngrids: int = 1000,
) -> SlideEncoderModel:
    """Load, check and convert an original checkpoint; save it as an HF folder when ``output`` is given
    (``config.json`` + ``model.safetensors`` + the modeling code with ``auto_map``). Returns the model in eval mode.

    Heads: ``None`` = from the upstream LongNet table (:data:`LONGNET_CONFIGS`); a value overrides it.
    Output layer: ``pooling=None`` → ``"mean"``; ``embedding_layer=None`` → ``"11"`` for 12-layer models (the raw
    output of layer 11, no final LayerNorm), ``"final"`` for other depths. Reason: TRIDENT's GigaPath wrapper and
    upstream's fine-tuning scripts (``FEATLAYER="11"``, ``global_pool``) use layer 11 of the all-layer outputs with
    mean pooling, and the released CLS token was never trained. ``pooling="cls", embedding_layer="final"`` is the
    upstream default call ``model(x, coords)``.
    """
    source = str(checkpoint)
    original = load_original_state_dict(checkpoint)
    config = infer_config(
        original,
        num_attention_heads=num_attention_heads,
        max_wsi_size=max_wsi_size,
        tile_size=tile_size,
        slide_ngrids=slide_ngrids,
        pooling=pooling,
        embedding_layer=embedding_layer,
        source=source,
    )
    weights = convert_state_dict(original, config, source=source)
    with torch.device("meta"):  # no random init of weights that are replaced right away
        model = SlideEncoderModel(config)
    model.load_state_dict(weights, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # every tensor of the model must come from the checkpoint
        raise GigaPathConversionError(f"{source}: no weights for {left[:10]} after conversion.")
    model.eval()
    logger.info(
        "%s: %s, %d layers, width %d, %d heads, FFN %d, input %d; pooler_output: %s pooling of %s",
        source,
        describe_longnet_config(
            find_longnet_config(config.num_hidden_layers, config.hidden_size, config.intermediate_size)
        ),
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.input_dim,
        config.pooling,
        _describe_layer(config.embedding_layer),
    )
    if output is not None:
        model.save_pretrained(str(output))
    return model


__all__ = [
    "LONGNET_CONFIGS",
    "GigaPathConversionError",
    "LongNetConfigEntry",
    "convert_gigapath_checkpoint",
    "convert_state_dict",
    "default_output",
    "describe_longnet_config",
    "find_longnet_config",
    "infer_config",
    "load_original_state_dict",
    "original_key_map",
]
