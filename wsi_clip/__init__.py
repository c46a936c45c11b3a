"""WSI-CLIP: Prov-GigaPath-compatible slide encoder and slide-text contrastive models.

Importing the package registers the slide encoder, the MIL towers and WSI-CLIP with ``AutoConfig`` / ``AutoModel``
(in-process), maps their configs to ``processing.WSIProcessor`` for ``AutoProcessor``, and marks the classes for
``auto_map`` export, so checkpoints saved with ``save_pretrained`` also load elsewhere with
``trust_remote_code=True``. The import builds no model and touches no network.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from processing import WSIProcessor, __version__

from .configuration_slide_encoder import SlideEncoderConfig
from .configuration_wsiclip import ABMILConfig, MeanPoolingConfig, WSIClipConfig
from .mil_pooling import ABMILModel, MeanPoolingModel, MILPoolingOutput
from .modeling_slide_encoder import SlideEncoderModel, SlideEncoderOutput, SlideEncoderPreTrainedModel, SlideInputError
from .modeling_wsiclip import WSIClipModel, WSIClipOutput, WSIClipPreTrainedModel, WSIClipSlideOutput

for _config, _model in (
    (SlideEncoderConfig, SlideEncoderModel),
    (WSIClipConfig, WSIClipModel),
    (ABMILConfig, ABMILModel),
    (MeanPoolingConfig, MeanPoolingModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
for _config, _model in ((SlideEncoderConfig, SlideEncoderModel), (WSIClipConfig, WSIClipModel)):
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    AutoProcessor.register(_config, WSIProcessor, exist_ok=True)

__all__ = [
    "__version__",
    "SlideEncoderConfig",
    "SlideEncoderModel",
    "SlideEncoderOutput",
    "SlideEncoderPreTrainedModel",
    "SlideInputError",
    "WSIClipConfig",
    "WSIClipModel",
    "WSIClipOutput",
    "WSIClipPreTrainedModel",
    "WSIClipSlideOutput",
    "ABMILConfig",
    "ABMILModel",
    "MeanPoolingConfig",
    "MeanPoolingModel",
    "MILPoolingOutput",
    "WSIProcessor",
]
