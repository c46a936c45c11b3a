#!/usr/bin/env python
"""Train WSI-LLaVA: stage 2 (projector only) or stage 3 (LoRA on the LM + projector). The same command as the
``wsi-train-llava`` console script (``wsi_llava/commands/train.py``; options: ``wsi_llava/arguments.py``).

    python scripts/train_llava.py --stage 2 scripts/configs/demo_llava_stage2.yaml \\
        --slide_encoder_name_or_path runs/demo/clip
    accelerate launch scripts/train_llava.py --stage 3 scripts/configs/demo_llava_stage3.yaml --merge true
    python scripts/train_llava.py --help
"""

from wsi_llava.commands.train import main

if __name__ == "__main__":
    main()
