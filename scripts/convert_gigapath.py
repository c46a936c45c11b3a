#!/usr/bin/env python
"""Convert the original Prov-GigaPath slide encoder checkpoint into a Hugging Face folder. The same command as the
``wsi-convert-gigapath`` console script (``wsi_clip/commands/convert_gigapath.py``).

    python scripts/convert_gigapath.py --checkpoint slide_encoder.pth --output_dir gigapath-slide-encoder \\
        [--max_wsi_size 262144] [--tile_size 256] [--pooling cls|mean]
    python scripts/convert_gigapath.py --help
"""

from wsi_clip.commands.convert_gigapath import main

if __name__ == "__main__":
    main()
