#!/usr/bin/env python
"""Write the synthetic demo data set (real texts + synthetic slide features); see ``scripts/demo_data/``.

Runnable from a checkout (the generator is not part of the installed packages)::

    python scripts/make_demo_data.py --output_dir demo_data --feature_dim 128 --num_cases 64
    python scripts/make_demo_data.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))  # the repository root, for processing in a checkout
sys.path.insert(0, str(SCRIPTS))  # scripts/demo_data, ahead of any demo_data/ output folder in the working directory

from demo_data import main  # noqa: E402

if __name__ == "__main__":
    main()
