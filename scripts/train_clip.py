#!/usr/bin/env python
"""Train WSI-CLIP (slide tower + text encoder, multi-positive contrastive loss) with the Hugging Face Trainer.
The same command as the ``wsi-train-clip`` console script (``wsi_clip/commands/train.py``).

One config file (YAML or JSON; its keys are the fields of ModelArguments, DataArguments (``wsi_clip/arguments.py``)
and TrainingArguments), optionally followed by flags that override it, or flags only::

    python scripts/train_clip.py scripts/configs/demo_clip.yaml
    python scripts/train_clip.py scripts/configs/demo_clip.yaml --num_train_epochs 2 --output_dir out/clip
    accelerate launch --config_file scripts/configs/accelerate/ddp.yaml scripts/train_clip.py \\
        scripts/configs/clip_gigapath_8gpu.yaml
    torchrun --nproc_per_node 2 scripts/train_clip.py scripts/configs/demo_clip.yaml   # 2 CPU processes
    python scripts/train_clip.py --help
"""

from wsi_clip.commands.train import main

if __name__ == "__main__":
    main()
