#!/usr/bin/env python
"""Publish a checkpoint folder of any kind (WSI-CLIP, slide encoder, WSI-LLaVA) to the Hugging Face Hub with a
generated model card. The same command as the ``wsi-push-to-hub`` console script (``wsi_clip/commands/push.py``).

    python scripts/push_to_hub.py --model_name_or_path runs/demo/clip --repo_id user/wsi-clip-demo --dry_run
    python scripts/push_to_hub.py --model_name_or_path runs/demo/clip --repo_id user/wsi-clip-demo [--private]
    python scripts/push_to_hub.py --help
"""

import sys

from wsi_clip.commands.push import main

if __name__ == "__main__":
    sys.exit(main())
