#!/usr/bin/env python
"""Evaluate a WSI-CLIP checkpoint: zero-shot classification and slide↔text retrieval. The same command as the
``wsi-evaluate-clip`` console script (``wsi_clip/commands/evaluate.py``).

    python scripts/evaluate_clip.py --model_name_or_path runs/demo/clip \\
        --test_file runs/demo/data/annotations.csv --test_split test \\
        --class_prompts runs/demo/data/class_prompts.json
    torchrun --nproc_per_node 8 scripts/evaluate_clip.py --model_name_or_path ... --test_file ...
    python scripts/evaluate_clip.py --help
"""

from wsi_clip.commands.evaluate import main

if __name__ == "__main__":
    main()
