"""Position-free slide towers: gated attention MIL (ABMIL) and mean pooling over tile features.

Hub-shipped (copied next to WSI-CLIP checkpoints): imports only torch, transformers and ``.sibling`` modules.
Both towers take the slide encoder's inputs (``tile_features [B, N, D_in]``, ``tile_mask [B, N]``; ``tile_coords``
accepted and ignored) and return :class:`MILPoolingOutput`, so WSI-CLIP treats all slide towers alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_wsiclip import ABMILConfig, MeanPoolingConfig
from .masked_pooling import masked_mean
from .tile_normalization import TileFeatureStandardization


@dataclass
class MILPoolingOutput(BaseModelOutputWithPooling):
    """Outputs of the MIL slide towers (B slides, N tile slots, H = output width).

    Args:
        last_hidden_state: ``[B, N, H]`` per-tile states after the tile MLP (raw features for plain mean pooling).
            Rows of padded tiles are meaningless. Unlike the slide encoder there is no CLS row.
        pooler_output: ``[B, H]`` slide vector.
        attention_scores: ``[B, N]`` float32 softmax attention weight of each tile (ABMIL only; sums to 1 over the
            real tiles, 0 on padding): where the model looked, for heatmaps.
        hidden_states / attentions: unused (no layers to report).
    """

    attention_scores: torch.FloatTensor | None = None


def _check_bag(tile_features: Tensor, tile_mask: Tensor | None, input_dim: int, tower: str) -> Tensor:
    """Validate ``[B, N, D]`` features; returns the ``[B, N]`` bool mask (all True when ``None``)."""
    if tile_features.dim() != 3 or tile_features.shape[-1] != input_dim:
        raise ValueError(
            f"{tower}: tile_features must be [batch, tiles, {input_dim}], got "
            f"{tuple(tile_features.shape)}; use features of the tile encoder the model was built for, "
            "or a model configured with this input_dim."
        )
    if tile_mask is None:
        return torch.ones(tile_features.shape[:2], dtype=torch.bool, device=tile_features.device)
    if tuple(tile_mask.shape) != tuple(tile_features.shape[:2]):
        raise ValueError(
            f"{tower}: tile_mask must be [batch, tiles] = {tuple(tile_features.shape[:2])}, got "
            f"{tuple(tile_mask.shape)} (True = real tile)."
        )
    return tile_mask.to(device=tile_features.device, dtype=torch.bool)


def _tile_mlp(input_dim: int, hidden_size: int, num_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers += [nn.Linear(input_dim if i == 0 else hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class _MILPreTrainedModel(PreTrainedModel):
    main_input_name = "tile_features"

    def _tile_inputs(self, tile_features: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, N, D_in]`` in ``dtype``, standardised when the config asks for it (see ``tile_normalization``)."""
        if self.tile_normalization is not None:
            return self.tile_normalization(tile_features, dtype)
        return tile_features.to(dtype)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class ABMILModel(_MILPreTrainedModel):
    """Gated attention MIL pooling (Ilse et al., 2018), masked for ragged batches; exposes per-tile attention."""

    config_class = ABMILConfig
    base_model_prefix = "abmil"

    def __init__(self, config: ABMILConfig):
        super().__init__(config)
        self.tile_normalization = (
            TileFeatureStandardization(config.input_dim) if config.normalize_tile_features else None
        )
        self.tile_mlp = _tile_mlp(config.input_dim, config.hidden_size, config.num_tile_layers, config.dropout)
        self.attention_v = nn.Linear(config.hidden_size, config.attention_dim)
        self.attention_u = nn.Linear(config.hidden_size, config.attention_dim) if config.gated else None
        self.attention_w = nn.Linear(config.attention_dim, 1)
        self.attention_dropout = nn.Dropout(config.dropout)
        self.post_init()

    def forward(
        self,
        tile_features: Tensor,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        return_dict: bool | None = None,
        **unused,
    ) -> MILPoolingOutput | tuple:
        """tile_features ``[B, N, D_in]``, tile_mask ``[B, N]`` (True = real) → :class:`MILPoolingOutput`.

        ``tile_coords`` is ignored (the tower is permutation invariant); extra slide-encoder flags are ignored too.
        """
        mask = _check_bag(tile_features, tile_mask, self.config.input_dim, "ABMIL")
        hidden = self.tile_mlp(self._tile_inputs(tile_features, self.attention_v.weight.dtype))  # [B, N, H]
        gate = torch.tanh(self.attention_v(hidden))  # [B, N, A]
        if self.attention_u is not None:
            gate = gate * torch.sigmoid(self.attention_u(hidden))
        logits = self.attention_w(self.attention_dropout(gate)).squeeze(-1).float()  # [B, N]
        logits = logits.masked_fill(~mask, float("-inf"))
        scores = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [B, N]; an all-padding row gives zeros
        pooled = torch.einsum("bn,bnh->bh", scores.to(hidden.dtype), hidden)  # [B, H]
        output = MILPoolingOutput(last_hidden_state=hidden, pooler_output=pooled, attention_scores=scores)
        return output if (return_dict is None or return_dict) else output.to_tuple()


class MeanPoolingModel(_MILPreTrainedModel):
    """Mean over the real tiles (optionally after a ``Linear + GELU`` tile MLP): the cheap baseline tower."""

    config_class = MeanPoolingConfig
    base_model_prefix = "mean_pool"

    def __init__(self, config: MeanPoolingConfig):
        super().__init__(config)
        self.tile_normalization = (
            TileFeatureStandardization(config.input_dim) if config.normalize_tile_features else None
        )
        self.tile_mlp = (
            _tile_mlp(config.input_dim, config.hidden_size, 1, config.dropout) if config.hidden_size else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        tile_features: Tensor,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        return_dict: bool | None = None,
        **unused,
    ) -> MILPoolingOutput | tuple:
        """tile_features ``[B, N, D_in]``, tile_mask ``[B, N]`` → :class:`MILPoolingOutput` (no attention)."""
        mask = _check_bag(tile_features, tile_mask, self.config.input_dim, "mean pooling")
        dtype = next(self.parameters()).dtype if any(True for _ in self.parameters()) else torch.float32
        hidden = self.tile_mlp(self._tile_inputs(tile_features, dtype))  # [B, N, H]
        pooled = masked_mean(hidden, mask)  # [B, H]
        output = MILPoolingOutput(last_hidden_state=hidden, pooler_output=pooled)
        return output if (return_dict is None or return_dict) else output.to_tuple()


__all__ = ["ABMILModel", "MeanPoolingModel", "MILPoolingOutput"]
