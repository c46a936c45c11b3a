#!/usr/bin/env python
"""Raw slides → tile-feature H5 files (tissue segmentation, tiling, any tile encoder), resumable. The same command as
the ``wsi-extract-features`` console script (``wsi_clip/commands/extract_features.py``).

    python scripts/extract_features.py --slides slides/ --output_dir features/ --encoder /models/phikon-v2
    python scripts/extract_features.py --help
"""

from wsi_clip.commands.extract_features import cli

if __name__ == "__main__":
    raise SystemExit(cli())
