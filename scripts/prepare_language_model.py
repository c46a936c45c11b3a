#!/usr/bin/env python
"""Prepare a causal LM as a plain safetensors folder (a ``.gguf`` file is dequantised once, cached) and print the
folder. The same command as the ``wsi-prepare-language-model`` console script
(``wsi_llava/commands/prepare_language_model.py``).

    python scripts/prepare_language_model.py --language_model gguf:smollm2 [--output_dir smollm2/]
    python scripts/prepare_language_model.py --help
"""

from wsi_llava.commands.prepare_language_model import main

if __name__ == "__main__":
    main()
