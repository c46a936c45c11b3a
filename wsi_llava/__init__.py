"""WSI-LLaVA: a slide encoder under any causal LM through a gamma-scaled projector (in progress)."""

__version__ = "0.1.0"
