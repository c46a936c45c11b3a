"""The WSI-LLaVA commands, each a module with ``main(argv: list[str] | None = None)`` (the console scripts of
``setup.cfg`` and the thin ``scripts/*.py`` entry points call them):

* ``train`` — ``wsi-train-llava`` (``scripts/train_llava.py``): stage 2 (projector) or stage 3 (LoRA + projector);
* ``evaluate`` — ``wsi-evaluate-llava`` (``scripts/evaluate_llava.py``): closed-question accuracy beside blind
  baselines, open answers / reports (BLEU, ROUGE-L), answer loss, the retrieval baseline;
* ``prepare_language_model`` — ``wsi-prepare-language-model`` (``scripts/prepare_language_model.py``): a causal LM
  (a ``.gguf`` file, a folder or a Hub id) as a plain safetensors folder.
"""
