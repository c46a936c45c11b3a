"""Configuration of WSI-LLaVA: slide encoder → visual-token selection → gamma-scaled projector → any causal LM.

Hub-shipped: ``save_pretrained`` copies this file and the files it imports next to the weights
(:mod:`.remote_code`), so it imports only stdlib, transformers and ``.sibling`` modules. The slide encoder's
configuration is ``wsi_clip``'s module: aliased by ``wsi_llava/__init__`` inside the package, the copy beside this
file in a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_slide_encoder import SlideEncoderConfig
from .remote_code import save_remote_code


class WSILlavaConfig(PretrainedConfig):
    r"""WSI-LLaVA = slide encoder (vision tower) + token selection + ``gamma · MLP`` projector + causal LM.

    Args:
        vision_config: :class:`SlideEncoderConfig` (or its dict) of the slide tower.
        text_config: config (or dict with ``model_type``) of any Hugging Face causal LM.
        slide_token_id: id of the slide placeholder token in the LM vocabulary (``WSIProcessor.slide_token_id``);
            each prompt holds it exactly once and the model splices the slide's visual tokens there.
        vision_feature_layer: ``-1``: the tower's ``last_hidden_state`` (after the final LayerNorm); another index
            ``i``: the raw ``hidden_states[i]``. The CLS token is never a visual token.
        projector_hidden_act / projector_bias: the 2-layer MLP ``Linear(D → H) → act → Linear(H → H)``.
        projector_gamma_init: initial ``gamma``. ``None`` (default) applies the RMS rule: ``gamma₀ =
            rms(LM input embeddings) / rms(MLP(u))`` with ``u`` a fixed probe of standard-normal vectors (the
            statistics of LayerNorm-ed tower outputs), so projected visual tokens start at the LM's token scale.
        token_selection: name of a registered token selector (``none``, ``uniform``, ``prumerge``,
            ``prumerge_plus``, ``topk_prompt`` or one registered with ``wsi_llava.register_token_selector``).
        token_selection_kwargs: options passed to the selector (e.g. ``{"max_tokens": 256}``).
        prepend_slide_embedding: put the slide tower's pooled slide embedding (its ``pooler_output``: CLS or mean
            pooling, as the tower is configured) through the projector as the first visual token, before the selected
            tiles. Tile tokens alone carry the slide-level diagnosis weakly (demo: a linear probe on the mean of the
            PruMerge+ tokens reaches 0.70 test accuracy, on the tower's slide embedding 1.00); the slide embedding is
            what WSI-CLIP trained. Default False here, so checkpoints saved before the option behave as trained;
            ``from_parts`` and ``train_llava.py`` turn it on for new models.
    """

    model_type = "wsi_llava"
    sub_configs_defaults = {
        # The slide config is referenced by class: an AutoConfig spec would resolve through the static
        # CONFIG_MAPPING and fail under remote code ("Unrecognized model type for subconfig").
        "vision_config": SubConfigSpec(config_class=SlideEncoderConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    slide_token_id: int | None = None
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    projector_gamma_init: float | None = None
    token_selection: str = "none"
    token_selection_kwargs: dict[str, Any] | None = None
    prepend_slide_embedding: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.token_selection_kwargs is None:
            self.token_selection_kwargs = {}
        super().__post_init__(**kwargs)
        # Like LlavaConfig: LMs that tie lm_head to the input embeddings store that in their own config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if not isinstance(self.token_selection, str) or not self.token_selection:
            raise ValueError(
                f"token_selection={self.token_selection!r} must be the name of a registered selector "
                "(e.g. 'none', 'uniform', 'prumerge', 'prumerge_plus', 'topk_prompt')."
            )
        if not isinstance(self.token_selection_kwargs, dict):
            raise ValueError(
                f"token_selection_kwargs must be a dict of selector options, got "
                f"{type(self.token_selection_kwargs).__name__}."
            )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """As ``PretrainedConfig.save_pretrained``, with the Python files beside ``config.json`` and ``auto_map``
        naming them (model saves go through here too). Why not ``register_for_auto_class``: see :mod:`.remote_code`."""
        save_remote_code(self, save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["WSILlavaConfig"]
