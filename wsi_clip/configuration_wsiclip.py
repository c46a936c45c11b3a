"""Configurations of WSI-CLIP: a slide tower + a Hugging Face text encoder, projected into one embedding space.

Hub-shipped: ``save_pretrained`` copies this file (and ``configuration_slide_encoder.py``) next to the weights, so
it imports only stdlib, transformers and ``.sibling`` modules. Sub-configs of our own types are referenced **by
class** (``AutoConfig`` only knows them in-process, not under ``trust_remote_code``), and never ``isinstance``-checked
(remote code loads them from a different module): the slide tower is chosen by the ``model_type`` string.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_slide_encoder import SlideEncoderConfig

TEXT_POOLING_MODES = ("mean", "cls", "pooler")
TEXT_TO_SLIDE_LOSSES = ("soft", "mil_nce")


class ABMILConfig(PretrainedConfig):
    r"""Gated attention-based MIL pooler (Ilse et al., 2018): a cheap, position-free slide tower.

    ``h = tile_mlp(x)``; ``a = softmax_n(w · (tanh(V h) ⊙ sigmoid(U h)))`` over the real tiles; slide = ``Σ a_n h_n``.

    Args:
        input_dim: tile feature dimension (1536 for Prov-GigaPath tile features).
        hidden_size: width of the tile MLP and of the pooled slide vector.
        attention_dim: width of the attention network (``V``, ``U``).
        num_tile_layers: depth of the tile MLP (``Linear + GELU + Dropout`` blocks).
        gated: gated attention (``tanh ⊙ sigmoid``); ``False`` uses plain ``tanh`` attention.
        dropout: dropout in the tile MLP and the attention network.
        initializer_range: unused by the xavier init of the linears; kept for HF tooling.
        normalize_tile_features: standardise each input dimension with training-set statistics held as buffers
            (as :class:`SlideEncoderConfig`; set by ``wsi-train-clip``).
    """

    model_type = "wsi_abmil"

    input_dim: int = 1536
    hidden_size: int = 512
    attention_dim: int = 256
    num_tile_layers: int = 1
    gated: bool = True
    dropout: float = 0.25
    initializer_range: float = 0.02
    normalize_tile_features: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if min(self.input_dim, self.hidden_size, self.attention_dim) < 1 or self.num_tile_layers < 1:
            raise ValueError(
                f"ABMILConfig: input_dim={self.input_dim}, hidden_size={self.hidden_size}, attention_dim="
                f"{self.attention_dim} and num_tile_layers={self.num_tile_layers} must be positive."
            )


class MeanPoolingConfig(PretrainedConfig):
    r"""Mean pooling over the real tiles, optionally after a tile MLP: the cheapest slide tower (a baseline).

    Args:
        input_dim: tile feature dimension.
        hidden_size: width of a ``Linear + GELU`` tile MLP applied before the mean; ``None`` pools the raw features
            (the slide vector then has ``input_dim`` channels and only the projection is learnt).
        dropout: dropout after the tile MLP.
        normalize_tile_features: standardise each input dimension with training-set statistics held as buffers
            (as :class:`SlideEncoderConfig`; set by ``wsi-train-clip``).
    """

    model_type = "wsi_mean_pool"

    input_dim: int = 1536
    hidden_size: int | None = None
    dropout: float = 0.0
    initializer_range: float = 0.02
    normalize_tile_features: bool = False


# slide_tower name → (config class, model_type). The model_type string is what identifies a tower everywhere.
SLIDE_TOWERS: dict[str, type[PretrainedConfig]] = {
    "slide_encoder": SlideEncoderConfig,
    "abmil": ABMILConfig,
    "mean": MeanPoolingConfig,
}
_TOWER_BY_MODEL_TYPE = {cls.model_type: name for name, cls in SLIDE_TOWERS.items()}


def slide_tower_name(slide_config: PretrainedConfig | dict) -> str | None:
    """``"slide_encoder"`` / ``"abmil"`` / ``"mean"`` for a slide config (object or dict), ``None`` if unknown."""
    model_type = (
        slide_config.get("model_type") if isinstance(slide_config, dict) else getattr(slide_config, "model_type", None)
    )
    return _TOWER_BY_MODEL_TYPE.get(model_type)


def slide_output_dim(slide_config: PretrainedConfig) -> int:
    """Channels of the slide tower's pooled vector (``hidden_size``, or ``input_dim`` for raw mean pooling)."""
    return getattr(slide_config, "hidden_size", None) or slide_config.input_dim


class WSIClipConfig(PretrainedConfig):
    r"""WSI-CLIP: slide tower + text encoder + linear projections + learnable temperature.

    Args:
        slide_tower: which slide tower to build: ``"slide_encoder"`` (Prov-GigaPath LongNet,
            :class:`SlideEncoderConfig`), ``"abmil"`` (gated attention MIL, :class:`ABMILConfig`) or ``"mean"``
            (:class:`MeanPoolingConfig`).
            When ``slide_config`` carries a ``model_type`` (a config object, or a dict read from ``config.json``),
            that ``model_type`` decides and ``slide_tower`` is set to match.
        slide_config: the slide tower's config (object or dict; ``None`` = the tower's defaults).
        text_config: any Hugging Face text-encoder config (object or dict with ``model_type``; ``None`` = BERT-base).
            BERT, RoBERTa, (Modern)BERT-like and sentence-transformers encoders work.
        projection_dim: size of the shared embedding space.
        text_pooling: how a text becomes one vector before the projection: ``"mean"`` over real tokens (right for
            sentence-transformers encoders such as all-MiniLM-L6-v2), ``"cls"`` (first token of the last layer) or
            ``"pooler"`` (the encoder's own pooler output, e.g. BERT's tanh head).
        logit_scale_init_value: initial ``log`` of the inverse temperature, ``log(1 / 0.07)`` as in CLIP.
        logit_scale_max: upper bound of ``logit_scale`` (``log(100)`` as in CLIP); ``None`` disables the clamp.
            The model clamps in ``forward``; :class:`~wsi_clip.trainer.WSIClipTrainer` also clamps the parameter
            after each step.
        text_to_slide_loss: ``"soft"`` (soft-target cross-entropy over the case's slides, symmetric with slide→text)
            or ``"mil_nce"`` (only the best-matching slides need to match the report).
        identical_texts_are_positives: count identical captions in a batch as positives (duplicated template captions
            are not negatives of each other).
    """

    model_type = "wsi_clip"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    slide_tower: str = "slide_encoder"
    slide_config: PretrainedConfig | dict | None = None
    text_config: PretrainedConfig | dict | None = None
    projection_dim: int = 512
    text_pooling: str = "mean"
    logit_scale_init_value: float | int = math.log(1 / 0.07)
    logit_scale_max: float | int | None = math.log(100.0)
    text_to_slide_loss: str = "soft"
    identical_texts_are_positives: bool = True

    def __post_init__(self, **kwargs):
        self.slide_config = self._build_slide_config(self.slide_tower, self.slide_config)
        self.slide_tower = slide_tower_name(self.slide_config)
        super().__post_init__(**kwargs)
        if self.text_pooling not in TEXT_POOLING_MODES:
            raise ValueError(f"WSIClipConfig: text_pooling={self.text_pooling!r} is not one of {TEXT_POOLING_MODES}.")
        if self.text_to_slide_loss not in TEXT_TO_SLIDE_LOSSES:
            raise ValueError(
                f"WSIClipConfig: text_to_slide_loss={self.text_to_slide_loss!r} is not one of {TEXT_TO_SLIDE_LOSSES}."
            )
        if self.projection_dim < 1:
            raise ValueError(f"WSIClipConfig: projection_dim={self.projection_dim} must be positive.")

    @staticmethod
    def _build_slide_config(slide_tower: str, slide_config: Any) -> PretrainedConfig:
        """Slide config object of the right class: ``slide_config``'s ``model_type`` wins over ``slide_tower``."""
        if slide_config is not None and not isinstance(slide_config, (dict, PretrainedConfig)):
            raise TypeError(
                f"WSIClipConfig: slide_config must be a dict, a config object or None, got "
                f"{type(slide_config).__name__}."
            )
        name = slide_tower_name(slide_config) if slide_config is not None else None
        if (
            slide_config is not None
            and name is None
            and (isinstance(slide_config, PretrainedConfig) or "model_type" in slide_config)
        ):
            found = getattr(slide_config, "model_type", None) or slide_config.get("model_type")
            raise ValueError(
                f"WSIClipConfig: slide_config has model_type {found!r}; expected one of "
                f"{sorted(_TOWER_BY_MODEL_TYPE)} (slide_tower {sorted(SLIDE_TOWERS)})."
            )
        name = name or slide_tower
        if name not in SLIDE_TOWERS:
            raise ValueError(f"WSIClipConfig: slide_tower={name!r} is not one of {sorted(SLIDE_TOWERS)}.")
        if isinstance(slide_config, PretrainedConfig):
            return slide_config
        values = {k: v for k, v in (slide_config or {}).items() if k not in ("model_type", "transformers_version")}
        return SLIDE_TOWERS[name](**values)

    @property
    def slide_embed_dim(self) -> int:
        """Channels of the slide tower's pooled vector (input of the slide projection)."""
        return slide_output_dim(self.slide_config)


__all__ = [
    "WSIClipConfig",
    "ABMILConfig",
    "MeanPoolingConfig",
    "SLIDE_TOWERS",
    "TEXT_POOLING_MODES",
    "TEXT_TO_SLIDE_LOSSES",
    "slide_tower_name",
    "slide_output_dim",
]
