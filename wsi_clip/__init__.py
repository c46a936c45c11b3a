"""WSI-CLIP: Prov-GigaPath-compatible slide encoder and slide-text contrastive models."""

__version__ = "0.1.0"
