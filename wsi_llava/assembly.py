"""Building WSI-LLaVA for a training stage: the model + processor from a checkpoint or from parts, the projector,
gamma calibration, freezing / LoRA per stage, and the LoRA merge.

Training-only (not Hub-shipped): imports peft and ``processing`` freely.

* Stage 2: slide tower and LM frozen; only the projector (its MLP and ``gamma``) trains, on captions / reports.
* Stage 3: LoRA (peft) on the LM only — target modules by a **regex limited to** ``model.language_model`` (never
  ``"all-linear"``, which would also hit the slide tower and the projector) — with the projector in
  ``modules_to_save`` and its own learning rate. Adapters save / load with ``PeftModel``; :func:`merge_adapter` /
  :func:`save_merged` export a full model that loads with ``from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from processing.processing_wsi import WSIProcessor
from wsi_clip.cli import parse_mapping

from .arguments import DEFAULT_LORA_TARGETS, DataArguments, LlavaTrainingArguments, ModelArguments
from .language_models import resolve_language_model
from .modeling_wsillava import WSILlavaForConditionalGeneration
from .token_selection import get_token_selector
from .word_tokenizer import build_word_tokenizer

PROJECTOR_MODULE = "multi_modal_projector"


# ------------------------------------------------------------------------------------------------ model + processor
def parse_dtype(name: str | None) -> Any:
    """``--dtype`` → a ``torch.dtype`` (``float32``, ``bfloat16``, ...), ``"auto"``, or ``None`` when unset."""
    if name in (None, "", "auto"):
        return name or None
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"--dtype {name!r} is not a torch dtype (float32, bfloat16, float16).")
    return getattr(torch, name)


def build_model_and_processor(
    model_args: ModelArguments, data_args: DataArguments, texts: Sequence[str] = ()
) -> tuple[WSILlavaForConditionalGeneration, WSIProcessor, bool]:
    """The model + processor described by the arguments; returns ``(model, processor, fresh_projector)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from wsi_clip import SlideEncoderConfig, SlideEncoderModel

    selection = parse_mapping(model_args.token_selection_kwargs, "token_selection_kwargs")
    if model_args.model_name_or_path:
        model = WSILlavaForConditionalGeneration.from_pretrained(
            model_args.model_name_or_path, dtype=parse_dtype(model_args.dtype)
        )
        tokenizer_source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
        fresh = False
    else:
        if not (model_args.slide_encoder_name_or_path or model_args.slide_config):
            raise ValueError(
                "give --model_name_or_path (a WSI-LLaVA checkpoint) or a slide tower: "
                "--slide_encoder_name_or_path (SlideEncoder / WSI-CLIP checkpoint) or --slide_config "
                "(random init)."
            )
        if not (model_args.language_model or model_args.language_model_config):
            raise ValueError("give --language_model (a causal-LM checkpoint) or --language_model_config.")
        tower = model_args.slide_encoder_name_or_path or SlideEncoderModel(
            SlideEncoderConfig(**parse_mapping(model_args.slide_config, "slide_config"))
        )
        lm_kwargs = {"trust_remote_code": model_args.trust_remote_code}
        if model_args.dtype:
            lm_kwargs["dtype"] = parse_dtype(model_args.dtype)
        if model_args.attn_implementation:
            lm_kwargs["attn_implementation"] = model_args.attn_implementation
        if model_args.language_model:
            lm = resolve_language_model(model_args.language_model)  # a .gguf file → its converted folder
        else:
            lm_config = parse_mapping(model_args.language_model_config, "language_model_config")
            model_type = lm_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("--language_model_config needs a model_type (e.g. 'llama').")
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **lm_config))
        model = WSILlavaForConditionalGeneration.from_parts(
            tower,
            lm,
            token_selection=model_args.token_selection or "none",
            token_selection_kwargs=selection,
            projector_gamma_init=model_args.projector_gamma_init,
            language_model_kwargs=lm_kwargs,
            prepend_slide_embedding=model_args.prepend_slide_embedding,
        )
        tokenizer_source = model_args.tokenizer_name_or_path or (lm if isinstance(lm, str) else None)
        fresh = True
    if model_args.token_selection:
        model.config.token_selection = model_args.token_selection
        model.config.token_selection_kwargs = selection
    elif selection:
        model.config.token_selection_kwargs = selection

    if tokenizer_source == "word":
        tokenizer = build_word_tokenizer(texts, extra_tokens=[model_args.slide_token])
    elif tokenizer_source:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=model_args.trust_remote_code)
    else:
        raise ValueError("no tokenizer: pass --tokenizer_name_or_path (a path, or 'word' for a random demo LM).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = WSIProcessor(
        tokenizer=tokenizer,
        max_tiles=data_args.max_tiles,
        tile_sampling="uniform",
        feature_dim=model.config.vision_config.input_dim,
        tile_size=getattr(model.config.vision_config, "tile_size", 256),
        slide_token=model_args.slide_token,
        max_length=data_args.max_length,
    )
    added = processor.ensure_slide_token()
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != vocab and (added or len(tokenizer) > vocab or fresh):
        # new rows (the slide token) from the distribution of the existing ones: with tied weights, a row off that
        # scale would shift every next-token distribution of a pretrained LM
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.slide_token_id = processor.slide_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model_args.projector_path:
        load_projector(model, model_args.projector_path)
        fresh = False
    elif fresh:
        model.model.reset_projector_gamma()
    return model, processor, fresh


def load_projector(model: WSILlavaForConditionalGeneration, source: str) -> None:
    """Copy ``model.multi_modal_projector.*`` (MLP + gamma) from a WSI-LLaVA checkpoint folder."""
    from wsi_clip.slide_towers import read_state_dict

    state = read_state_dict(source)
    prefix = f"model.{PROJECTOR_MODULE}."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{source}: no '{prefix}*' weights; pass a WSI-LLaVA checkpoint (e.g. a stage-2 output).")
    model.multi_modal_projector.load_state_dict(weights, strict=True)


@torch.no_grad()
def calibrate_gamma(model: WSILlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> float:
    """Re-apply the gamma RMS rule on real tokens of one batch **after token selection** — the tokens the projector
    really sees (PruMerge's merged tokens are attention-weighted averages, ~30 % smaller than raw tower tokens)."""
    inner = model.model
    device = next(model.parameters()).device
    question = None
    if "question_embedding" in get_token_selector(inner.config.token_selection).requires:
        question = inner.question_embedding(batch["input_ids"].to(device), batch["question_mask"].to(device))
    selection, _ = inner.select_slide_tokens(
        batch["tile_features"].to(device),
        batch["tile_coords"].to(device),
        batch["tile_mask"].to(device),
        question_embedding=question,
    )
    return inner.reset_projector_gamma(selection.tokens[selection.token_mask])  # [M, D] real selected tokens


# ------------------------------------------------------------------------------------------------ stages, LoRA
class LoraTargetError(ValueError):
    """``lora_target_modules`` matches no layer of the language model, or layers outside it."""


def check_lora_targets(model: nn.Module, pattern: str) -> list[str]:
    """Module names fully matched by ``pattern``; refuses patterns that match nothing or anything outside the LM."""
    if pattern.strip() == "all-linear":
        raise LoraTargetError(
            "lora_target_modules='all-linear' would put LoRA on the slide tower and the projector "
            "too; use a regex limited to the language model, e.g. " + DEFAULT_LORA_TARGETS
        )
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise LoraTargetError(f"lora_target_modules {pattern!r} is not a valid regex ({err}).") from err
    names = [n for n, m in model.named_modules() if regex.fullmatch(n) and isinstance(m, nn.Linear)]
    if not names:
        example = next(
            (n for n, m in model.named_modules() if n.startswith("model.language_model.") and isinstance(m, nn.Linear)),
            "",
        )
        raise LoraTargetError(
            f"lora_target_modules regex {pattern!r} matches no linear layer (it must match full "
            f"module names, e.g. {example!r}). Fix: adapt the regex to your LM's layer names, "
            f"e.g. the default {DEFAULT_LORA_TARGETS!r}."
        )
    outside = [n for n in names if not n.startswith("model.language_model.")]
    if outside:
        raise LoraTargetError(
            f"lora_target_modules regex {pattern!r} also matches modules outside the language "
            f"model (slide tower / projector): {outside[:5]}. Fix: restrict it to "
            "'model\\.language_model\\..*'."
        )
    return names


def prepare_stage(model: WSILlavaForConditionalGeneration, args: LlavaTrainingArguments) -> nn.Module:
    """Freeze / wrap the model for ``args.stage``: 2 → projector only; 3 → LoRA on the LM + projector copy."""
    loss_average = getattr(args, "loss_average", "token")
    if loss_average not in ("token", "sample"):
        raise ValueError(f"--loss_average {loss_average!r}: use token or sample.")
    model.requires_grad_(False)
    if args.stage == 2:
        model.multi_modal_projector.requires_grad_(True)
        return model
    if args.stage != 3:
        raise ValueError(f"--stage {args.stage}: use 2 (projector) or 3 (LoRA + projector).")
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, args.lora_target_modules)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=[PROJECTOR_MODULE],
    )
    peft_model = get_peft_model(model, config)
    leaked = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n and "language_model" not in n
    ]
    if leaked:
        raise RuntimeError(f"LoRA parameters outside the language model: {leaked[:5]}")
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ------------------------------------------------------------------------------------------------ merge / export
def save_merged(peft_model: nn.Module, output_dir: str, processor: WSIProcessor | None = None) -> str:
    """A LoRA-wrapped model (adapters + projector copy) merged into its base, saved as a full WSI-LLaVA checkpoint
    (with ``processor``) that loads with ``from_pretrained``."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return output_dir


def merge_adapter(
    base: str | WSILlavaForConditionalGeneration, adapter: str, output_dir: str, processor: WSIProcessor | None = None
) -> str:
    """LoRA adapters (+ projector copy) saved in ``adapter`` merged into the base model (a checkpoint or a model),
    saved as a full WSI-LLaVA checkpoint."""
    from peft import PeftModel

    model = base if isinstance(base, nn.Module) else WSILlavaForConditionalGeneration.from_pretrained(base)
    return save_merged(PeftModel.from_pretrained(model, adapter), output_dir, processor)


__all__ = [
    "build_model_and_processor",
    "load_projector",
    "calibrate_gamma",
    "parse_dtype",
    "prepare_stage",
    "check_lora_targets",
    "LoraTargetError",
    "count_parameters",
    "save_merged",
    "merge_adapter",
    "DEFAULT_LORA_TARGETS",
    "PROJECTOR_MODULE",
]
