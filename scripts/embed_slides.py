#!/usr/bin/env python
"""Embed a cohort of tile-feature H5 files, one vector per slide. The same command as the ``wsi-embed-slides``
console script (``wsi_clip/commands/embed.py``).

    python scripts/embed_slides.py --model_name_or_path gigapath-slide-encoder --slides features/ \\
        --output_dir embeddings/
    torchrun --nproc_per_node 8 scripts/embed_slides.py --model_name_or_path ... --slides cohort.csv ...
    python scripts/embed_slides.py --help
"""

from wsi_clip.commands.embed import main

if __name__ == "__main__":
    main()
