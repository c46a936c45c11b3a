#!/usr/bin/env python
"""Write the synthetic demo data set (real texts + synthetic slide features); see ``processing/demo_data.py``.

Same as the ``wsi-make-demo-data`` console script, runnable from a checkout without installing::

    python scripts/make_demo_data.py --output_dir demo_data --feature_dim 128 --num_cases 64
    python scripts/make_demo_data.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a checkout

from processing.demo_data import main  # noqa: E402

if __name__ == "__main__":
    main()
