"""WSI-CLIP: Prov-GigaPath-compatible slide encoder and slide-text contrastive models.

Importing the package registers the slide encoder with ``AutoConfig`` / ``AutoModel`` (in-process) and marks its
classes for ``auto_map`` export, so checkpoints saved with ``save_pretrained`` also load elsewhere with
``trust_remote_code=True``. The import builds no model and touches no network.
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel

from .configuration_slide_encoder import SlideEncoderConfig
from .modeling_slide_encoder import (SlideEncoderModel, SlideEncoderOutput, SlideEncoderPreTrainedModel,
                                     SlideInputError)

AutoConfig.register(SlideEncoderConfig.model_type, SlideEncoderConfig, exist_ok=True)
AutoModel.register(SlideEncoderConfig, SlideEncoderModel, exist_ok=True)
SlideEncoderConfig.register_for_auto_class()
SlideEncoderModel.register_for_auto_class("AutoModel")

# WSI-CLIP (issue 4): slide towers (LongNet / ABMIL / mean) + text encoder. The processor is registered against
# both configs so AutoProcessor.from_pretrained(dir) works for slide-encoder and WSI-CLIP checkpoints.
from transformers import AutoProcessor

from processing.processing_wsi import WSIProcessor

from .configuration_wsiclip import ABMILConfig, MeanPoolingConfig, WSIClipConfig
from .mil_pooling import ABMILModel, MeanPoolingModel, MILPoolingOutput
from .modeling_wsiclip import WSIClipModel, WSIClipOutput, WSIClipPreTrainedModel, WSIClipSlideOutput

for _config, _model in ((WSIClipConfig, WSIClipModel), (ABMILConfig, ABMILModel),
                        (MeanPoolingConfig, MeanPoolingModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
WSIClipConfig.register_for_auto_class()
WSIClipModel.register_for_auto_class("AutoModel")
AutoProcessor.register(WSIClipConfig, WSIProcessor, exist_ok=True)
AutoProcessor.register(SlideEncoderConfig, WSIProcessor, exist_ok=True)
WSIProcessor.register_for_auto_class("AutoProcessor")  # processor checkpoints carry auto_map too

__all__ = ["__version__", "SlideEncoderConfig", "SlideEncoderModel", "SlideEncoderOutput",
           "SlideEncoderPreTrainedModel", "SlideInputError"]
__all__ += ["WSIClipConfig", "WSIClipModel", "WSIClipOutput", "WSIClipPreTrainedModel", "WSIClipSlideOutput",
            "ABMILConfig", "ABMILModel", "MeanPoolingConfig", "MeanPoolingModel", "MILPoolingOutput", "WSIProcessor"]
