"""Every file under scripts/configs/ parses against the installed transformers / accelerate, the way it is used.

* training configs (``clip_*`` / ``demo_clip*`` → wsi-train-clip, ``llava_*stage{2,3}*`` /
  ``demo_llava*stage{2,3}*`` → wsi-train-llava ``--stage N``) go through the command's own parser (its
  dataclasses + ``transformers.TrainingArguments``), so a key a new transformers dropped (``warmup_ratio`` in 5.x)
  fails here and not on the GPU machine;
* accelerate configs (``accelerate/*.yaml``) through accelerate's ``load_config_from_file`` (``ClusterConfig``) and
  ``accelerate launch``'s own validation, and the plugin they turn into;
* DeepSpeed JSON: strict JSON whose ``"auto"`` values HF's Trainer integration fills from the recipes'
  ``TrainingArguments`` (``HfTrainerDeepSpeedConfig``), with the keys the Trainer needs.

A config file that no rule below covers fails ``test_every_config_file_is_covered``: add a rule for it. Nothing
needs the data, the checkpoints, a GPU or the ``deepspeed`` package (where that package is absent, the Trainer's
DeepSpeed config logic runs on accelerate's ``HfDeepSpeedConfig`` base, see ``_trainer_ds_config_class``).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "scripts" / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.rglob("*") if p.is_file())
NUM_TRAINING_STEPS = 1000  # what the Trainer would pass to trainer_config_finalize; any positive value


def classify(path: Path) -> tuple[str, int | None] | None:
    """``(kind, stage)`` of a config file: which tool reads it. ``None``: no rule (the test fails)."""
    rel = path.relative_to(CONFIG_DIR)
    name, suffix = path.name, path.suffix.lower()
    if rel.parts[0] == "accelerate":
        return ("accelerate", None) if len(rel.parts) == 2 and suffix in (".yaml", ".yml") else None
    if len(rel.parts) != 1:
        return None
    if suffix == ".json" and "deepspeed" in name:
        return "deepspeed", None
    if suffix not in (".yaml", ".yml"):
        return None
    if re.match(r"(clip_|demo_clip)", name):
        return "train_clip", None
    if re.match(r"(llava_|demo_llava)", name):
        stage = re.search(r"stage([23])", name)
        return ("train_llava", int(stage.group(1))) if stage else None
    return None


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _of_kind(kind: str) -> list[Path]:
    return [p for p in CONFIG_FILES if (classify(p) or ("",))[0] == kind]


def test_every_config_file_is_covered():
    assert CONFIG_FILES, CONFIG_DIR
    uncovered = [_rel(p) for p in CONFIG_FILES if classify(p) is None]
    assert not uncovered, (
        f"no rule in tests/scripts/test_configs.py:classify says which tool reads {uncovered}: add one, "
        "so the config is parsed here."
    )
    for kind in ("train_clip", "train_llava", "accelerate", "deepspeed"):
        assert _of_kind(kind), kind


# ------------------------------------------------------------------------------------------------ helpers
def _trainer_ds_config_class():
    """transformers' ``HfTrainerDeepSpeedConfig`` (the Trainer's "auto" filling and mismatch checks). Without the
    ``deepspeed`` package its base class is a stub, so its methods are put, unchanged, on accelerate's
    ``HfDeepSpeedConfig`` (the base it has when deepspeed is installed)."""
    from transformers.integrations import deepspeed as hf_ds

    if hf_ds.is_deepspeed_available():
        return hf_ds.HfTrainerDeepSpeedConfig
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    methods = {
        k: v
        for k, v in vars(hf_ds.HfTrainerDeepSpeedConfig).items()
        if not k.startswith("__") and k not in ("_abc_impl",)
    }

    def __init__(self, config_file_or_dict):
        HfDeepSpeedConfig.__init__(self, config_file_or_dict)
        self._dtype = None
        self.mismatches = []

    return type("HfTrainerDeepSpeedConfig", (HfDeepSpeedConfig,), {**methods, "__init__": __init__})


@pytest.fixture
def recipe_env(monkeypatch):
    """Parse as on the GPU machine, from the repository root (recipes' relative paths, e.g. ``deepspeed:``): a
    bf16-capable device is assumed (the CPU check is TrainingArguments' only device dependence), and the DeepSpeed
    config class works without the deepspeed package. Global state the parse leaves is reset afterwards."""
    import transformers.training_args as training_args
    from accelerate.state import AcceleratorState
    from transformers.integrations import deepspeed as hf_ds

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setattr(hf_ds, "HfTrainerDeepSpeedConfig", _trainer_ds_config_class())
    yield
    hf_ds.unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)


def parse_training_config(path: Path):
    kind, stage = classify(path)
    if kind == "train_clip":
        from wsi_clip.commands.train import parse_arguments

        return parse_arguments([str(path)])
    from wsi_llava.commands.train import parse_arguments

    return parse_arguments(["--stage", str(stage), str(path)])


def _model_stub():
    """What trainer_config_finalize reads from the model: its config (hidden size for "auto" bucket sizes)."""
    from wsillava_utils import tiny_config, tiny_processor

    return SimpleNamespace(config=tiny_config(tiny_processor()))


def _autos(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _autos(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _check_ds_config_for(ds_source, args) -> dict:
    """The Trainer's path: fill "auto" from ``args`` (TrainingArguments / propagate_args_to_deepspeed), then from
    the model and step count (deepspeed_init → trainer_config_finalize); no mismatch, no "auto" left."""
    ds = _trainer_ds_config_class()(ds_source)
    ds.trainer_config_process(args)
    ds.trainer_config_finalize(args, _model_stub(), NUM_TRAINING_STEPS)  # raises on mismatches
    assert not ds.mismatches, ds.mismatches
    assert not _autos(ds.config), f"'auto' left unfilled by HF's integration: {_autos(ds.config)}"
    config = ds.config
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert isinstance(config.get(key), int) and config[key] >= 1, (key, config.get(key))
    assert config["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size
    assert config["gradient_accumulation_steps"] == args.gradient_accumulation_steps
    assert ds.is_true("bf16.enabled") == bool(args.bf16) and ds.is_true("fp16.enabled") == bool(args.fp16)
    return config


# ------------------------------------------------------------------------------------------------ training configs
@pytest.mark.parametrize("path", _of_kind("train_clip") + _of_kind("train_llava"), ids=_rel)
def test_training_config_parses_with_the_scripts_parser(path, recipe_env):
    from transformers import TrainingArguments

    raw = _raw(path)
    assert isinstance(raw, dict) and raw, path
    model_args, data_args, args = parse_training_config(path)
    assert isinstance(args, TrainingArguments)
    kind, stage = classify(path)
    for key, value in raw.items():  # every key landed in one of the dataclasses
        holder = next(o for o in (model_args, data_args, args) if hasattr(o, key))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert getattr(holder, key) == pytest.approx(value), key
    assert args.warmup_steps >= 0 and args.get_warmup_steps(NUM_TRAINING_STEPS) >= 0
    if kind == "train_llava":
        from wsi_llava import get_token_selector
        from wsi_llava.assembly import parse_dtype

        assert args.stage == stage
        parse_dtype(model_args.dtype)  # a torch dtype name
        if model_args.token_selection:
            get_token_selector(model_args.token_selection)
        if stage == 3:
            from wsi_llava.assembly import check_lora_targets

            from wsillava_utils import tiny_model, tiny_processor

            assert check_lora_targets(tiny_model(tiny_processor()), args.lora_target_modules)
    if args.deepspeed:
        ds_path = Path(args.deepspeed)
        assert ds_path.is_file() and ds_path.resolve().is_relative_to(CONFIG_DIR), args.deepspeed
        assert classify(ds_path.resolve()) == ("deepspeed", None)
        assert args.hf_deepspeed_config is not None and not args.hf_deepspeed_config.mismatches
        config = _check_ds_config_for(str(ds_path), args)
        # the Trainer's optimizer / scheduler must run: WSILlavaTrainer's projector_lr param groups, and the
        # recipe's lr_scheduler_type + warmup_steps (a DeepSpeed block would replace them)
        assert "optimizer" not in config and "scheduler" not in config, sorted(config)


def test_qwen7b_recipes_keep_a_3_percent_warmup(recipe_env):
    """transformers 5 dropped ``warmup_ratio``: ``warmup_steps`` < 1 is the fraction of the total steps."""
    for name in ("llava_stage2_qwen7b.yaml", "llava_stage3_qwen7b.yaml"):
        _, _, args = parse_training_config(CONFIG_DIR / name)
        assert args.warmup_steps == pytest.approx(0.03)
        assert args.get_warmup_steps(1000) == 30 and args.get_warmup_steps(2000) == 60
        assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "cosine"


# ------------------------------------------------------------------------------------------------ DeepSpeed JSON
def _strict_json(path: Path) -> dict:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"{path}: duplicate keys {keys}"
        return dict(pairs)

    return json.loads(
        path.read_text(encoding="utf-8"),
        object_pairs_hook=no_duplicates,
        parse_constant=lambda c: pytest.fail(f"{path}: {c} is not JSON"),
    )


@pytest.mark.parametrize("path", _of_kind("deepspeed"), ids=_rel)
def test_deepspeed_json_is_filled_by_the_trainer_integration(path, recipe_env, tmp_path):
    from transformers import TrainingArguments

    config = _strict_json(path)
    assert config["zero_optimization"]["stage"] in (0, 1, 2, 3)
    for key in ("offload_optimizer", "offload_param"):
        device = config["zero_optimization"].get(key, {}).get("device", "none")
        assert device in ("none", "cpu", "nvme"), (key, device)
    users = [
        p
        for p in _of_kind("train_clip") + _of_kind("train_llava")
        if _raw(p).get("deepspeed") and (REPO_ROOT / _raw(p)["deepspeed"]).resolve() == path.resolve()
    ]
    arg_sets = [parse_training_config(p)[2] for p in users] or [
        TrainingArguments(output_dir=str(tmp_path), bf16=True, report_to="none")
    ]
    for args in arg_sets:
        _check_ds_config_for(str(path), args)


# ------------------------------------------------------------------------------------------------ accelerate
FSDP_LAYER_MODULES = (
    "wsi_clip.modeling_slide_encoder",
    "wsi_clip.modeling_wsiclip",
    "wsi_llava.modeling_wsillava",
    "transformers.models.bert.modeling_bert",
    "transformers.models.roberta.modeling_roberta",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
)


def _launch_args(path: Path):
    """``accelerate launch --config_file <path> <script>``: accelerate's own parser and validation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    scripts = re.findall(r"scripts/(train_\w+\.py)", path.read_text(encoding="utf-8")) or ["train_clip.py"]
    script = REPO_ROOT / "scripts" / scripts[0]
    assert script.is_file(), script
    parsed = launch_command_parser().parse_args(["--config_file", str(path), str(script)])
    known = set(vars(parsed))
    return (*_validate_launch_command(parsed), known)


@pytest.mark.parametrize("path", _of_kind("accelerate"), ids=_rel)
def test_accelerate_config_loads_and_validates(path, recipe_env):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType, constants

    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig) and config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert config.mixed_precision in ("no", "fp16", "bf16", "fp8")
    args, defaults, mp_from_config, known = _launch_args(path)
    # launch copies nested keys onto its arguments (fsdp_* / dynamo_* prefixed) without checking them: do it here
    for section, prefix in (
        ("deepspeed_config", ""),
        ("fsdp_config", "fsdp_"),
        ("dynamo_config", "dynamo_"),
        ("fp8_config", "fp8_"),
    ):
        for key in getattr(config, section):
            name = key if key.startswith(prefix) else prefix + key
            assert name in known, f"{path.name}: {section}.{key} is not an `accelerate launch` option"
    assert args.num_processes >= 1 and args.mixed_precision == config.mixed_precision

    if config.distributed_type == DistributedType.DEEPSPEED:
        from accelerate.utils import DeepSpeedPlugin
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        ds = config.deepspeed_config
        assert ds.get("zero_stage") in (0, 1, 2, 3)
        for key in ("offload_optimizer_device", "offload_param_device"):
            assert ds.get(key, "none") in ("none", "cpu", "nvme"), key
        # what launch hands the training processes, then the plugin the Accelerator builds from it
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
        with pytest.MonkeyPatch.context() as launched:
            for key, value in env.items():
                if key.startswith("ACCELERATE_"):
                    launched.setenv(key, value)
            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision(config.mixed_precision)  # as the Accelerator does
        assert plugin.zero_stage == ds["zero_stage"]
        # every GPU training recipe must run under it: the Trainer fills / checks its config from the recipe
        # (propagate_args_to_deepspeed, then deepspeed_init)
        recipes = [
            p
            for p in _of_kind("train_clip") + _of_kind("train_llava")
            if not _raw(p).get("use_cpu") and "deepspeed" not in _raw(p)
        ]
        assert recipes
        for recipe in recipes:
            _check_ds_config_for(dict(plugin.hf_ds_config.config), parse_training_config(recipe)[2])

    if config.distributed_type == DistributedType.FSDP:
        fsdp = config.fsdp_config
        version = int(fsdp.get("fsdp_version", 1))
        assert version in (1, 2)
        assert fsdp["fsdp_auto_wrap_policy"] in constants.FSDP_AUTO_WRAP_POLICY
        assert fsdp.get("fsdp_backward_prefetch", "NO_PREFETCH") in constants.FSDP_BACKWARD_PREFETCH
        states = constants.FSDP_STATE_DICT_TYPE if version == 1 else constants.FSDP2_STATE_DICT_TYPE
        assert fsdp["fsdp_state_dict_type"] in states
        if version == 1:
            assert fsdp["fsdp_sharding_strategy"] in constants.FSDP_SHARDING_STRATEGY
        if fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP":
            for cls_name in str(fsdp["fsdp_transformer_layer_cls_to_wrap"]).split(","):
                found = [m for m in FSDP_LAYER_MODULES if hasattr(importlib.import_module(m), cls_name.strip())]
                assert found, f"{path.name}: no layer class {cls_name!r} in {FSDP_LAYER_MODULES} (extend the list)"


@pytest.mark.parametrize("path", _of_kind("accelerate"), ids=_rel)
def test_accelerate_fsdp_config_builds_the_plugin(path, monkeypatch):
    """The FSDP plugin the Accelerator builds from what ``accelerate launch`` exports (its own value checks)."""
    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch

    args, _, _, _ = _launch_args(path)
    if not args.use_fsdp:
        pytest.skip("not an FSDP config")
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    if not torch.cuda.is_available():  # sync_module_states asks for the device, nothing else needs one
        # accelerate < 1.16 asks is_cuda_available() + torch.cuda.current_device(),
        # 1.16+ get_torch_accelerator_backend()
        if hasattr(accelerate_dataclasses, "get_torch_accelerator_backend"):
            monkeypatch.setattr(
                accelerate_dataclasses, "get_torch_accelerator_backend", lambda *a, **k: ("cuda", torch.cuda)
            )
        if hasattr(accelerate_dataclasses, "is_cuda_available"):
            monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    fsdp = _raw(path)["fsdp_config"]
    assert plugin.fsdp_version == int(fsdp.get("fsdp_version", 1))
    assert plugin.use_orig_params == bool(fsdp.get("fsdp_use_orig_params", plugin.use_orig_params))
    if fsdp.get("fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP":
        names = plugin.transformer_cls_names_to_wrap
        names = names.split(",") if isinstance(names, str) else list(names or [])
        assert names == [n.strip() for n in str(fsdp["fsdp_transformer_layer_cls_to_wrap"]).split(",")], names
