"""``wsi-probe-embeddings``: linear probe, k-NN and few-shot on the slide embeddings ``wsi-embed-slides`` wrote.

    wsi-probe-embeddings --embeddings emb/slide_features_gigapath --test_file cohort.csv --label_column label

Folds are stratified and split by case (``case_id`` column; default: each slide its own case); every method reports
balanced accuracy and macro AUROC as the mean over folds with a 95 % confidence interval. With ``--reference true``
(the default) the same probes run on the mean of each slide's tile features, printed beside the model: the baseline
every slide model must beat (:mod:`wsi_clip.probes`). Metrics go to ``--output`` (default
``<embeddings folder>/probes.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..arguments import ProbeArguments, ProbeOptions
from ..cli import exit_status, parse_command_line, setup_logging

logger = logging.getLogger(__name__)

COMMAND = "wsi-probe-embeddings"


def probe_settings(options: ProbeOptions):
    from wsi_clip.probes import ProbeSettings

    return ProbeSettings(
        folds=options.probe_folds,
        seed=options.probe_seed,
        C=options.probe_c,
        knn_k=options.knn_k,
        shots=tuple(options.few_shot),
        episodes=options.few_shot_episodes,
    )


def encode_labels(values: list, source: str, column: str) -> tuple[list[int], list[str]]:
    """Class names sorted, and each row's index into them (``-1`` for an empty label)."""
    names = sorted({str(v).strip() for v in values if str(v).strip() not in ("", "None", "nan")})
    if len(names) < 2:
        raise ValueError(f"{source}: column {column!r} has {len(names)} distinct label(s); probes need at least 2.")
    index = {n: i for i, n in enumerate(names)}
    return [index.get(str(v).strip(), -1) for v in values], names


def probe(args: ProbeArguments, options: ProbeOptions) -> dict[str, dict[str, float]]:
    from processing import AnnotationError, list_slide_files
    from wsi_clip.probes import format_probe_table, mean_tile_features, run_probes
    from wsi_clip.slide_embedding import load_cohort_embeddings

    embeddings, slide_ids, meta = load_cohort_embeddings(args.embeddings)
    rows = list_slide_files(args.test_file, args.h5_root)
    if args.test_split:
        rows = [r for r in rows if str(r.get("split", "")) == args.test_split]
    if rows and args.label_column not in rows[0]:
        raise AnnotationError(f"{args.test_file}: no {args.label_column!r} column (pass --label_column).")
    position = {s: i for i, s in enumerate(slide_ids)}
    missing = [r["slide_id"] for r in rows if r["slide_id"] not in position]
    if missing:
        raise AnnotationError(
            f"{args.test_file}: {len(missing)} slide(s) have no embedding in {args.embeddings} (e.g. "
            f"{missing[:3]}); run wsi-embed-slides on them first (slide ids are the file names without .h5)."
        )
    labels, classes = encode_labels([r.get(args.label_column) for r in rows], args.test_file, args.label_column)
    cases = [str(r.get("case_id") or r["slide_id"]) for r in rows]
    settings = probe_settings(options)
    name = meta.get("model", "embeddings")
    results = {name: run_probes(embeddings[[position[r["slide_id"]] for r in rows]], labels, cases, settings)}
    if options.reference:
        reference = mean_tile_features([r["h5_path"] for r in rows], max_tiles=args.max_tiles)
        results["mean of tile features (reference)"] = run_probes(reference, labels, cases, settings)
    print(f"{len(rows)} slides, {len(set(cases))} cases, classes {classes}")
    print(format_probe_table(results, settings.shots))
    folder = Path(args.embeddings)
    output = Path(args.output) if args.output else (folder if folder.is_dir() else folder.parent) / "probes.json"
    output.write_text(json.dumps({"classes": classes, "results": results}, indent=1) + "\n", encoding="utf-8")
    logger.info("metrics written to %s", output)
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args, options = parse_command_line((ProbeArguments, ProbeOptions), argv, COMMAND)
    setup_logging()
    return probe(args, options)


def cli() -> int:
    """The ``wsi-probe-embeddings`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
