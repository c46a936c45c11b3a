#!/usr/bin/env python
"""Linear probe, k-NN and few-shot on cohort slide embeddings (from scripts/embed_slides.py), beside the mean of the
tile features. The same command as the ``wsi-probe-embeddings`` console script (``wsi_clip/commands/probe.py``).

    python scripts/probe_embeddings.py --embeddings emb/slide_features_gigapath --test_file cohort.csv
    python scripts/probe_embeddings.py --help
"""

from wsi_clip.commands.probe import main

if __name__ == "__main__":
    main()
