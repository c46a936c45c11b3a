"""The WSI-CLIP commands, each a module with ``main(argv: list[str] | None = None)`` (the console scripts of
``setup.cfg`` and the thin ``scripts/*.py`` entry points call them):

* ``train`` — ``wsi-train-clip`` (``scripts/train_clip.py``): train WSI-CLIP with the Hugging Face Trainer;
* ``evaluate`` — ``wsi-evaluate-clip`` (``scripts/evaluate_clip.py``): zero-shot classification and retrieval;
* ``convert_gigapath`` — ``wsi-convert-gigapath`` (``scripts/convert_gigapath.py``): the original Prov-GigaPath
  slide encoder checkpoint → a Hugging Face folder;
* ``push`` — ``wsi-push-to-hub`` (``scripts/push_to_hub.py``): stage, validate and upload a checkpoint of any kind.
"""
