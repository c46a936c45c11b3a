"""WSI-LLaVA: a slide encoder under any causal LM through visual-token selection and a gamma-scaled projector.

Importing the package registers ``WSILlavaConfig`` with ``AutoConfig``, ``WSILlavaModel`` with ``AutoModel``,
``WSILlavaForConditionalGeneration`` with ``AutoModelForImageTextToText`` and ``WSIProcessor`` with
``AutoProcessor`` (in-process), and marks the classes for ``auto_map`` export so saved checkpoints also load with
``trust_remote_code=True`` where this package is not installed. Nothing is built or downloaded at import.

Token selection is a hook: ``@wsi_llava.register_token_selector("name")`` (see :mod:`wsi_llava.token_selection`).
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_wsillava import WSILlavaConfig
from .modeling_wsillava import (WSILlavaCausalLMOutputWithPast, WSILlavaForConditionalGeneration, WSILlavaModel,
                                WSILlavaModelOutputWithPast, WSILlavaPreTrainedModel, WSILlavaProjector,
                                WSILlavaSlideFeatures, load_slide_tower)
from .token_selection import (TokenSelectionInputs, TokenSelectionOutput, available_token_selectors,
                              get_token_selector, register_token_selector, run_token_selector)
from .inference import build_generation_inputs, generate_answers

AutoConfig.register(WSILlavaConfig.model_type, WSILlavaConfig, exist_ok=True)
AutoModel.register(WSILlavaConfig, WSILlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(WSILlavaConfig, WSILlavaForConditionalGeneration, exist_ok=True)
WSILlavaConfig.register_for_auto_class()
WSILlavaModel.register_for_auto_class("AutoModel")
WSILlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def _register_processor() -> None:
    from transformers import AutoProcessor

    from processing.processing_wsi import WSIProcessor

    AutoProcessor.register(WSILlavaConfig, WSIProcessor, exist_ok=True)


_register_processor()

__all__ = ["__version__", "WSILlavaConfig", "WSILlavaModel", "WSILlavaForConditionalGeneration",
           "WSILlavaPreTrainedModel", "WSILlavaProjector", "WSILlavaSlideFeatures", "WSILlavaModelOutputWithPast",
           "WSILlavaCausalLMOutputWithPast", "load_slide_tower", "TokenSelectionInputs", "TokenSelectionOutput",
           "register_token_selector", "available_token_selectors", "get_token_selector", "run_token_selector",
           "build_generation_inputs", "generate_answers"]
