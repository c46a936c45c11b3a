"""``WSIClipTrainer``: Hugging Face ``Trainer`` for WSI-CLIP (training-side).

What it changes and why:

* **loss**: ``model(..., return_loss=True)`` computes the multi-positive loss inside the (DDP/FSDP-wrapped)
  forward, with the other ranks' embeddings gathered *with gradient*; ``loss_is_scaled_for_ga = False`` because it is
  a per-micro-batch mean. Gradient accumulation does not enlarge the contrastive batch (each micro-batch is its own
  problem with its own negatives): prefer more devices or a larger ``per_device_train_batch_size``.
* **arguments**: ``remove_unused_columns`` is forced off (it would drop ``case_id`` and the other columns the
  collator needs) and ``ddp_find_unused_parameters`` defaults to ``False`` (every parameter is used; frozen ones
  are skipped by DDP).
* **temperature**: ``logit_scale`` gets no weight decay, is clamped to ``config.logit_scale_max`` after every step,
  and its exponentiated value is logged as ``logit_scale``.
* **evaluation**: every process embeds its share of the evaluation set; the Trainer's loop gathers the embeddings
  and ids (``gather_for_metrics`` drops the duplicates accelerate pads the last batch with), then the metrics are
  computed on the whole set: slide→text and text→slide Recall@1/5/10 and mAP, the batch-independent contrastive
  ``loss`` and, with ``class_prompts`` and a ``label`` column, zero-shot accuracy / balanced accuracy / weighted F1
  / macro AUROC. They are logged like any Trainer metric (``eval_*``; TensorBoard when installed).
* **checkpoints**: written atomically and resumable with ``resume_from_checkpoint="auto"``
  (:class:`~wsi_clip.checkpointing.ResumableTrainerMixin`).
* **sampling**: ``sample_by="case"`` packs whole cases into each batch (:class:`~wsi_clip.data.CaseGroupedSampler`);
  ``"slide"`` is the Trainer's random sampler.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction

from .checkpointing import ResumableTrainerMixin
from .data import SAMPLE_BY, CaseGroupedSampler, WSIClipCollator
from .evaluation import (
    ClassPrompts,
    build_zero_shot_classifier,
    classification_metrics,
    contrastive_loss_full,
    load_class_prompts,
    retrieval_metrics,
    zero_shot_scores,
)
from .optimization import SLIDE_TOWER_GROUP, held_then_ramped, parameter_groups

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = (
    "tile_features",
    "tile_coords",
    "tile_mask",
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "case_ids",
    "text_ids",
)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


class LogitScaleClampCallback(TrainerCallback):
    """Clamp ``logit_scale`` to ``config.logit_scale_max`` after each optimizer step (open_clip does the same).

    The model also clamps inside ``forward``; clamping the parameter keeps it from drifting above the bound where
    it would receive no gradient.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model) if model is not None else None
        bound = getattr(getattr(model, "config", None), "logit_scale_max", None)
        param = getattr(model, "logit_scale", None)
        if bound is not None and isinstance(param, torch.Tensor) and param.numel() > 0:  # empty under ZeRO-3
            with torch.no_grad():
                param.clamp_(max=bound)
        return control


class WSIClipTrainer(ResumableTrainerMixin, Trainer):
    """``Trainer`` for :class:`~wsi_clip.modeling_wsiclip.WSIClipModel` (see the module docstring).

    Args (besides the ``Trainer`` ones):
        sample_by: ``"slide"`` (random slides) or ``"case"`` (all slides of a sampled case in one batch).
        class_prompts: zero-shot prompts (a :class:`~wsi_clip.evaluation.ClassPrompts`, a dict, or a JSON / YAML
            path) for zero-shot metrics during evaluation; the evaluation rows' ``label`` column names the class.
        eval_data_collator: collator for evaluation (e.g. deterministic ``"uniform"`` tile sampling while training
            uses ``"random"``); default: ``data_collator``.
        zero_shot_batch_size: prompts per text-encoder batch when building the zero-shot classifier.
        layer_lr_decay: slide tower layer ``l`` of ``L`` learns at ``lr × layer_lr_decay ** (L + 1 - l)``
            (fine-tuning a pretrained tower; see :mod:`wsi_clip.optimization`). 1 = one learning rate.
        freeze_slide_encoder_steps: hold the slide tower's learning rate at 0 for this many optimizer steps, then
            ramp it up over the warm-up steps (the projections settle first on a pretrained tower).

    Without ``data_collator`` and with a :class:`~processing.WSIProcessor` as ``processing_class``, a
    :class:`~wsi_clip.data.WSIClipCollator` is built from it.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        sample_by: str = "slide",
        class_prompts: ClassPrompts | dict | str | None = None,
        eval_data_collator: Any = None,
        zero_shot_batch_size: int = 64,
        layer_lr_decay: float = 1.0,
        freeze_slide_encoder_steps: int = 0,
        **trainer_kwargs: Any,
    ):
        if sample_by not in SAMPLE_BY:
            raise ValueError(f"WSIClipTrainer: sample_by={sample_by!r} is not one of {SAMPLE_BY}.")
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if args.remove_unused_columns:
            logger.info(
                "WSIClipTrainer: setting remove_unused_columns=False (the collator needs h5_path, caption, "
                "case_id, label)."
            )
            args.remove_unused_columns = False
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False
        if args.n_gpu > 1:
            raise ValueError(
                f"WSIClipTrainer: one process sees {args.n_gpu} GPUs (torch.nn.DataParallel), which "
                "computes the contrastive loss on each GPU's sub-batch without the cross-device gather. "
                "Launch one process per GPU instead: `accelerate launch` or `torchrun --nproc_per_node N`."
            )
        if args.batch_eval_metrics:
            raise ValueError(
                "WSIClipTrainer: batch_eval_metrics=True is not supported; retrieval metrics need the "
                "whole evaluation set. Set batch_eval_metrics=False."
            )
        if isinstance(class_prompts, str) or hasattr(class_prompts, "__fspath__"):
            class_prompts = load_class_prompts(class_prompts)
        elif isinstance(class_prompts, dict):
            class_prompts = ClassPrompts.from_dict(class_prompts)
        self.class_prompts: ClassPrompts | None = class_prompts
        self.sample_by = sample_by
        self.zero_shot_batch_size = zero_shot_batch_size
        if freeze_slide_encoder_steps < 0:
            raise ValueError(f"WSIClipTrainer: freeze_slide_encoder_steps={freeze_slide_encoder_steps} must be >= 0.")
        self.layer_lr_decay = layer_lr_decay
        self.freeze_slide_encoder_steps = freeze_slide_encoder_steps

        processing_class = trainer_kwargs.get("processing_class")
        if (
            trainer_kwargs.get("data_collator") is None
            and not trainer_args
            and processing_class is not None
            and hasattr(processing_class, "pad_slides")
        ):
            trainer_kwargs["data_collator"] = WSIClipCollator(
                processing_class, class_names=class_prompts.labels if class_prompts else None
            )
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.eval_data_collator = eval_data_collator
        if self.compute_metrics is None:
            self.compute_metrics = self._clip_metrics
        self.add_callback(LogitScaleClampCallback())
        self._zero_shot_classifier: torch.Tensor | None = None
        self._eval_logit_scale: float | None = None

    # ------------------------------------------------------------------------------------------------ training
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Multi-positive contrastive loss of the batch against all ranks' embeddings (see the model's forward)."""
        if "case_ids" not in inputs:
            raise KeyError(
                "WSIClipTrainer: the batch has no 'case_ids'. Use wsi_clip.data.WSIClipCollator (or "
                "processing.ContrastiveCollator) and keep remove_unused_columns=False."
            )
        outputs = model(
            **{k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}, return_loss=True, return_dict=True
        )
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with a layer-wise LR decay or a frozen phase, over per-depth param groups."""
        if self.optimizer is not None or (self.layer_lr_decay == 1.0 and not self.freeze_slide_encoder_steps):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, opt_model
        )
        if set(optimizer_kwargs) - {"lr", "betas", "eps", "weight_decay", "fused", "foreach"}:
            raise ValueError(
                f"WSIClipTrainer: layer_lr_decay / freeze_slide_encoder_steps build their own param groups and "
                f"support the AdamW-style optimizers only, not optim={self.args.optim!r}."
            )
        groups = parameter_groups(
            opt_model,
            self.args.learning_rate,
            self.args.weight_decay,
            self.get_decay_parameter_names(opt_model),
            self.layer_lr_decay,
        )
        if self.freeze_slide_encoder_steps and not any(g[SLIDE_TOWER_GROUP] for g in groups):
            raise ValueError(
                "WSIClipTrainer: freeze_slide_encoder_steps needs a trainable slide tower; it is frozen "
                "(freeze_slide_encoder) or has no parameters."
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The Trainer's schedule; the slide tower's groups held at 0 for ``freeze_slide_encoder_steps``."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not (created and self.freeze_slide_encoder_steps):
            return scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"WSIClipTrainer: freeze_slide_encoder_steps needs a LambdaLR schedule (linear, cosine, constant, "
                f"...), not lr_scheduler_type={self.args.lr_scheduler_type!r}."
            )
        ramp = self.args.get_warmup_steps(num_training_steps)
        for index, group in enumerate(scheduler.optimizer.param_groups):
            if group.get(SLIDE_TOWER_GROUP):
                scheduler.lr_lambdas[index] = held_then_ramped(
                    scheduler.lr_lambdas[index], self.freeze_slide_encoder_steps, ramp
                )
                group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return scheduler

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's choice minus ``logit_scale`` (weight decay would pull the temperature towards 1)."""
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith("logit_scale")]

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.sample_by != "case":
            return super()._get_train_sampler(train_dataset)
        try:
            case_ids = train_dataset["case_id"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                "sample_by='case' needs a 'case_id' column in the training dataset "
                "(processing.load_annotations adds it; default: the slide id)."
            ) from err
        return CaseGroupedSampler(
            list(case_ids),
            self._train_batch_size,
            self.args.world_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            param = getattr(_unwrap(self.model), "logit_scale", None)
            if isinstance(param, torch.Tensor) and param.numel() == 1:
                logs["logit_scale"] = round(float(_unwrap(self.model).scale().detach()), 4)
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def _eval_collator(self):
        """Evaluation loaders use ``eval_data_collator`` and never drop samples (``dataloader_drop_last`` is for
        training: equal-size contrastive batches)."""
        previous, drop_last = self.data_collator, self.args.dataloader_drop_last
        if self.eval_data_collator is not None:
            self.data_collator = self.eval_data_collator
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.data_collator, self.args.dataloader_drop_last = previous, drop_last

    def get_eval_dataloader(self, eval_dataset=None):
        with self._eval_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._eval_collator():
            return super().get_test_dataloader(test_dataset)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self._zero_shot_classifier = None  # rebuilt with the current weights in the first prediction step
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        self._zero_shot_classifier = None
        return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ):
        """Embed one evaluation batch: returns ``(None, embeds [B, 2, E], ids [B, 3])`` for the Trainer to gather.

        ``embeds[:, 0]`` are the normalised slide embeddings, ``embeds[:, 1]`` the text ones; ``ids`` columns are
        case id, text id and class label (-1 = none).
        """
        inputs = self._prepare_inputs(inputs)
        if "case_ids" not in inputs:
            raise KeyError("WSIClipTrainer.evaluate: the batch has no 'case_ids'; use wsi_clip.data.WSIClipCollator.")
        with torch.no_grad(), self.compute_loss_context_manager():
            out = model(**{k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}, return_dict=True)
            if self._zero_shot_classifier is None and self.class_prompts is not None:
                if self.processing_class is None:
                    raise ValueError(
                        "WSIClipTrainer: zero-shot evaluation needs processing_class (the processor or "
                        "tokenizer) to tokenise the class prompts."
                    )
                self._zero_shot_classifier = build_zero_shot_classifier(
                    model, self.processing_class, self.class_prompts, self.zero_shot_batch_size
                ).cpu()
        self._eval_logit_scale = float(out.logit_scale)
        batch = out.slide_embeds.shape[0]
        embeds = torch.stack([out.slide_embeds.float(), out.text_embeds.float()], dim=1)  # [B, 2, E]
        labels = inputs.get("class_labels")
        if labels is None:
            labels = torch.full((batch,), -1, dtype=torch.long, device=embeds.device)
        ids = torch.stack(
            [
                inputs["case_ids"],
                inputs["text_ids"] if "text_ids" in inputs else torch.arange(batch, device=embeds.device),
                labels.to(embeds.device),
            ],
            dim=1,
        )  # [B, 3]
        return None, embeds, ids

    def _clip_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        embeds = torch.as_tensor(prediction.predictions)  # [N, 2, E]
        ids = torch.as_tensor(prediction.label_ids).long()  # [N, 3]
        slide_embeds, text_embeds = embeds[:, 0], embeds[:, 1]
        case_ids, text_ids, class_labels = ids[:, 0], ids[:, 1], ids[:, 2]
        metrics = retrieval_metrics(slide_embeds, text_embeds, case_ids, text_ids)
        if self._eval_logit_scale is not None:
            metrics["loss"] = contrastive_loss_full(
                slide_embeds, text_embeds, self._eval_logit_scale, case_ids, text_ids
            )
        if self._zero_shot_classifier is not None and bool((class_labels >= 0).any()):
            scores = zero_shot_scores(slide_embeds, self._zero_shot_classifier)
            metrics.update(classification_metrics(class_labels, scores))
        return metrics


__all__ = ["WSIClipTrainer", "LogitScaleClampCallback", "MODEL_INPUT_KEYS"]
