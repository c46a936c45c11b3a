"""Configuration of the Prov-GigaPath-compatible slide encoder (LongNet over tile features).

Hub-shipped: ``save_pretrained`` copies this file next to the weights, so it imports only stdlib and
transformers.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

POOLING_MODES = ("cls", "mean")
ATTENTION_BACKENDS = ("auto", "fused", "chunked")
DEFAULT_DILATED_RATIO = (1, 2, 4, 8, 16)


def gigapath_segment_length(max_wsi_size: int, tile_size: int, num_branches: int = 5) -> list[int]:
    """Segment lengths exactly as Prov-GigaPath's ``LongNetViT.get_optimal_segment_length``.

    Upstream: ``int(2 ** e)`` for ``e`` in ``np.linspace(log2(1024), int(log2((max_wsi_size // tile_size) ** 2)), 5)``.
    Reproduced with the same float64 operations (numpy's linspace is ``i * step + start`` with the last point set
    to ``stop``), so the defaults give ``[1024, 5792, 32768, 185363, 1048576]``.
    """
    if max_wsi_size < tile_size or tile_size <= 0:
        raise ValueError(
            f"max_wsi_size={max_wsi_size} must be >= tile_size={tile_size} > 0 (both in the same pixel "
            "frame as the coordinates, e.g. 262144 and 256 for Prov-GigaPath)."
        )
    max_seq_len = (max_wsi_size // tile_size) ** 2
    start, stop = math.log2(1024), float(int(math.log2(float(max_seq_len))))
    if num_branches == 1:
        return [int(2.0**start)]
    step = (stop - start) / (num_branches - 1)
    exponents = [float(i) * step + start for i in range(num_branches)]
    exponents[-1] = stop
    return [int(2.0**e) for e in exponents]


class SlideEncoderConfig(PretrainedConfig):
    r"""Prov-GigaPath slide encoder: ``Linear(input_dim → hidden_size)`` + 2-D sin-cos positions + CLS, then
    ``num_hidden_layers`` pre-LN Sub-LN transformer layers with LongNet dilated attention.

    Defaults are the released ``gigapath_slide_enc12l768d`` model. Upstream-style names are accepted as aliases
    (``embed_dim``, ``depth``, ``num_heads``, ``in_chans``).

    Args:
        input_dim: tile feature dimension (1536 for Prov-GigaPath tile features).
        hidden_size / num_hidden_layers / num_attention_heads / intermediate_size: width, depth, heads, FFN width.
        tile_size: grid step in the units of the coordinates: ``grid = floor(coords / tile_size)``.
        max_wsi_size: largest slide side in the same units; sets the dilated-attention segment layout.
        slide_ngrids: valid grid cells per axis (upstream default 1000); coordinates outside raise an error.
        segment_length / dilated_ratio: LongNet branches; ``segment_length=None`` derives them from
            ``max_wsi_size`` / ``tile_size`` exactly like upstream. Stored as plain ints.
        dropout: dropout on the input embeddings, after attention and after the FFN (upstream default 0.25).
        drop_path_rate: stochastic depth, ``linspace(0, rate, depth)[i]`` for layer ``i`` (upstream 0.1).
        layer_norm_eps: eps of every LayerNorm inside the encoder (1e-5); head_norm_eps: the head ``norm`` (1e-6).
        pooling: ``"cls"`` reproduces upstream ``global_pool=False``; ``"mean"`` upstream ``global_pool=True``
            (mean over real tiles; recommended for the released weights, whose CLS token was never trained).
        embedding_layer: which encoder state ``pooler_output`` pools: ``"final"`` (after the encoder's final
            LayerNorm: the upstream default call ``model(x, coords)``) or ``"0"`` .. ``"num_hidden_layers"`` (an index
            into upstream's ``all_layer_embed=True`` list: 0 = input embedding, i = raw output of layer i, no final
            LayerNorm). TRIDENT and upstream fine-tuning use ``"11"`` with mean pooling for the released 12-layer
            weights (the converter's default for them); models trained here use ``"final"``.
        attention_backend: ``"auto"`` (fused kernels that return the log-sum-exp where available, else chunked
            matmul), ``"fused"`` or ``"chunked"``.
        inference_chunk_size: tokens per chunk of the token-wise parts of a layer at inference (eval, no
            gradient); bounds the FFN temporaries. 0 = no chunking.
        initializer_range: std of the CLS token at random init.
        normalize_tile_features: standardise each input dimension, ``(x - mean) / std``, with statistics of the
            training tiles held as buffers (``tile_normalization.mean`` / ``.std``, set by ``wsi-train-clip``):
            removes the common offset of foundation-model tile features that stalls training from scratch.
            ``False`` for converted Prov-GigaPath weights (trained on raw features).
    """

    model_type = "wsi_slide_encoder"
    attribute_map = {
        "embed_dim": "hidden_size",
        "depth": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "in_chans": "input_dim",
    }

    input_dim: int = 1536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    tile_size: int = 256
    max_wsi_size: int = 262144
    slide_ngrids: int = 1000
    segment_length: list[int] | None = None
    dilated_ratio: list[int] | None = None
    dropout: float = 0.25
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    head_norm_eps: float = 1e-6
    pooling: str = "cls"
    embedding_layer: str = "final"
    attention_backend: str = "auto"
    inference_chunk_size: int = 1024
    initializer_range: float = 0.02
    normalize_tile_features: bool = False

    def __post_init__(self, **kwargs):
        if self.dilated_ratio is None:
            self.dilated_ratio = list(DEFAULT_DILATED_RATIO)
        self.dilated_ratio = [int(r) for r in self.dilated_ratio]
        if self.segment_length is None:
            self.segment_length = gigapath_segment_length(self.max_wsi_size, self.tile_size, len(self.dilated_ratio))
        self.segment_length = [int(s) for s in self.segment_length]
        self.embedding_layer = str(self.embedding_layer)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}; choose heads that divide the width (upstream: 16)."
            )
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 for the 2-D sin-cos positions.")
        if len(self.segment_length) != len(self.dilated_ratio) or not self.segment_length:
            raise ValueError(
                f"segment_length {self.segment_length} and dilated_ratio {self.dilated_ratio} must be "
                "non-empty lists of the same length (one entry per attention branch)."
            )
        if min(self.segment_length) < 1 or min(self.dilated_ratio) < 1:
            raise ValueError(
                f"segment_length {self.segment_length} and dilated_ratio {self.dilated_ratio} must be "
                "positive integers."
            )
        if self.pooling not in POOLING_MODES:
            raise ValueError(
                f"pooling={self.pooling!r} is not one of {POOLING_MODES}: 'cls' is upstream "
                "global_pool=False, 'mean' is global_pool=True."
            )
        if self.embedding_layer != "final" and not (
            self.embedding_layer.isdigit() and 0 <= int(self.embedding_layer) <= self.num_hidden_layers
        ):
            raise ValueError(
                f"embedding_layer={self.embedding_layer!r} is not 'final' or a layer index 0..{self.num_hidden_layers} "
                "(0 = input embedding, i = output of layer i; upstream fine-tuning and TRIDENT use '11')."
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}.")
        if self.tile_size <= 0 or self.slide_ngrids <= 0:
            raise ValueError(f"tile_size={self.tile_size} and slide_ngrids={self.slide_ngrids} must be positive.")


__all__ = ["SlideEncoderConfig", "gigapath_segment_length"]
