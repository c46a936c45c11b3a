"""Fine-tuning a pretrained slide tower: layer-wise learning-rate decay and a frozen-then-unfrozen schedule.

Why: a converted Prov-GigaPath / GigaPath-Flash encoder already holds what the task needs; the freshly initialised
projections on top of it do not. Full-LR updates through random projections wash the pretrained features out in the
first steps. The two standard remedies (BEiT / upstream ``gigapath/finetune``: ``layer_decay 0.95``):

* **layer-wise LR decay** — the slide tower's layer ``l`` of ``L`` learns at ``lr × decay ** (L + 1 - l)``: the input
  projection (``l = 0``) least, the last layer most; the projections, the temperature and the text tower at ``lr``;
* **frozen, then unfrozen** — the slide tower's learning rate is held at 0 for the first ``frozen_steps`` optimizer
  steps (the projections settle on the pretrained features), then ramps up linearly over the run's warm-up steps.
  The tower stays in the graph (DDP sees the same parameters throughout); AdamW with ``lr = 0`` leaves it unchanged.

Training-side only (not shipped with checkpoints).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .slide_towers import find_slide_tower

SLIDE_TOWER_GROUP = "slide_tower"  # param-group flag read by the frozen-phase schedule


def slide_layer_id(name: str, model_type: str, num_layers: int) -> int:
    """Depth of a slide-tower parameter (``name`` relative to the tower) in ``0 .. num_layers + 1``.

    Slide encoder (LongNet): input projection and CLS token ``0``, ``layers.i`` → ``i + 1``, the final norms
    ``num_layers + 1``. ABMIL / mean pooling: tile MLP layer ``i`` → ``i + 1``, the attention head on top.
    """
    match = re.match(r"(?:layers|tile_mlp)\.(\d+)\.", name)
    if model_type == "wsi_slide_encoder":
        if name.startswith(("patch_embed.", "cls_token")):
            return 0
        return int(match.group(1)) + 1 if match else num_layers + 1
    if match:  # tile_mlp is a Sequential of (Linear, GELU, Dropout) blocks: three modules per layer
        return int(match.group(1)) // 3 + 1
    return num_layers + 1


def _tower_depth(tower: nn.Module) -> int:
    config = tower.config
    if config.model_type == "wsi_slide_encoder":
        return config.num_hidden_layers
    return getattr(config, "num_tile_layers", 1)


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
    layer_lr_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW param groups of a WSI-CLIP model: one per (LR scale, weight decay, tower) with its own ``lr``.

    The full-LR groups come first (the Trainer logs the first group's learning rate); the slide tower's groups
    carry ``SLIDE_TOWER_GROUP = True`` and ``lr_scale``.
    """
    if not 0.0 < layer_lr_decay <= 1.0:
        raise ValueError(f"layer_lr_decay={layer_lr_decay} must be in (0, 1] (1 = no decay; BEiT / GigaPath: 0.95).")
    if any("_flat_param" in name for name, _ in model.named_parameters()):
        raise ValueError(
            "layer_lr_decay / freeze_slide_encoder_steps need the original parameters: with FSDP set "
            "fsdp_use_orig_params: true in the accelerate config."
        )
    decay_names = set(decay_parameter_names)
    tower = find_slide_tower(model)
    depth = _tower_depth(tower)
    tower_prefix = next(name for name, module in model.named_modules() if module is tower)
    tower_prefix = f"{tower_prefix}." if tower_prefix else ""
    groups: dict[tuple[float, bool, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_tower = name.startswith(tower_prefix)
        scale = 1.0
        if in_tower:
            layer = slide_layer_id(name[len(tower_prefix) :], tower.config.model_type, depth)
            scale = layer_lr_decay ** (depth + 1 - layer)
        decay = name in decay_names
        key = (scale, decay, in_tower)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": learning_rate * scale,
                "lr_scale": scale,
                SLIDE_TOWER_GROUP: in_tower,
            }
        groups[key]["params"].append(param)
    return sorted(groups.values(), key=lambda g: (g[SLIDE_TOWER_GROUP], -g["lr_scale"]))


def held_then_ramped(schedule: Callable[[int], float], frozen_steps: int, ramp_steps: int) -> Callable[[int], float]:
    """``schedule`` (a ``LambdaLR`` multiplier) × 0 for ``step < frozen_steps``, then × a linear ramp to 1 over
    ``ramp_steps`` steps (the ramp multiplies the schedule: while the run's own warm-up lasts, both apply)."""

    def multiplier(step: int) -> float:
        if step < frozen_steps:
            return 0.0
        ramp = min(1.0, (step - frozen_steps + 1) / ramp_steps) if ramp_steps > 0 else 1.0
        return ramp * schedule(step)

    return multiplier


__all__ = ["SLIDE_TOWER_GROUP", "held_then_ramped", "parameter_groups", "slide_layer_id"]
