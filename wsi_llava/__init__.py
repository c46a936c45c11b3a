"""WSI-LLaVA: a slide encoder under any causal LM through visual-token selection and a gamma-scaled projector.

Importing the package registers ``WSILlavaConfig`` with ``AutoConfig``, ``WSILlavaModel`` with ``AutoModel``,
``WSILlavaForConditionalGeneration`` with ``AutoModelForImageTextToText``, ``WSIProcessor`` with ``AutoProcessor``
and the ``wsi_llava`` checkpoint kind with :mod:`wsi_clip.hub` (in-process). Saved checkpoints carry their code and
``auto_map`` (:mod:`wsi_llava.remote_code`), so they also load with ``trust_remote_code=True`` where this package is
not installed. Nothing is built or downloaded at import.

Token selection is a hook: ``@wsi_llava.register_token_selector("name")`` (see :mod:`wsi_llava.token_selection`).
"""

import sys

from wsi_clip import configuration_slide_encoder, masked_pooling, modeling_slide_encoder, slide_towers

# The LLaVA files import the slide encoder relatively, so the same text works inside a checkpoint (where the files
# are copied beside them). Inside the package those names are wsi_clip's modules themselves: one source file in git,
# one class per process. Must run before the LLaVA modules below are imported.
for _module in (configuration_slide_encoder, masked_pooling, modeling_slide_encoder, slide_towers):
    sys.modules.setdefault(f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}", _module)

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from processing import WSIProcessor, __version__
from wsi_clip.hub import register_model_kind
from wsi_clip.slide_towers import load_slide_tower

from .configuration_wsillava import WSILlavaConfig
from .inference import build_generation_inputs, generate_answers
from .modeling_wsillava import (
    WSILlavaCausalLMOutputWithPast,
    WSILlavaForConditionalGeneration,
    WSILlavaModel,
    WSILlavaModelOutputWithPast,
    WSILlavaPreTrainedModel,
    WSILlavaProjector,
    WSILlavaSlideFeatures,
)
from .token_selection import (
    TokenSelectionInputs,
    TokenSelectionOutput,
    available_token_selectors,
    get_token_selector,
    register_token_selector,
    run_token_selector,
)

AutoConfig.register(WSILlavaConfig.model_type, WSILlavaConfig, exist_ok=True)
AutoModel.register(WSILlavaConfig, WSILlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(WSILlavaConfig, WSILlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(WSILlavaConfig, WSIProcessor, exist_ok=True)
register_model_kind(
    WSILlavaConfig.model_type,
    auto_class="AutoModelForImageTextToText",
    pipeline_tag="image-text-to-text",
    package=__name__,
    title="WSI-LLaVA slide language model",
)

__all__ = [
    "__version__",
    "WSILlavaConfig",
    "WSILlavaModel",
    "WSILlavaForConditionalGeneration",
    "WSILlavaPreTrainedModel",
    "WSILlavaProjector",
    "WSILlavaSlideFeatures",
    "WSILlavaModelOutputWithPast",
    "WSILlavaCausalLMOutputWithPast",
    "load_slide_tower",
    "TokenSelectionInputs",
    "TokenSelectionOutput",
    "register_token_selector",
    "available_token_selectors",
    "get_token_selector",
    "run_token_selector",
    "build_generation_inputs",
    "generate_answers",
]
