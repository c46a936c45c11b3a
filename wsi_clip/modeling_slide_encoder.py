"""Prov-GigaPath-compatible slide encoder as a Hugging Face ``PreTrainedModel``.

Hub-shipped: ``save_pretrained`` copies this file, ``configuration_slide_encoder.py`` and ``dilated_attention.py``
next to the weights, so only stdlib, torch, transformers and ``.sibling`` imports are allowed here.

Numerics follow the original Prov-GigaPath ``LongNetViT``: ``Linear(input_dim → D)`` + 2-D sin-cos
position of ``floor(coords / tile_size)`` (computed on the fly in float64, no million-row table), CLS token, pre-LN
Sub-LN layers with LongNet dilated attention, exact GELU in fp32, final LayerNorm, head ``norm``. Unlike the
original, ragged batches are supported (``tile_mask``) and give every slide its B=1 result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_slide_encoder import SlideEncoderConfig
from .dilated_attention import DilatedSelfAttention
from .masked_pooling import masked_mean
from .tile_normalization import TileFeatureStandardization


class SlideInputError(ValueError):
    """The tiles given to the slide encoder violate its input contract (shapes, dtypes, coordinate frame)."""


@dataclass
class SlideEncoderOutput(BaseModelOutputWithPooling):
    """Outputs of :class:`SlideEncoderModel` (B slides, N tile slots, D = hidden_size, H heads).

    Args:
        last_hidden_state: ``[B, N+1, D]`` tokens after the final encoder LayerNorm (upstream ``encoder_out``),
            CLS at index 0, tile ``n`` at index ``n + 1``. Rows of padded tiles are meaningless.
        pooler_output: ``[B, D]`` head ``norm`` of the CLS token (``pooling="cls"``, upstream default call) or of
            the mean over real tiles (``pooling="mean"``, upstream ``global_pool=True``) of the state chosen by
            ``config.embedding_layer`` (``"final"``: ``last_hidden_state``; ``"i"``: ``hidden_states[i]``).
        hidden_states: ``num_hidden_layers + 1`` tensors ``[B, N+1, D]``: the embedded input and the raw output of
            every layer, **without** the final LayerNorm (upstream ``encoder_states``). Only when requested.
        attentions: unused (dilated attention has no dense map; see ``cls_attention``).
        cls_attention: ``[B, H, N]`` float32, last layer's ``softmax(q_cls · k_j / sqrt(d))`` over the full (not
            dilated) sequence of real tokens, CLS key included in the softmax but not returned (LLaVA-PruMerge
            convention); zeros on padded tiles. Only with ``output_cls_attention=True``.
        tile_keys: ``[B, N, D]`` keys of the last layer for each tile (heads concatenated), for key-similarity
            token merging. Only with ``output_cls_attention=True``.
    """

    cls_attention: torch.FloatTensor | None = None
    tile_keys: torch.FloatTensor | None = None


def sincos_2d_position_embedding(grid: Tensor, dim: int) -> Tensor:
    """MAE / GigaPath 2-D sin-cos position of integer grid cells ``grid [..., 2] = (gx, gy)`` → ``[..., dim]`` fp32.

    Channels ``[0, dim/2)`` encode ``gy`` and ``[dim/2, dim)`` encode ``gx`` (upstream's table row
    ``gx * ngrids + gy + 1``), each as ``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(-k / (dim/4))``, computed in float64
    and cast to fp32 like the upstream table. Values depend only on the cell, so a small per-axis table of the
    cells present replaces upstream's 1,000,001-row buffer.
    """
    quarter = dim // 4
    omega = torch.tensor(
        [1.0 / 10000 ** (k / quarter) for k in range(quarter)], dtype=torch.float64, device=grid.device
    )  # [dim/4]
    values = torch.arange(int(grid.max()) + 1, dtype=torch.float64, device=grid.device)  # [G]
    angles = values[:, None] * omega[None, :]  # [G, dim/4]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # [G, dim/2]
    return torch.cat([table[grid[..., 1]], table[grid[..., 0]]], dim=-1)  # [..., dim]


class DropPath(nn.Module):
    """Stochastic depth per sample (timm / torchscale ``DropPath``): drops a residual branch, rescales the rest."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # [B, 1, 1]
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class SubLNFeedForward(nn.Module):
    """torchscale ``FeedForwardNetwork`` with Sub-LN: ``fc2(ffn_layernorm(gelu(fc1(x))))``, GELU exact in fp32."""

    def __init__(self, hidden_size: int, intermediate_size: int, layer_norm_eps: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.ffn_layernorm = nn.LayerNorm(intermediate_size, eps=layer_norm_eps)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # [..., F]
        h = F.gelu(h.float()).type_as(h)
        return self.fc2(self.ffn_layernorm(h))


class SlideEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN Sub-LN LongNet layer (torchscale ``EncoderLayer``; upstream parameter names)::

    h = h + drop_path(dropout(out_proj(inner_attn_ln(attn(self_attn_layer_norm(h))))))
    h = h + drop_path(dropout(fc2(ffn_layernorm(gelu(fc1(final_layer_norm(h)))))))
    """

    def __init__(self, config: SlideEncoderConfig, layer_idx: int):
        super().__init__()
        dim = config.hidden_size
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = DilatedSelfAttention(
            dim,
            config.num_attention_heads,
            config.segment_length,
            config.dilated_ratio,
            config.layer_norm_eps,
            config.attention_backend,
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ffn = SubLNFeedForward(dim, config.intermediate_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        depth = config.num_hidden_layers
        rate = config.drop_path_rate * layer_idx / (depth - 1) if depth > 1 else 0.0  # np.linspace(0, r, depth)[i]
        self.drop_path = DropPath(rate)
        self.chunk_size = config.inference_chunk_size

    def _qkv(self, hidden: Tensor) -> Tensor:
        return self.self_attn.project_qkv(self.self_attn_layer_norm(hidden))

    def _residuals(self, hidden: Tensor, attn: Tensor) -> Tensor:
        hidden = hidden + self.drop_path(self.dropout(self.self_attn.project_out(attn)))
        return hidden + self.drop_path(self.dropout(self.ffn(self.final_layer_norm(hidden))))

    def forward(
        self,
        hidden_states: Tensor,
        lengths: list[int] | None = None,
        output_cls_attention: bool = False,
        workspace: dict | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """hidden_states ``[B, Lmax, D]``, slide ``b``'s real tokens first (``lengths[b]`` of them; ``None``: all).

        With a ``workspace`` (inference: eval mode, no gradient) the token-wise parts run in chunks of
        ``inference_chunk_size`` tokens, ``hidden_states`` is updated **in place** and scratch buffers are reused
        across layers, which bounds memory and avoids page-faulting fresh buffers on every layer.
        """
        batch, max_len, dim = hidden_states.shape
        lengths = [max_len] * batch if lengths is None else lengths
        if workspace is None:
            attn, cls_attention, keys = self.self_attn.attend(self._qkv(hidden_states), lengths, output_cls_attention)
            return self._residuals(hidden_states, attn), cls_attention, keys

        chunks = [slice(i, i + self.chunk_size) for i in range(0, max_len, self.chunk_size or max_len)]
        qkv = workspace.get("qkv")
        if qkv is None or qkv.shape != (batch, max_len, 3 * dim) or qkv.dtype != hidden_states.dtype:
            qkv = workspace["qkv"] = hidden_states.new_empty(batch, max_len, 3 * dim)
        for rows in chunks:
            qkv[:, rows] = self._qkv(hidden_states[:, rows])
        attn, cls_attention, keys = self.self_attn.attend(qkv, lengths, output_cls_attention, workspace)
        for rows in chunks:
            hidden_states[:, rows] = self._residuals(hidden_states[:, rows], attn[:, rows])
        return hidden_states, cls_attention, keys


class SlideEncoderPreTrainedModel(PreTrainedModel):
    config_class = SlideEncoderConfig
    base_model_prefix = "slide_encoder"
    main_input_name = "tile_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlideEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Upstream ``initialize_vit_weights``: xavier-uniform Linear, zero bias, unit LayerNorm, CLS ~ N(0, 0.02)."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SlideEncoderModel):
            init.normal_(module.cls_token, std=self.config.initializer_range)


class SlideEncoderModel(SlideEncoderPreTrainedModel):
    """Prov-GigaPath slide encoder: ``(tile_features, tile_coords, tile_mask)`` → token states and a slide embedding.

    Which output to use: ``pooler_output`` with ``pooling="mean"`` and ``embedding_layer="11"`` for the released
    weights (what TRIDENT and upstream fine-tuning use; their CLS token was never trained); ``pooling="cls"``,
    ``embedding_layer="final"`` to reproduce the upstream default call; :meth:`all_layer_embeddings` for the
    upstream ``all_layer_embed=True`` list (``gigapath.pipeline``, fine-tuning); ``last_hidden_state`` for
    token-level use (WSI-LLaVA).
    """

    def __init__(self, config: SlideEncoderConfig):
        super().__init__(config)
        dim = config.hidden_size
        self.tile_normalization = (
            TileFeatureStandardization(config.input_dim) if config.normalize_tile_features else None
        )
        self.patch_embed = nn.Linear(config.input_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(SlideEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head_norm = nn.LayerNorm(dim, eps=config.head_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------
    # input checks
    # ----------------------------------------------------------------------------------------------------------

    def _check_inputs(
        self, tile_features: Tensor, tile_coords: Tensor, tile_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Shapes and dtypes; returns ``(grid [B, N, 2] int64, mask [B, N] bool)``."""
        cfg = self.config
        if tile_features.dim() != 3:
            raise SlideInputError(
                f"tile_features must be [batch, tiles, {cfg.input_dim}], got shape "
                f"{tuple(tile_features.shape)}; add a batch dimension with .unsqueeze(0)."
            )
        batch, num_tiles, feat_dim = tile_features.shape
        if feat_dim != cfg.input_dim:
            raise SlideInputError(
                f"tile_features have dimension {feat_dim} but the slide encoder expects "
                f"input_dim={cfg.input_dim}; use features from the matching tile encoder "
                "(Prov-GigaPath: 1536) or a model configured with this input_dim."
            )
        if num_tiles == 0:
            raise SlideInputError("tile_features has no tiles (N = 0); every slide needs at least one tile.")
        if tuple(tile_coords.shape) != (batch, num_tiles, 2):
            raise SlideInputError(
                f"tile_coords must be [batch, tiles, 2] = {(batch, num_tiles, 2)} to match "
                f"tile_features {tuple(tile_features.shape)}, got {tuple(tile_coords.shape)}; "
                "pass one (x, y) pair per tile."
            )
        if tile_coords.dtype in (torch.float16, torch.bfloat16):
            raise SlideInputError(
                f"tile_coords are {tile_coords.dtype}: 16-bit floats cannot hold pixel "
                "coordinates (inf above 65504, steps of 32+ past 32768), so tiles land on wrong "
                "grid cells; pass int64 or float32 coordinates (keep them out of .half())."
            )
        if tile_mask is None:
            mask = torch.ones(batch, num_tiles, dtype=torch.bool, device=tile_features.device)
        else:
            if tuple(tile_mask.shape) != (batch, num_tiles):
                raise SlideInputError(
                    f"tile_mask must be [batch, tiles] = {(batch, num_tiles)}, got "
                    f"{tuple(tile_mask.shape)} (True = real tile, False = padding)."
                )
            mask = tile_mask.to(device=tile_features.device, dtype=torch.bool)

        coords = tile_coords.to(tile_features.device)
        if coords.is_floating_point():
            grid = torch.floor(coords.double() / cfg.tile_size).long()  # [B, N, 2]
        else:
            grid = torch.div(coords.long(), cfg.tile_size, rounding_mode="floor")
        grid = grid.masked_fill(~mask.unsqueeze(-1), 0)
        bad = ((grid < 0) | (grid >= cfg.slide_ngrids)).any(-1)  # [B, N]
        if bool(bad.any()):
            b, n = (int(i) for i in bad.nonzero()[0])
            x, y = coords[b, n].tolist()
            gx, gy = grid[b, n].tolist()
            largest = float(coords[mask].max())
            min_tile = math.floor(largest / cfg.slide_ngrids) + 1
            raise SlideInputError(
                f"tile {n} of slide {b} has coords (x, y) = ({x}, {y}), i.e. grid cell floor(coords / tile_size="
                f"{cfg.tile_size}) = ({gx}, {gy}), outside 0..{cfg.slide_ngrids - 1} (slide_ngrids). Coordinates must "
                f"be non-negative top-left positions in the same frame as tile_size (e.g. level-0 pixels with the "
                f"level-0 tile stride). The largest coordinate {largest:g} needs tile_size >= {min_tile} in that "
                f"frame: rescale the coordinates (e.g. divide level-0 pixels by the level downsample) or load the "
                f"model with tile_size=<tile stride in coordinate units>."
            )
        shared = _shared_cells(grid, mask, cfg.slide_ngrids)  # [B]
        real = mask.sum(dim=1)  # [B]
        collapsed = shared > MAX_SHARED_CELL_FRACTION * real
        if bool(collapsed.any()):
            b = int(collapsed.nonzero()[0])
            raise SlideInputError(
                f"slide {b}: {int(shared[b])} of {int(real[b])} tiles share a grid cell with another tile (grid cell = "
                f"floor(tile_coords / tile_size={cfg.tile_size})): the coordinates are not level-0 pixels of "
                f"{cfg.tile_size}-px tiles (normalised, at a coarser level, or from overlapping tiles), so the "
                "encoder would see a few positions and every slide embedding would look alike. Pass level-0 "
                "pixel coordinates in the frame of tile_size: floor(coords / patch_size_level0) * tile_size, which "
                "WSIProcessor does for you from each file's patch_size_level0."
            )
        return grid, mask

    # ----------------------------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------------------------

    def embed(self, tile_features: Tensor, grid: Tensor) -> Tensor:
        """``Linear`` projection + sin-cos position per tile, CLS prepended: ``[B, N, Din]`` → ``[B, N+1, D]``."""
        dtype = self.patch_embed.weight.dtype
        if self.tile_normalization is not None:
            tile_features = self.tile_normalization(tile_features, dtype)  # [B, N, Din] standardised
        proj = self.patch_embed(tile_features.to(dtype))  # [B, N, D]
        pos = sincos_2d_position_embedding(grid, self.config.hidden_size)  # [B, N, D] fp32
        hidden = proj + pos.to(torch.promote_types(proj.dtype, self.patch_embed.weight.dtype))
        cls = self.cls_token.expand(hidden.shape[0], -1, -1).to(hidden.dtype)  # [B, 1, D]
        return torch.cat([cls, hidden], dim=1)

    def forward(
        self,
        tile_features: Tensor,
        tile_coords: Tensor,
        tile_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_cls_attention: bool = False,
        return_dict: bool | None = None,
    ) -> SlideEncoderOutput | tuple:
        """Encode a batch of slides.

        Args:
            tile_features: ``[B, N, input_dim]`` tile features (fp16 / fp32; computed in the model's dtype).
            tile_coords: ``[B, N, 2]`` ``(x, y)`` top-left tile positions, int64 or float32, in the frame of
                ``config.tile_size`` (grid cell = ``floor(coords / tile_size)``, must lie in ``0..slide_ngrids-1``).
            tile_mask: ``[B, N]`` bool, True for real tiles (padding anywhere; ``None`` = all real). Each slide's
                outputs equal those of running it alone.
            output_hidden_states: also return the ``num_hidden_layers + 1`` raw states.
            output_cls_attention: also return the last layer's CLS→tile attention and tile keys (token selection).
        Returns:
            :class:`SlideEncoderOutput` (or its tuple form with ``return_dict=False``).
        """
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        grid, mask = self._check_inputs(tile_features, tile_coords, tile_mask)
        batch, num_tiles = mask.shape

        hidden = self.embed_dropout(self.embed(tile_features, grid))  # [B, L, D], L = N + 1
        token_mask = torch.cat([mask.new_ones(batch, 1), mask], dim=1)  # [B, L]
        lengths = token_mask.sum(dim=1).tolist()
        if min(lengths) < token_mask.shape[1]:
            hidden = hidden.masked_fill(~token_mask.unsqueeze(-1), 0.0)  # upstream: x * (1 - padding_mask)

        # Attention needs each slide's real tokens first; a stable sort moves padding to the end (no-op for
        # the usual right padding) and is undone on every token output below.
        order = None
        if not all(lengths[b] == token_mask.shape[1] for b in range(batch)):
            prefix = torch.arange(token_mask.shape[1], device=mask.device) < torch.tensor(
                lengths, device=mask.device
            ).unsqueeze(1)
            if not bool((prefix == token_mask).all()):
                order = torch.argsort((~token_mask).to(torch.int8), dim=1, stable=True)  # [B, L]
                hidden = hidden.gather(1, order.unsqueeze(-1).expand_as(hidden))

        # Inference (eval, no gradient): layers update `hidden` in place and share scratch buffers.
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        workspace = {} if not (self.training or needs_grad) else None
        keep = (lambda t: t.clone()) if workspace is not None else (lambda t: t)
        states = [keep(hidden)] if output_hidden_states else None
        pooled_layer = None if cfg.embedding_layer == "final" else int(cfg.embedding_layer)
        selected = keep(hidden) if pooled_layer == 0 else None  # the state `pooler_output` pools, if not final
        cls_attention = keys = None
        for i, layer in enumerate(self.layers):
            want_cls = output_cls_attention and i == len(self.layers) - 1
            hidden, layer_cls, layer_keys = layer(
                hidden, lengths=lengths, output_cls_attention=want_cls, workspace=workspace
            )
            if want_cls:
                cls_attention, keys = layer_cls, layer_keys
            if states is not None:
                states.append(keep(hidden))
            if pooled_layer == i + 1:
                selected = states[-1] if states is not None else keep(hidden)
        last = self.layer_norm(hidden)  # [B, L, D]

        if order is not None:
            last = _unsort(last, order, dim=1)
            states = [_unsort(s, order, dim=1) for s in states] if states is not None else None
            selected = _unsort(selected, order, dim=1) if selected is not None else None
            if cls_attention is not None:
                cls_attention, keys = _unsort(cls_attention, order, dim=2), _unsort(keys, order, dim=1)
        pooled = self.pool(last if selected is None else selected, mask)  # [B, D]
        if cls_attention is not None:
            cls_attention = cls_attention[:, :, 1:].masked_fill(~mask.unsqueeze(1), 0.0)  # [B, H, N]
            keys = keys[:, 1:]  # [B, N, D]

        output = SlideEncoderOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(states) if states is not None else None,
            cls_attention=cls_attention,
            tile_keys=keys,
        )
        return output if return_dict else output.to_tuple()

    def pool(self, tokens: Tensor, tile_mask: Tensor, pooling: str | None = None) -> Tensor:
        """Upstream head: ``norm(tokens[:, 0])`` (``"cls"``) or ``norm(mean of real tiles)`` (``"mean"``).

        tokens ``[B, N+1, D]``, tile_mask ``[B, N]`` → ``[B, D]``.
        """
        pooling = pooling or self.config.pooling
        if pooling == "cls":
            return self.head_norm(tokens[:, 0])
        if pooling != "mean":
            raise ValueError(f"pooling={pooling!r} is not one of ('cls', 'mean').")
        return self.head_norm(masked_mean(tokens[:, 1:], tile_mask))  # [B, D]

    def all_layer_embeddings(
        self, tile_features: Tensor, tile_coords: Tensor, tile_mask: Tensor | None = None, pooling: str | None = None
    ) -> list[Tensor]:
        """Upstream ``model(x, coords, all_layer_embed=True)``: ``norm(pool(h_i))`` for the input embedding and every
        layer's raw output (no final LayerNorm), ``num_hidden_layers + 1`` tensors ``[B, D]``. ``pooling``: ``"cls"``
        or ``"mean"`` (default ``config.pooling``). ``gigapath.pipeline``'s ``last_layer_embed`` is the last entry.
        """
        out = self.forward(tile_features, tile_coords, tile_mask, output_hidden_states=True, return_dict=True)
        mask = (
            out.last_hidden_state.new_ones(tile_features.shape[:2], dtype=torch.bool)
            if tile_mask is None
            else tile_mask.to(device=tile_features.device, dtype=torch.bool)
        )
        return [self.pool(state, mask, pooling) for state in out.hidden_states]

    def cls_attention(self, tile_features: Tensor, tile_coords: Tensor, tile_mask: Tensor | None = None) -> Tensor:
        """Last layer's CLS→tile attention ``[B, H, N]`` (see :class:`SlideEncoderOutput`); computed from the last
        layer's q/k in O(N). To get token states at the same time, call ``forward(..., output_cls_attention=True)``.
        """
        return self.forward(
            tile_features, tile_coords, tile_mask, output_cls_attention=True, return_dict=True
        ).cls_attention


# Same rule as the data path (processing.coordinates): above this fraction of a slide's tiles in an already taken
# grid cell, the coordinates are in the wrong frame.
MAX_SHARED_CELL_FRACTION = 0.1


def _shared_cells(grid: Tensor, mask: Tensor, ngrids: int) -> Tensor:
    """``[B]`` number of real tiles whose grid cell is already taken by another tile of the same slide."""
    keys = grid[..., 0] * ngrids + grid[..., 1]  # [B, N]
    padding = -1 - torch.arange(keys.shape[1], device=keys.device)  # distinct negatives never collide
    keys = torch.where(mask, keys, padding.unsqueeze(0))
    ordered = keys.sort(dim=1).values
    return (ordered[:, 1:] == ordered[:, :-1]).sum(dim=1)


def _unsort(x: Tensor, order: Tensor, dim: int) -> Tensor:
    """Inverse of ``x_sorted = x.gather(dim, order)`` along ``dim`` (order ``[B, L]``, dim 1 or 2)."""
    index = order.view(order.shape[0], *([1] * (dim - 1)), order.shape[1], *([1] * (x.dim() - dim - 1)))
    index = index.expand_as(x)
    return torch.empty_like(x).scatter_(dim, index, x)


__all__ = [
    "SlideEncoderModel",
    "SlideEncoderPreTrainedModel",
    "SlideEncoderOutput",
    "SlideEncoderLayer",
    "SlideInputError",
    "sincos_2d_position_embedding",
]
