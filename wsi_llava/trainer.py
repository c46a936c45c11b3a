"""The Hugging Face Trainer for WSI-LLaVA stages 2 and 3 (training-only, not Hub-shipped)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from wsi_clip.checkpointing import ResumableTrainerMixin

from .assembly import PROJECTOR_MODULE


def projector_gamma(model: nn.Module) -> float | None:
    """Current gamma of the *trained* projector (the peft ``modules_to_save`` copy when wrapped)."""
    found = [
        (n, p)
        for n, p in model.named_parameters()
        if n.endswith(f"{PROJECTOR_MODULE}.gamma") or (PROJECTOR_MODULE in n and n.endswith(".gamma"))
    ]
    if not found:
        return None
    trained = (
        [p for n, p in found if "modules_to_save" in n] or [p for _, p in found if p.requires_grad] or [found[0][1]]
    )
    return float(trained[0].detach().float())


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean next-token loss on its answer tokens (labels != -100).

    logits ``[B, L, V]``, labels ``[B, L]`` (the spliced ones the model returns) → scalar. Examples without answer
    tokens (all cut by truncation) are left out."""
    shift_logits = logits[:, :-1].float()  # [B, L-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, L-1]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    token_loss = token_loss.view_as(shift_labels)  # [B, L-1]
    counts = (shift_labels != -100).sum(dim=1)  # [B]
    per_example = token_loss.sum(dim=1) / counts.clamp_min(1)  # [B]
    return per_example[counts > 0].mean()


class WSILlavaTrainer(ResumableTrainerMixin, Trainer):
    """HF Trainer for WSI-LLaVA: projector learning rate of its own, ``gamma`` without weight decay, the projector's
    ``gamma`` plus the mean visual tokens per slide in every log, and atomic, auto-resumable checkpoints."""

    def __init__(self, *args: Any, projector_lr: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self._visual_tokens: list[float] = []

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith("gamma")]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.projector_lr is not None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    groups.setdefault((PROJECTOR_MODULE in name, name in decay), []).append(param)
            param_groups = [
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if is_decay else 0.0,
                    "lr": self.projector_lr if is_projector else self.args.learning_rate,
                }
                for (is_projector, is_decay), params in sorted(groups.items())
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return super().create_optimizer(model)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if getattr(self.args, "loss_average", "token") == "sample" and model.training:
            loss = per_sample_loss(outputs.logits, outputs.labels)
            # the Trainer does not rescale a loss computed with num_items_in_batch: average the micro-batches here
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss / self.current_gradient_accumulation_steps
        counts = getattr(outputs, "visual_token_counts", None)
        if counts is not None:
            self._visual_tokens.append(float(counts.float().mean()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        gamma = projector_gamma(self.model)
        if gamma is not None:
            logs["projector_gamma"] = round(gamma, 6)
        if self._visual_tokens:
            logs["visual_tokens_per_slide"] = round(sum(self._visual_tokens) / len(self._visual_tokens), 2)
            self._visual_tokens.clear()
        super().log(logs, start_time)


__all__ = ["WSILlavaTrainer", "per_sample_loss", "projector_gamma"]
