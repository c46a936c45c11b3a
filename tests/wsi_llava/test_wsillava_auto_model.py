"""A saved WSI-LLaVA checkpoint serves ``AutoModel`` too: its ``config.json`` ``auto_map`` lists
``modeling_wsillava.WSILlavaModel``, so ``AutoModel.from_pretrained(ckpt, trust_remote_code=True)`` works where the
package is not installed (stage-2-style save and the merged stage-3 checkpoint)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from wsi_llava import build_generation_inputs

from wsillava_utils import random_slides, run_without_package, tiny_model, tiny_processor

EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_wsillava.WSILlavaConfig",
    "AutoModel": "modeling_wsillava.WSILlavaModel",
    "AutoModelForImageTextToText": "modeling_wsillava.WSILlavaForConditionalGeneration",
}

REMOTE_AUTO_MODEL = """
import torch
from transformers import AutoModel
for ckpt in sys.argv[1:]:
    model, info = AutoModel.from_pretrained(ckpt, trust_remote_code=True, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "WSILlavaModel", type(model)
    assert type(model).__module__.startswith("transformers_modules") and \\
        type(model).__module__.endswith("modeling_wsillava"), type(model).__module__
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ref = torch.load(ckpt + "/ref.pt")
    state = model.state_dict()
    for name, value in ref["weights"].items():
        assert torch.equal(state[name], value), name
    with torch.no_grad():
        hidden = model(**ref["inputs"]).last_hidden_state
    assert torch.allclose(hidden, ref["hidden"], atol=1e-5), (hidden - ref["hidden"]).abs().max()
    print("AUTO_MODEL_OK", ckpt)
"""

COMPARED = (
    "multi_modal_projector.gamma",
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.bias",
    "language_model.layers.0.self_attn.q_proj.weight",
    "language_model.embed_tokens.weight",
    "vision_tower.patch_embed.weight",
)


def _check_auto_map(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == EXPECTED_AUTO_MAP
    assert (folder / "modeling_wsillava.py").is_file()  # the module named by every modeling_wsillava.* entry


def _write_reference(model, processor, folder) -> dict[str, torch.Tensor]:
    inputs = dict(build_generation_inputs(processor, random_slides([8, 5]), ["grade ?", "what is the diagnosis ?"]))
    base = model.model.eval()
    state = base.state_dict()
    weights = {name: state[name].clone() for name in COMPARED}
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
    torch.save({"weights": weights, "inputs": inputs, "hidden": hidden}, folder / "ref.pt")
    return weights


def test_auto_model_with_remote_code_from_stage2_and_merged_stage3_checkpoints(tmp_path):
    from wsi_llava import WSILlavaForConditionalGeneration
    from wsi_llava.arguments import DEFAULT_LORA_TARGETS
    from wsi_llava.assembly import merge_adapter, prepare_stage

    processor = tiny_processor()
    model = tiny_model(processor)
    stage2 = tmp_path / "stage2"
    model.save_pretrained(stage2)
    _check_auto_map(stage2)
    stage2_weights = _write_reference(model, processor, stage2)

    # stage 3: LoRA + projector copy (made non-trivial), saved as adapters, merged as train_llava --merge does
    peft_model = prepare_stage(
        WSILlavaForConditionalGeneration.from_pretrained(stage2),
        SimpleNamespace(stage=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=DEFAULT_LORA_TARGETS),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "modules_to_save" in name and name.endswith("gamma"):
                p.fill_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    merge_adapter(str(stage2), str(tmp_path / "adapter"), str(merged_dir))
    _check_auto_map(merged_dir)
    merged = WSILlavaForConditionalGeneration.from_pretrained(merged_dir)
    merged_weights = _write_reference(merged, processor, merged_dir)
    assert merged_weights["multi_modal_projector.gamma"].item() == 0.5
    q = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_weights[q], stage2_weights[q])  # the LoRA delta is merged in

    result = run_without_package(REMOTE_AUTO_MODEL, stage2, merged_dir, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("AUTO_MODEL_OK") == 2, result.stdout[-2000:]
