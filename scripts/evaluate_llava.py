#!/usr/bin/env python
"""Evaluate WSI-LLaVA: closed questions → accuracy beside blind baselines; open answers / reports → BLEU, ROUGE-L;
``--mode loss`` / ``--mode retrieval`` baselines. The same command as the ``wsi-evaluate-llava`` console script
(``wsi_llava/commands/evaluate.py``).

    python scripts/evaluate_llava.py --model_name_or_path runs/demo/llava_stage2 \\
        --adapter runs/demo/llava_stage3 --test_file runs/demo/data/llava_instruct_test.json \\
        --output runs/demo/llava_eval.json
    python scripts/evaluate_llava.py --help
"""

from wsi_llava.commands.evaluate import main

if __name__ == "__main__":
    main()
