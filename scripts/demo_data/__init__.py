"""The synthetic demo data set (not part of the installed packages): real pathology texts from ``texts/`` paired
with synthetic slide feature bags written in every H5 layout. ``scripts/make_demo_data.py`` is its command line;
``scripts/build_demo_texts.py`` regenerates ``texts/``.

Importable as ``demo_data`` with ``scripts/`` on ``sys.path`` (a script run from ``scripts/`` has it; the tests'
``conftest.py`` adds it).
"""

from .generator import (
    CLASS_PROMPTS,
    CSV_COLUMNS,
    DEMO_CLASSES,
    DEMO_TEXTS_DIR,
    SPLITS,
    ZERO_SHOT_TEMPLATES,
    DemoDataArguments,
    DemoText,
    MultipleChoiceQuestion,
    diagnosis_question,
    load_demo_texts,
    main,
    make_demo_dataset,
)

__all__ = [
    "make_demo_dataset",
    "main",
    "load_demo_texts",
    "diagnosis_question",
    "DemoDataArguments",
    "DemoText",
    "MultipleChoiceQuestion",
    "CLASS_PROMPTS",
    "ZERO_SHOT_TEMPLATES",
    "DEMO_CLASSES",
    "DEMO_TEXTS_DIR",
    "CSV_COLUMNS",
    "SPLITS",
]
