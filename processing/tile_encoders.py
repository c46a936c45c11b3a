"""Tile encoders behind one small interface: image tiles → ``[B, D]`` features.

Two kinds, chosen by the name:

* ``timm:<model>`` (``timm`` installed): a timm model with its pretrained config's transform — the Prov-GigaPath and
  GigaPath-Flash tile encoders (``timm:hf_hub:prov-gigapath/prov-gigapath``), UNI, Virchow … ``weights=`` a local
  ``.bin`` / ``.safetensors`` / ``.pth`` file loads offline;
* anything else: a ``transformers`` vision backbone (``AutoModel`` + ``AutoImageProcessor``) from a local folder or a
  Hub id — Phikon / Phikon-v2, Hibou, any DINOv2 or ViT checkpoint; the tile feature is the CLS token of the last
  hidden state (``pooling="cls"``), the model's pooler, or the mean of the patch tokens.

Nothing is downloaded unless ``allow_download=True`` (a Hub id then fills the local cache once; later runs work
offline). The preprocessing is a separate, picklable object so DataLoader workers run it beside the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POOLINGS = ("cls", "pooler", "mean")


@dataclass
class TilePreprocessor:
    """``[H, W, 3]`` uint8 RGB tile → ``[3, h, w]`` float32 model input (picklable, for DataLoader workers)."""

    kind: str  # "hf" or "timm"
    transform: Any  # an HF image processor, or a timm / torchvision transform

    def __call__(self, tile: np.ndarray) -> Tensor:
        if self.kind == "hf":
            return self.transform(images=tile, return_tensors="pt")["pixel_values"][0]
        from PIL import Image

        return self.transform(Image.fromarray(tile))


class TileEncoder(nn.Module):
    """A vision backbone returning one ``[D]`` vector per tile; ``preprocess`` turns tiles into its inputs."""

    def __init__(self, model: nn.Module, preprocess: TilePreprocessor, embed_dim: int, name: str, pooling: str):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.embed_dim = embed_dim
        self.name = name
        self.pooling = pooling

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, h, w]`` → ``[B, D]`` float32."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.preprocess.kind == "timm":
            return self.model(pixel_values).float()  # timm: num_classes=0 gives the pooled feature
        out = self.model(pixel_values=pixel_values)
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"{self.name}: the model has no pooler output; use pooling 'cls' or 'mean'.")
            return out.pooler_output.float()
        hidden = out.last_hidden_state  # [B, 1 + P (+ registers), D]
        return (hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1)).float()


def _read_weights(path: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: no pickled code runs)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _load_timm(name: str, weights: str | None, allow_download: bool) -> tuple[nn.Module, TilePreprocessor, int]:
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"encoder {name!r} needs timm: pip install timm (with a torchvision matching torch)."
        ) from err
    if not weights and not allow_download:
        raise ValueError(
            f"timm encoder {name!r}: give local weights (--encoder_weights FILE) or allow the download "
            "(--allow_download true); it would otherwise run with random weights."
        )
    # local weights: build the architecture without pretrained weights, then load the file (timm's own `file`
    # overlay is ignored for hf_hub: names, which would fetch from the Hub)
    model = timm.create_model(name, pretrained=not weights, num_classes=0)
    if weights:
        model.load_state_dict(_read_weights(weights), strict=False)
    config = timm.data.resolve_data_config({}, model=model)
    return model, TilePreprocessor("timm", timm.data.create_transform(**config)), int(model.num_features)


def _load_transformers(name: str, allow_download: bool) -> tuple[nn.Module, TilePreprocessor, int]:
    from transformers import AutoImageProcessor, AutoModel

    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    try:
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=not allow_download)
        model = AutoModel.from_pretrained(source, local_files_only=not allow_download)
    except OSError as err:
        hint = "" if allow_download or local.exists() else " (not a local folder; --allow_download true fetches it)"
        raise OSError(f"tile encoder {name!r}: cannot load an AutoModel + AutoImageProcessor{hint}: {err}") from err
    if hasattr(processor, "do_convert_rgb"):
        processor.do_convert_rgb = False  # tiles already are RGB arrays
    embed_dim = getattr(model.config, "hidden_size", None) or getattr(model.config, "embed_dim", None)
    return model, TilePreprocessor("hf", processor), int(embed_dim)


def load_tile_encoder(
    name: str,
    *,
    weights: str | None = None,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    pooling: str = "cls",
    allow_download: bool = False,
) -> TileEncoder:
    """A :class:`TileEncoder` in eval mode: ``timm:<model>`` or a ``transformers`` folder / Hub id (see the module
    docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}.")
    if name.startswith("timm:"):
        model, preprocess, embed_dim = _load_timm(name[len("timm:") :], weights, allow_download)
    else:
        if weights:
            raise ValueError(f"weights= is for timm encoders; {name!r} loads its weights from its folder.")
        model, preprocess, embed_dim = _load_transformers(name, allow_download)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    return TileEncoder(model, preprocess, embed_dim, name, pooling)


__all__ = ["DTYPES", "TileEncoder", "TilePreprocessor", "load_tile_encoder"]
