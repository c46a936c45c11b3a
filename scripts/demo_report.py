"""Figures, metrics and the results table of the offline demo (``scripts/run_demo.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# headline metric -> (where it is in metrics.json, the baseline it must beat)
HEADLINES = {
    "zero-shot balanced accuracy (4 classes)": ("clip/zero_shot_balanced_accuracy", "clip/chance_accuracy"),
    "slide→text Recall@1": ("clip/slide_to_text_recall_at_1", "clip/chance_recall_at_1"),
    "closed VQA accuracy (diagnosis)": ("llava_diagnosis/accuracy", "llava_diagnosis/blind_baseline"),
    "report ROUGE-L vs the same LM + LoRA without the slide": (
        "llava_reports/open_rouge_l",
        "llava_reports_text_only/open_rouge_l",
    ),
}
REPORT_HEADLINES = ("report ROUGE-L vs the same LM + LoRA without the slide",)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())["metrics"]


def collect_metrics(clip_eval: Path, llava_evals: dict[str, Path], losses: Path | None = None) -> dict[str, Any]:
    """One flat dictionary of the demo's metrics with their chance / blind baselines."""
    clip = dict(_load(clip_eval))
    num_classes = 4
    texts = clip.get("num_texts") or clip.get("num_slides") or 0
    clip["chance_accuracy"] = 1.0 / num_classes
    clip["chance_recall_at_1"] = 1.0 / texts if texts else 0.0
    out: dict[str, Any] = {"clip": clip}
    for name, path in llava_evals.items():
        report = _load(path)
        entry: dict[str, Any] = {}
        if report.get("closed"):
            closed = report["closed"]
            entry.update(closed)
            entry["blind_baseline"] = max(closed["majority_baseline"], closed["random_baseline"])
        if report.get("open"):
            entry.update({f"open_{k}": v for k, v in report["open"].items()})
        out[f"llava_{name}"] = entry
    if losses is not None:
        report = _load(losses)
        out["report_loss"] = {
            "stage2": report["loss"]["answer_loss"],
            "text_only": report["loss_text_only"]["answer_loss"],
        }
    return out


def _get(metrics: dict[str, Any], key: str) -> float | None:
    node: Any = metrics
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node)


def judge(metrics: dict[str, Any], reports_judged: bool = True) -> dict[str, bool]:
    """Each headline metric must be above its baseline (a missing metric fails). ``reports_judged=False`` (the
    ``--quick`` demo's tiny LM, which cannot write reports) leaves the report headline out."""
    verdicts = {}
    for name, (value_key, baseline_key) in HEADLINES.items():
        if name in REPORT_HEADLINES and not reports_judged:
            continue
        value, baseline = _get(metrics, value_key), _get(metrics, baseline_key)
        verdicts[name] = value is not None and baseline is not None and value > baseline
    return verdicts


def results_table(metrics: dict[str, Any], figures: list[Path]) -> str:
    """The Markdown tables printed at the end of the demo and saved as ``results.md``."""
    lines = [
        "## Demo results (held-out test split)",
        "",
        f"Language model: {metrics.get('language_model', '?')}",
        "",
        "| metric | value | baseline | above baseline |",
        "|---|---|---|---|",
    ]
    verdicts = metrics.get("verdicts", {})
    for name, (value_key, baseline_key) in HEADLINES.items():
        value, baseline = _get(metrics, value_key), _get(metrics, baseline_key)
        mark = "yes" if verdicts.get(name) else ("**NO**" if name in verdicts else "not judged (--quick)")
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(baseline)} | {mark} |")
    extra = [
        ("zero-shot macro AUROC", "clip/zero_shot_macro_auroc", 0.5),
        ("text→slide Recall@1", "clip/text_to_slide_recall_at_1", None),
        ("slide→text Recall@5", "clip/slide_to_text_recall_at_5", None),
        (
            "closed VQA accuracy (diagnosis), same LM + LoRA without the slide",
            "llava_diagnosis_text_only/accuracy",
            _get(metrics, "llava_diagnosis_text_only/blind_baseline"),
        ),
        (
            "closed VQA accuracy (real SlideBench / WSI-Bench questions)",
            "llava_vqa/accuracy",
            _get(metrics, "llava_vqa/blind_baseline"),
        ),
    ]
    for name, key, baseline in extra:
        value = _get(metrics, key)
        if value is not None:
            lines.append(f"| {name} | {_fmt(value)} | {_fmt(baseline)} | |")
    loss = metrics.get("report_loss", {})
    if loss:
        lines += [
            "",
            "Held-out report loss (teacher-forced, nats per report token, whole reports):",
            "",
            "| the LM alone, no slide | after stage 2 (projector only), with the slide |",
            "|---|---|",
            f"| {_fmt(loss.get('text_only'))} | {_fmt(loss.get('stage2'))} |",
        ]
    lines += ["", "Reports (held-out test slides):", "", "| model | BLEU-1 | BLEU-4 | ROUGE-L |", "|---|---|---|---|"]
    for label, key in (
        ("WSI-LLaVA (slide + prompt)", "llava_reports"),
        ("(a) same LM + LoRA recipe, no slide", "llava_reports_text_only"),
        ("(b) retrieval: nearest training report in WSI-CLIP space", "llava_reports_retrieval"),
    ):
        if key in metrics:
            row = [_fmt(_get(metrics, f"{key}/open_{m}")) for m in ("bleu_1", "bleu_4", "rouge_l")]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    if figures:
        lines += ["", "Figures: " + ", ".join(f"`{p.name}`" for p in figures)]
    lines += [
        "",
        "Baselines: chance for zero-shot (1 / classes) and retrieval (1 / test texts); for closed questions "
        "the better of the per-kind majority answer of the training set and random guessing; for reports the "
        "same LM trained with the same LoRA recipe on the same data but without the slide, and the training "
        "report nearest to the slide in WSI-CLIP space. The real VQA questions ask about grades, stages and "
        "markers that the synthetic slide features do not encode, so only the diagnosis question is expected "
        "to beat its blind baseline.",
    ]
    return "\n".join(lines) + "\n"


def example_reports(evals: dict[str, Path], count: int = 3, width: int = 300) -> str:
    """Generated reports next to their references (and both baselines) for the first ``count`` test slides."""
    if "reports" not in evals or not Path(evals["reports"]).is_file():
        return ""
    items = {
        name: json.loads(Path(path).read_text())["items"]
        for name, path in evals.items()
        if name.startswith("reports") and Path(path).is_file()
    }
    labels = {"reports": "WSI-LLaVA", "reports_text_only": "no slide (a)", "reports_retrieval": "retrieval (b)"}
    lines = ["", "### Example reports (held-out slides)", ""]
    for i, item in enumerate(items["reports"][:count]):
        lines.append(f"**{i + 1}. {Path(item['h5_path']).stem}** — reference: {_clip(item['answer'], width)}")
        lines.append("")
        for name, label in labels.items():
            if name in items and i < len(items[name]):
                lines.append(f"- {label}: {_clip(items[name][i]['prediction'], width)}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def draw_curves(out: Path, runs: list[Path], report_loss: dict[str, float] | None = None) -> list[Path]:
    """Training-loss (and eval) curves of each run from its ``trainer_state.json`` / ``log_history.json``; the stage-2
    panel also shows the held-out report loss of the LM alone and after stage 2 (``report_loss``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for run in runs:
        for name in ("trainer_state.json", "log_history.json"):
            path = run / name
            if path.is_file():
                state = json.loads(path.read_text())
                history = state["log_history"] if isinstance(state, dict) else state
                series[run.name] = history
                break
    if not series:
        return []
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), dpi=110, squeeze=False)
    for ax, (name, history) in zip(axes[0], series.items()):
        steps = [h["step"] for h in history if "loss" in h]
        ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss")
        evals = [
            (h["step"], h["eval_zero_shot_balanced_accuracy"])
            for h in history
            if "eval_zero_shot_balanced_accuracy" in h
        ]
        if evals:
            twin = ax.twinx()
            twin.plot(*zip(*evals), "o-", color="tab:green", label="val zero-shot bal. acc.")
            twin.set_ylim(0, 1)
            twin.legend(loc="upper right", fontsize=7)
        if name == "llava_stage2" and report_loss:
            for key, label, style in (
                ("text_only", "held-out: the LM alone, no slide", "--"),
                ("stage2", "held-out: after stage 2, with the slide", ":"),
            ):
                if report_loss.get(key) is not None:
                    ax.axhline(
                        report_loss[key],
                        color="black",
                        linestyle=style,
                        linewidth=1,
                        label=f"{label} ({report_loss[key]:.3f})",
                    )
        ax.set_title(
            {
                "clip": "WSI-CLIP",
                "llava_stage2": "WSI-LLaVA stage 2 (projector)",
                "llava_stage3": "WSI-LLaVA stage 3 (LoRA; length-grouped batches:\nreports ≈ 2–3, closed "
                "questions < 1)",
            }.get(name, name),
            fontsize=9,
        )
        ax.set_xlabel("step")
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


@torch.no_grad()
def draw_heatmaps(out: Path, clip_dir: Path, llava_dir: Path, data: Path, num_slides: int = 2) -> list[Path]:
    """For a few test slides: the planted lesion, the slide encoder's CLS attention, the similarity of each tile
    to its class prompt in the joint space, and the tiles PruMerge+ keeps for the LLM."""
    from transformers import AutoModel, AutoModelForImageTextToText

    import wsi_clip  # noqa: F401  (registers the Auto classes)
    import wsi_llava  # noqa: F401
    from processing import WSIProcessor, load_annotations
    from wsi_clip.heatmaps import render_tile_heatmap, tile_attention, tile_text_similarity
    from wsi_llava.heatmaps import selected_tiles

    figures: list[Path] = []
    lesions = json.loads((data / "lesion_tiles.json").read_text())
    prompts = json.loads((data / "class_prompts.json").read_text())
    rows = load_annotations(data / "annotations.csv", "clip", split="test")
    clip = AutoModel.from_pretrained(clip_dir).eval()
    processor = WSIProcessor.from_pretrained(clip_dir)
    llava = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    tile_size = int(clip.config.slide_config.tile_size)
    heat_dir = out / "heatmaps"
    for row in list(rows)[:num_slides]:
        batch = processor(slides=[row["h5_path"]], max_tiles=None, tile_sampling="all")
        feats, coords, mask = batch["tile_features"], batch["tile_coords"], batch["tile_mask"]
        slide_id, label = row["slide_id"], row["label"]
        lesion = {tuple(c) for c in lesions[slide_id]["lesion_coords"]}
        truth = torch.tensor([tuple(c) in lesion for c in coords[0].tolist()])
        figures.append(
            render_tile_heatmap(
                coords[0],
                None,
                heat_dir / f"{slide_id}_lesion.png",
                tile_size=tile_size,
                kept=truth,
                kept_labels=("lesion", "background"),
                title=f"{slide_id} ({label}): planted lesion tiles (ground truth)",
            )
        )
        figures.append(
            render_tile_heatmap(
                coords[0],
                tile_attention(clip, feats, coords, mask),
                heat_dir / f"{slide_id}_cls_attention.png",
                tile_size=tile_size,
                score_label="attention",
                title=f"{slide_id}: slide-encoder CLS attention (mean over heads)",
            )
        )
        prompt = prompts["classnames"][label][0]
        figures.append(
            render_tile_heatmap(
                coords[0],
                tile_text_similarity(clip, processor, prompt, feats, coords, mask),
                heat_dir / f"{slide_id}_similarity.png",
                tile_size=tile_size,
                score_label="cosine similarity",
                title=f"{slide_id}: tile ↔ '{prompt}'",
            )
        )
        kept = selected_tiles(llava, feats, coords, mask, token_selection="prumerge_plus")
        figures.append(
            render_tile_heatmap(
                coords[0],
                None,
                heat_dir / f"{slide_id}_prumerge_plus.png",
                tile_size=tile_size,
                kept=kept,
                title=f"{slide_id}: tiles kept by PruMerge+ for the LLM",
            )
        )
    return figures
