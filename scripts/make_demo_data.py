#!/usr/bin/env python
"""Write the synthetic demo data set (real texts + synthetic slide features); see ``scripts/demo_data/``.

Runnable from a checkout (the generator is not part of the installed packages)::

    python scripts/make_demo_data.py --output_dir demo_data --feature_dim 128 --num_cases 64
    python scripts/make_demo_data.py --help
"""

from __future__ import annotations

from demo_data import main  # scripts/demo_data: Python puts this script's folder first on sys.path

if __name__ == "__main__":
    main()
