"""``python scripts/benchmark.py llava``: the WSI-LLaVA token-selection trade-off, measured side by side in one run.

Two modes (``--mode``):

**trained** (default) — the trained, merged demo checkpoint (``--model``, default ``runs/demo/llava_stage3/merged``:
WSI-CLIP LongNet slide tower + SmolLM2-135M-Instruct, stage 3 trained with ``prumerge_plus``, ``max_tokens`` 32) on
the demo's held-out test split (``--data_dir``, default ``runs/demo/data``). Per strategy — ``none`` (every tile),
``uniform``, ``prumerge`` (adaptive, uncapped), ``prumerge_plus`` (as trained) and ``topk_prompt``; the capped ones
with ``max_tokens`` = ``--max_tokens`` (32) — and on the same items for every strategy:

* **diagnosis accuracy**: the closed 4-option questions of ``llava_diagnosis_test.json`` (letter answers, greedy,
  4 new tokens, as ``scripts/run_demo.py`` evaluates them), beside the blind baselines (majority answer of the
  training file, uniform guessing); Δ accuracy in points vs ``none``;
* **report ROUGE-L**: the first ``--report_items`` (12) reports of ``llava_caption_test.json``, greedy,
  ``--report_max_new_tokens`` (48) new tokens;
* **visual tokens kept** per slide (mean over the diagnosis items);
* **prefill time** per prompt, batch 1, best of ``--prefill_repeats``: the spliced LM forward that ``generate()``
  runs before decoding — selection (incl. scoring projections / question embedding) + projector + splice + LM
  prefill with KV cache + the last position's logits, from the slide tower's outputs (computed once per slide,
  with the CLS-attention row; the tower's own time, the same for every strategy, is printed beside it, and the
  speed-up including it in an extra column). A *floor* row times the same prompt without the slide (0 visual
  tokens): no selector can beat ``none / floor``.

The demo slides are small (61–288 tiles, capped at the processor's 256), so there the prefill ratio is bounded by
``(text + N) / (text + K)`` (≈ 2.4× for ~70 prompt tokens, ~170 tiles, K = 32). The **5× target is meant for slides
of thousands of tiles**, so the prefill is also timed on **enlarged slides** of ``--large_tiles`` tiles (default
2,048 / 4,096 / 8,192), built from real held-out tiles: the item's own test slide, then the other test slides with
the same gold answer (the same class: the demo's diagnosis is planted in the slide features), in file order and
cycled, each slide's tiles moved to a block of a larger grid (block = the largest test slide's tile bounding box + a
2-cell gap, blocks row-major on a square arrangement), the last block cut in row-major tile order to exactly the
requested size. Diagnosis accuracy is also reported on the enlarged slides of ``--large_accuracy_tiles`` tiles for
the first ``--large_accuracy_items`` items — **not a held-out measurement** (the model never saw slides this large,
and the enlargement is stitched from several held-out slides of the answer's class, chosen with the gold answer).

Finally the **training step** of WSI-LLaVA vs a text-only step of the same LM: the demo's stage-3 recipe (LoRA r 16 on
the LM + the projector trainable, via ``wsi_llava.assembly.prepare_stage``, AdamW), one forward + backward + optimizer
step on the same batch of ``--train_batch`` rows of ``--train_file`` (evenly spaced over the file), with the slide
(``InstructionCollator``, ``--train_max_tiles`` 256 tiles, the model's selector) and without it (the same prompts
minus the placeholder: ``text_only=True``); best of ``--train_repeats`` after a warm-up step; collate (H5 read) time
reported apart. The ratio is the slide path's overhead.

Targets (issue): PruMerge ≥ 5× faster prefill than ``none`` at ≤ 2 points diagnosis-accuracy loss (checked for
``prumerge`` and ``prumerge_plus``, on the held-out slides and on the enlarged slides; printed as met / NOT met).
With 30 held-out questions one item is 3.3 points, so the run also prints, per strategy, how many items it answered
differently from ``none`` (right→wrong / wrong→right). The run ends with the CPU time other processes used meanwhile
(``/proc/stat``): on a shared CPU, a run that was not alone says so (timings inflated; rerun when idle).

**synthetic** — the random-weight prefill suite (``--tiles`` tiles, Prov-GigaPath-sized slide encoder, SmolLM2-135M
shaped LM; only shapes matter): slide-encoder time, then per strategy the selection's own time, visual tokens kept,
the prefill time and peak memory (CUDA's max allocated on GPUs; on CPU the peak RSS increase, sampled every 2 ms).
Targets: prumerge prefill ≥ 5× faster than ``none``; selection ≤ 10 % of the slide encoder's time.

    python scripts/benchmark.py llava                       # trained (needs a finished scripts/run_demo.py run)
    python scripts/benchmark.py llava --model /tmp/full/llava_stage3/merged --data_dir /tmp/full/data
    python scripts/benchmark.py llava --mode synthetic --tiles 8192
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ALL_STRATEGIES = ["none", "uniform", "prumerge", "prumerge_plus", "topk_prompt"]
CAPPED = ("uniform", "prumerge_plus", "topk_prompt")  # run with max_tokens; prumerge stays adaptive (uncapped)


@dataclass
class Args:
    mode: str = field(
        default="trained",
        metadata={"help": "trained (the demo checkpoint) or synthetic (random weights, prefill cost only)"},
    )
    strategies: list[str] = field(default_factory=lambda: list(ALL_STRATEGIES))
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (bfloat16 on GPUs)"})
    # --- trained mode
    model: str = field(default="runs/demo/llava_stage3/merged", metadata={"help": "trained, merged WSI-LLaVA"})
    data_dir: str = field(default="runs/demo/data", metadata={"help": "the demo data folder (annotations + slides)"})
    diagnosis_file: str = field(default="llava_diagnosis_test.json", metadata={"help": "closed questions (data_dir)"})
    majority_file: str = field(
        default="llava_diagnosis_train.json",
        metadata={"help": "annotations the majority-answer baseline is taken from (data_dir)"},
    )
    report_file: str = field(default="llava_caption_test.json", metadata={"help": "reports (data_dir)"})
    train_file: str = field(default="llava_stage3_train.json", metadata={"help": "training rows (data_dir)"})
    max_tokens: int = field(default=32, metadata={"help": "max_tokens of uniform / prumerge_plus / topk_prompt"})
    max_items: int | None = field(default=None, metadata={"help": "diagnosis items (default: all)"})
    max_tiles: int | None = field(
        default=None,
        metadata={"help": "tile cap of held-out slides (default: the processor's, as in the demo evaluation)"},
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per generate() call"})
    report_items: int = field(default=12, metadata={"help": "reports generated per strategy"})
    report_batch_size: int = field(default=12, metadata={"help": "reports per generate() call"})
    report_max_new_tokens: int = field(default=48, metadata={"help": "report length (new tokens)"})
    prefill_items: int | None = field(default=None, metadata={"help": "held-out items timed (default: all)"})
    prefill_repeats: int = field(default=2, metadata={"help": "best-of repeats per prefill timing"})
    large_tiles: list[int] = field(
        default_factory=lambda: [2048, 4096, 8192],
        metadata={"help": "tile counts of the enlarged slides (empty: skip)"},
    )
    large_items: int = field(default=1, metadata={"help": "enlarged slides timed per size"})
    large_repeats: int = field(default=2, metadata={"help": "best-of repeats on enlarged slides"})
    large_budget_s: float = field(
        default=20.0,
        metadata={
            "help": "stop repeating an enlarged-slide timing once its runs took this long (the first run always counts)"
        },
    )
    large_accuracy_tiles: int = field(
        default=2048, metadata={"help": "size of the enlarged slides for accuracy (0: skip)"}
    )
    large_accuracy_items: int = field(default=8, metadata={"help": "items answered on enlarged slides"})
    train_batch: int = field(default=8, metadata={"help": "rows per training step (0: skip the step timing)"})
    train_repeats: int = field(default=2, metadata={"help": "best-of timed steps per variant (after 1 warm-up)"})
    train_max_tiles: int = field(default=256, metadata={"help": "tiles per slide in the training step (demo: 256)"})
    train_max_length: int = field(default=256, metadata={"help": "text tokens per row (demo: 256)"})
    train_bf16: bool = field(default=False, metadata={"help": "training step under CPU/GPU bf16 autocast"})
    output: str | None = field(default=None, metadata={"help": "also write every number as JSON here"})
    # --- synthetic mode
    tiles: int = field(default=8192, metadata={"help": "synthetic: tiles in the slide"})
    topk: int = field(default=256, metadata={"help": "synthetic: K of topk_prompt and uniform"})
    encoder_layers: int = field(default=12, metadata={"help": "synthetic: slide encoder depth (GigaPath: 12)"})
    encoder_width: int = field(default=768, metadata={"help": "synthetic: slide encoder width (GigaPath: 768)"})
    lm_layers: int = field(default=30, metadata={"help": "synthetic: LM depth (SmolLM2-135M: 30)"})
    lm_width: int = field(default=576, metadata={"help": "synthetic: LM width (SmolLM2-135M: 576)"})
    repeats: int = field(default=2, metadata={"help": "synthetic: best-of repeats per timing"})


def run(args: Args) -> dict[str, Any] | None:
    unknown = [s for s in args.strategies if s not in ALL_STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies {unknown}: choose from {ALL_STRATEGIES}.")
    if args.mode == "synthetic":
        run_synthetic(args)
        return None
    if args.mode == "trained":
        return run_trained(args)
    raise SystemExit(f"--mode {args.mode!r}: use trained or synthetic.")


# ================================================================================================ shared helpers
def _device(args: Args) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _trim() -> None:
    """Return freed heap pages to the OS (glibc), so an RSS peak is not hidden by memory an earlier run freed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(fn, device: str, repeats: int) -> tuple[float, float, object]:
    """Best-of-``repeats`` seconds, peak extra memory (MiB) and the last result of ``fn()``."""
    best, peak, result = float("inf"), 0.0, None
    for _ in range(repeats):
        result = None
        _trim()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            base, top, stop = _rss(), [0], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    top[0] = max(top[0], _rss())
                    time.sleep(0.002)

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            stop.set()
            thread.join()
            peak = max(peak, (max(top[0], _rss()) - base) / 2**20)
        best = min(best, elapsed)
    return best, peak, result


class CpuShare:
    """CPU time other processes used while the benchmark ran (Linux ``/proc/stat`` minus this process's own), so a
    run on a busy machine says so instead of reporting slowed-down timings as if they were clean."""

    def __init__(self) -> None:
        self.start = self._busy(), self._own(), time.perf_counter()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as fh:
                fields = [float(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return (sum(fields[:3]) + sum(fields[5:8])) / ticks  # user nice system irq softirq steal, seconds

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others_cores(self) -> float | None:
        """Mean number of cores busy with other processes since the start (None where /proc/stat is missing)."""
        busy0, own0, t0 = self.start
        busy = self._busy()
        if busy0 is None or busy is None:
            return None
        return max(0.0, (busy - busy0) - (self._own() - own0)) / max(time.perf_counter() - t0, 1e-9)


def _best_of(fn, device: str, repeats: int, budget_s: float | None = None) -> tuple[float, Any]:
    """Best-of-``repeats`` seconds of ``fn()`` (fewer once the runs took ``budget_s``) and its last result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return min(times), result


def selection_kwargs(name: str, max_tokens: int) -> dict[str, Any]:
    """Options of each benchmarked strategy: the capped ones get ``max_tokens``; none / prumerge get nothing."""
    return {"max_tokens": int(max_tokens)} if name in CAPPED else {}


# ================================================================================================ trained mode
class SplicedPrefill:
    """The pre-decoding work of ``generate()`` for one batch-1 prompt, from cached slide-tower outputs.

    Runs the model's own ``WSILlavaModel.prepare_multimodal_inputs`` (question embedding when the selector needs it,
    selection, the slide embedding first when ``config.prepend_slide_embedding``, projector, splice) and then the LM
    prefill with KV cache and the last position's logits. Only the slide tower is taken out: it runs once in
    ``__init__`` (with the CLS-attention row, timed as ``tower_s``) and, during a call, the model's ``_tower_tokens``
    returns those cached outputs. ``tests/scripts/test_bench_llava.py`` checks the logits against the model's own
    forward.
    """

    def __init__(self, model: Any, batch: dict[str, torch.Tensor], device: str):
        self.model, self.inner, self.batch = model, model.model, batch
        _sync(device)
        start = time.perf_counter()
        self.cached = self.inner._tower_tokens(
            batch["tile_features"], batch["tile_coords"], batch["tile_mask"], need_attention=True
        )
        _sync(device)
        self.tower_s = time.perf_counter() - start
        self.tiles = int(batch["tile_mask"].sum())
        self.text_tokens = int(batch["attention_mask"].sum()) - 1  # the placeholder is not a text token

    def text_only(self) -> torch.Tensor:
        """The floor of any selector: LM prefill of the same prompt without the slide placeholder (0 visual tokens),
        last-position logits."""
        input_ids = self.batch["input_ids"]
        keep = (input_ids != self.inner.config.slide_token_id) & self.batch["attention_mask"].bool()
        ids = input_ids[keep].view(1, -1)
        hidden = self.inner.language_model(
            inputs_embeds=self.inner.get_input_embeddings()(ids), use_cache=True
        ).last_hidden_state
        return self.model.lm_head(hidden[:, -1:])

    def __call__(self, name: str, options: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Last-position logits ``[1, 1, V]`` and the number of visual tokens spliced."""
        inner, batch = self.inner, self.batch
        inner._tower_tokens = lambda *args, **kwargs: self.cached  # instance attribute: shadows the method
        try:
            spliced, slides = inner.prepare_multimodal_inputs(
                batch["input_ids"],
                batch["tile_features"],
                batch["tile_coords"],
                batch["tile_mask"],
                batch["attention_mask"],
                token_selection=name,
                token_selection_kwargs=options,
                question_mask=batch["question_mask"],
                padding_side="left",
            )
        finally:
            del inner._tower_tokens
        hidden = inner.language_model(
            inputs_embeds=spliced["inputs_embeds"],
            attention_mask=spliced["attention_mask"],
            position_ids=spliced["position_ids"],
            use_cache=True,
        ).last_hidden_state
        return self.model.lm_head(hidden[:, -1:]), int(slides.visual_token_counts[0])


def enlarge_slide(
    sources: list[Any], tiles: int, block_cells: tuple[int, int], tile_size: int = 256, slide_ngrids: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A slide of exactly ``tiles`` tiles stitched from real slides (``SlideFeatures``, cycled in the given order),
    each moved to its own block of ``block_cells = (width, height)`` grid cells on a larger grid (blocks row-major on
    a square arrangement; the last one cut in row-major tile order). Returns ``features [tiles, D]`` and
    ``coords [tiles, 2]`` (x, y level-0 pixels on a ``tile_size`` grid)."""
    if tiles < 1 or not sources:
        raise ValueError("enlarge_slide needs tiles >= 1 and at least one source slide.")
    blocks, total = [], 0
    while total < tiles:
        slide = sources[len(blocks) % len(sources)]
        cells = torch.div(slide.coords.long(), tile_size, rounding_mode="floor")
        cells = cells - cells.min(dim=0).values  # [n, 2] (gx, gy) from 0
        order = torch.argsort(cells[:, 1] * (int(cells[:, 0].max()) + 1) + cells[:, 0])  # row-major
        take = order[: tiles - total]
        blocks.append((slide.features[take], cells[take]))
        total += take.numel()
    columns = math.ceil(math.sqrt(len(blocks)))
    width, height = block_cells
    features, coords = [], []
    for b, (feats, cells) in enumerate(blocks):
        offset = torch.tensor([(b % columns) * width, (b // columns) * height])
        features.append(feats.float())
        coords.append((cells + offset) * tile_size)
    coords_all = torch.cat(coords)
    if slide_ngrids is not None and int(coords_all.max()) // tile_size >= slide_ngrids:
        raise ValueError(
            f"an enlarged slide of {tiles} tiles spans {int(coords_all.max()) // tile_size + 1} grid "
            f"cells, more than the tower's slide_ngrids={slide_ngrids}."
        )
    return torch.cat(features), coords_all


def _block_cells(slides: list[Any], tile_size: int, gap: int = 2) -> tuple[int, int]:
    spans = [torch.div(s.coords.long(), tile_size, rounding_mode="floor") for s in slides]
    width = max(int(c[:, 0].max() - c[:, 0].min()) + 1 for c in spans) + gap
    height = max(int(c[:, 1].max() - c[:, 1].min()) + 1 for c in spans) + gap
    return width, height


def _closed(items: list[dict[str, Any]], predictions: list[str], majority: Any) -> dict[str, Any]:
    from wsi_llava.evaluation import closed_metrics

    scored = [dict(item, prediction=p) for item, p in zip(items, predictions)]
    metrics = closed_metrics(scored, majority)
    metrics["correct"] = [closed_metrics([s], majority)["accuracy"] == 1.0 for s in scored]
    return metrics


def _answer(
    model: Any,
    processor: Any,
    slides: list[Any],
    questions: list[Any],
    batch_size: int,
    max_tiles: int | None,
    **generate_kwargs: Any,
) -> tuple[list[str], list[int], list[int]]:
    """``generate_answers`` batch by batch, keeping the visual tokens and tiles of each slide
    (``last_selection_stats``)."""
    from wsi_llava import generate_answers

    answers, kept, tiles = [], [], []
    for start in range(0, len(questions), batch_size):
        answers += generate_answers(
            model,
            processor,
            slides[start : start + batch_size],
            questions[start : start + batch_size],
            batch_size=batch_size,
            max_tiles=max_tiles,
            **generate_kwargs,
        )
        kept += model.last_selection_stats["visual_token_counts"]
        tiles += model.last_selection_stats["tile_counts"]
    return answers, kept, tiles


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.1f}"


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def _fmt_delta(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{(value - base) * 100:+.1f}"


def _verdict(
    speed: float | None,
    delta_points: float | None,
    none_accuracy: float | None = None,
    blind: float | None = None,
    items: str = "",
) -> str:
    """One target line: speed ≥ 5x and accuracy loss ≤ 2 points. When ``none`` itself does not beat its blind
    baseline, a Δ accuracy cannot reveal a loss, so the accuracy half is reported as not testable, never as met."""
    if speed is None:
        return "not measured"
    fast = speed >= 5.0
    speed_text = f"{speed:.1f}x prefill speed-up ({'>=' if fast else '<'} 5x)"
    if delta_points is None:
        return f"speed {'met' if fast else 'NOT met'}: {speed_text}; accuracy not measured at this size"
    close = delta_points >= -2.0
    accuracy_text = f"{delta_points:+.1f} points accuracy vs none{items}: {'no' if close else 'a'} loss beyond 2 points"
    if none_accuracy is not None and blind is not None and none_accuracy <= blind:
        return (
            f"speed {'met' if fast else 'NOT met'}, accuracy NOT testable: {speed_text}; {accuracy_text}, but "
            f"none itself scores {none_accuracy * 100:.1f} % <= its blind baseline {blind * 100:.1f} %, so this "
            "model does not answer from the slide and a Δ cannot show a loss"
        )
    return f"{'met' if fast and close else 'NOT met'}: {speed_text}; {accuracy_text}"


@torch.inference_mode()
def _held_out(
    args: Args, model: Any, processor: Any, device: str, data: Path, report: dict[str, Any]
) -> tuple[list[dict[str, Any]], Any]:
    from tqdm.auto import tqdm

    from processing import load_annotations
    from wsi_llava import build_generation_inputs
    from wsi_llava.evaluation import evaluation_items, open_metrics

    items = [
        i
        for i in evaluation_items(load_annotations(data / args.diagnosis_file, "llava"))
        if i["kind"] in ("choice", "yes_no")
    ]
    items = items[: args.max_items] if args.max_items else items
    majority_path = data / args.majority_file
    majority = evaluation_items(load_annotations(majority_path, "llava")) if majority_path.is_file() else None
    reports = [i for i in evaluation_items(load_annotations(data / args.report_file, "llava")) if i["kind"] == "open"]
    reports = reports[: args.report_items]
    cap = args.max_tiles if args.max_tiles is not None else processor.max_tiles
    print(
        f"held-out split: {len(items)} diagnosis questions ({args.diagnosis_file}), {len(reports)} reports "
        f"({args.report_file}); slides capped at {cap} tiles (the processor's, as in the demo evaluation)",
        flush=True,
    )

    rows = {name: {"strategy": name, "options": selection_kwargs(name, args.max_tokens)} for name in args.strategies}
    for name in tqdm(args.strategies, desc="accuracy + reports per strategy"):
        opts = rows[name]["options"]
        gen = {"token_selection": name, "token_selection_kwargs": opts, "do_sample": False}
        answers, kept, tiles = _answer(
            model,
            processor,
            [i["h5_path"] for i in items],
            [i["history"] for i in items],
            args.batch_size,
            args.max_tiles,
            max_new_tokens=4,
            **gen,
        )
        metrics = _closed(items, answers, majority)
        rows[name].update(
            accuracy=metrics["accuracy"],
            correct=metrics["correct"],
            unparsed=metrics["unparsed"],
            majority_baseline=metrics["majority_baseline"],
            random_baseline=metrics["random_baseline"],
            kept_mean=sum(kept) / len(kept),
            kept_min=min(kept),
            kept_max=max(kept),
            predictions=answers,
        )
        if reports:
            texts, _, _ = _answer(
                model,
                processor,
                [i["h5_path"] for i in reports],
                [i["history"] for i in reports],
                args.report_batch_size,
                args.max_tiles,
                max_new_tokens=args.report_max_new_tokens,
                **gen,
            )
            rows[name]["rouge_l"] = open_metrics(texts, [i["answer"] for i in reports])["rouge_l"]
            rows[name]["report_example"] = texts[0]

    timed = items[: args.prefill_items] if args.prefill_items else items
    prefill = {name: [] for name in args.strategies}
    tower, text, floor = [], [], []
    for item in tqdm(timed, desc="prefill timing (batch 1)"):
        batch = build_generation_inputs(processor, [item["h5_path"]], [item["history"]], max_tiles=args.max_tiles)
        runner = SplicedPrefill(model, batch.to(device), device)
        tower.append(runner.tower_s)
        text.append(runner.text_tokens)
        for name in args.strategies:
            seconds, _ = _best_of(lambda: runner(name, rows[name]["options"]), device, args.prefill_repeats)
            prefill[name].append(seconds)
        floor.append(_best_of(runner.text_only, device, args.prefill_repeats)[0])
    for name in args.strategies:
        rows[name]["prefill_s"] = sum(prefill[name]) / len(prefill[name])
    report["held_out"] = {
        "items": len(items),
        "reports": len(reports),
        "timed_items": len(timed),
        "tiles_mean": sum(tiles) / len(tiles),
        "tiles_min": min(tiles),
        "tiles_max": max(tiles),
        "text_tokens_mean": sum(text) / len(text),
        "tower_s": sum(tower) / len(tower),
        "text_only_prefill_s": sum(floor) / len(floor),
        "strategies": list(rows.values()),
    }
    return items, majority


def _print_held_out(args: Args, held: dict[str, Any]) -> None:
    rows = {r["strategy"]: r for r in held["strategies"]}
    base = rows.get("none")
    first = next(iter(rows.values()))
    print(
        f"\n## Held-out test split (real demo slides, {held['tiles_min']}-{held['tiles_max']} tiles given to the "
        f"model, mean {held['tiles_mean']:.0f}; prompt {held['text_tokens_mean']:.0f} text tokens)\n"
    )
    print(
        f"Diagnosis: n={held['items']} closed 4-option questions (1 item = {100 / held['items']:.1f} points); blind "
        f"baselines: majority answer of {args.majority_file} {_fmt_acc(first['majority_baseline'])} %, random "
        f"{_fmt_acc(first['random_baseline'])} %. Reports: first {held['reports']} of {args.report_file}, greedy, "
        f"{args.report_max_new_tokens} new tokens. Prefill: mean over {held['timed_items']} prompts of the best of "
        f"{args.prefill_repeats}, batch 1; slide tower {_fmt_ms(held['tower_s'])} ms per slide (same for all).\n"
    )
    print(
        "| strategy | visual tokens kept | prefill ms | speed-up vs none | speed-up incl. tower | diagnosis acc % "
        "| Δ acc vs none (pts) | report ROUGE-L |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        label = name + (f" (max_tokens {r['options']['max_tokens']})" if r["options"] else "")
        kept = f"{r['kept_mean']:.1f}" + (
            f" ({r['kept_min']}-{r['kept_max']})" if r["kept_min"] != r["kept_max"] else ""
        )
        speed = f"{base['prefill_s'] / r['prefill_s']:.2f}x" if base else "-"
        tower = held["tower_s"]
        speed_tower = f"{(base['prefill_s'] + tower) / (r['prefill_s'] + tower):.2f}x" if base else "-"
        rouge = f"{r['rouge_l']:.3f}" if "rouge_l" in r else "-"
        print(
            f"| {label} | {kept} | {_fmt_ms(r['prefill_s'])} | {speed} | {speed_tower} | {_fmt_acc(r['accuracy'])} "
            f"| {_fmt_delta(r['accuracy'], base['accuracy'] if base else None)} | {rouge} |"
        )
    floor = held["text_only_prefill_s"]
    if base:
        print(
            f"| *floor: the prompt alone, no slide* | 0 | {_fmt_ms(floor)} | {base['prefill_s'] / floor:.2f}x | "
            f"{(base['prefill_s'] + held['tower_s']) / floor:.2f}x | - | - | - |"
        )
    if base:
        for name, r in rows.items():
            if name == "none":
                continue
            lost = sum(b and not s for b, s in zip(base["correct"], r["correct"]))
            won = sum(s and not b for b, s in zip(base["correct"], r["correct"]))
            r["vs_none_items"] = {"lost": lost, "won": won}
        print(
            "\nItems answered differently from none (right→wrong / wrong→right): "
            + ", ".join(
                f"{n} {r['vs_none_items']['lost']}/{r['vs_none_items']['won']}" for n, r in rows.items() if n != "none"
            )
            + ". Unparsed answers: "
            + ", ".join(f"{n} {_fmt_acc(r['unparsed'])} %" for n, r in rows.items())
            + "."
        )


@torch.inference_mode()
def _large(
    args: Args,
    model: Any,
    processor: Any,
    device: str,
    items: list[dict[str, Any]],
    majority: Any,
    report: dict[str, Any],
) -> None:
    from tqdm.auto import tqdm

    from wsi_llava import build_generation_inputs

    sizes = sorted({int(t) for t in args.large_tiles if int(t) > 0})
    acc_tiles = int(args.large_accuracy_tiles)
    if not sizes and acc_tiles <= 0:
        return
    vision = model.config.vision_config
    tile_size = int(vision.tile_size)
    slides = {}
    for item in items:
        if item["h5_path"] not in slides:
            slides[item["h5_path"]] = processor.load_slide(item["h5_path"], tile_sampling="all")  # every tile
    block = _block_cells(list(slides.values()), tile_size)

    def sources(item: dict[str, Any]) -> list[Any]:  # the item's slide, then the other held-out slides of its answer
        same = [i["h5_path"] for i in items if i["answer"] == item["answer"] and i["h5_path"] != item["h5_path"]]
        return [slides[item["h5_path"]]] + [slides[p] for p in dict.fromkeys(same)]

    def enlarged(item: dict[str, Any], tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        return enlarge_slide(sources(item), tiles, block, tile_size, getattr(vision, "slide_ngrids", None))

    results: dict[str, Any] = {
        "block_cells": list(block),
        "sizes": [],
        "lm_context": getattr(model.config.text_config, "max_position_embeddings", None),
    }
    for tiles in sizes:
        entry = {"tiles": tiles, "items": min(args.large_items, len(items)), "strategies": {}}
        times = {name: [] for name in args.strategies}
        kept = {name: [] for name in args.strategies}
        towers, text = [], []
        for item in items[: entry["items"]]:
            batch = build_generation_inputs(processor, [enlarged(item, tiles)], [item["history"]], max_tiles=tiles)
            runner = SplicedPrefill(model, batch.to(device), device)
            assert runner.tiles == tiles, (runner.tiles, tiles)
            towers.append(runner.tower_s)
            text.append(runner.text_tokens)
            for name in tqdm(args.strategies, desc=f"prefill, enlarged slide of {tiles} tiles"):
                opts = selection_kwargs(name, args.max_tokens)
                seconds, (_, k) = _best_of(lambda: runner(name, opts), device, args.large_repeats, args.large_budget_s)
                times[name].append(seconds)
                kept[name].append(k)
        entry["tower_s"] = sum(towers) / len(towers)
        entry["text_tokens_mean"] = sum(text) / len(text)
        for name in args.strategies:
            entry["strategies"][name] = {
                "prefill_s": sum(times[name]) / len(times[name]),
                "kept_mean": sum(kept[name]) / len(kept[name]),
            }
        results["sizes"].append(entry)

    if acc_tiles > 0 and args.large_accuracy_items > 0:
        subset = items[: args.large_accuracy_items]
        big = [enlarged(item, acc_tiles) for item in subset]
        accuracy = {"tiles": acc_tiles, "items": len(subset), "strategies": {}}
        for name in tqdm(args.strategies, desc=f"accuracy, enlarged slides of {acc_tiles} tiles"):
            answers, k, _ = _answer(
                model,
                processor,
                big,
                [i["history"] for i in subset],
                min(args.batch_size, 4),
                acc_tiles,
                max_new_tokens=4,
                token_selection=name,
                token_selection_kwargs=selection_kwargs(name, args.max_tokens),
                do_sample=False,
            )
            metrics = _closed(subset, answers, majority)
            accuracy["strategies"][name] = {
                "accuracy": metrics["accuracy"],
                "kept_mean": sum(k) / len(k),
                "correct": metrics["correct"],
                "blind_baseline": max(metrics["majority_baseline"], metrics["random_baseline"]),
            }
        held = {r["strategy"]: r for r in report["held_out"]["strategies"]} if "held_out" in report else {}
        accuracy["held_out_same_items"] = {n: sum(r["correct"][: len(subset)]) / len(subset) for n, r in held.items()}
        results["accuracy"] = accuracy
    report["enlarged"] = results


def _print_large(args: Args, results: dict[str, Any]) -> None:
    print(
        f"\n## Enlarged slides (real held-out tiles stitched on a larger grid; blocks of {results['block_cells'][0]}"
        f"x{results['block_cells'][1]} cells)\n"
    )
    if results["sizes"]:
        print(
            f"Prefill of the diagnosis prompt, batch 1, best of ≤ {args.large_repeats} (fewer once a timing took "
            f"{args.large_budget_s:.0f} s), mean over {results['sizes'][0]['items']} slide(s) per size.\n"
        )
        print("| tiles | strategy | visual tokens kept | prefill ms | speed-up vs none | speed-up incl. tower |")
        print("|---|---|---|---|---|---|")
        for entry in results["sizes"]:
            rows = entry["strategies"]
            base = rows.get("none")
            for name, r in rows.items():
                speed = f"{base['prefill_s'] / r['prefill_s']:.1f}x" if base else "-"
                t = entry["tower_s"]
                speed_tower = f"{(base['prefill_s'] + t) / (r['prefill_s'] + t):.1f}x" if base else "-"
                print(
                    f"| {entry['tiles']:,} | {name} | {r['kept_mean']:.0f} | {_fmt_ms(r['prefill_s'])} | {speed} | "
                    f"{speed_tower} |"
                )
        context = results.get("lm_context")
        over = [e["tiles"] for e in results["sizes"] if context and e["tiles"] + e["text_tokens_mean"] > context]
        if over:
            print(
                f"\nnone at {', '.join(f'{t:,}' for t in over)} tiles runs past the LM's {context:,} trained "
                "positions (RoPE extrapolates; the timing is valid, an answer would not be)."
            )
        print(
            "\nSlide tower (once per slide, same for all strategies): "
            + ", ".join(f"{e['tiles']:,} tiles {_fmt_ms(e['tower_s'])} ms" for e in results["sizes"])
            + "."
        )
    acc = results.get("accuracy")
    if acc:
        base = acc["strategies"].get("none")
        print(
            f"\nDiagnosis accuracy on enlarged slides of {acc['tiles']:,} tiles, first {acc['items']} items — "
            "NOT a held-out measurement: each enlargement is stitched from several held-out slides of the gold "
            "answer's class, at a size the model never saw in training.\n"
        )
        print(
            "| strategy | visual tokens kept | diagnosis acc % (enlarged) | Δ acc vs none (pts) | same items, "
            "original slides % |"
        )
        print("|---|---|---|---|---|")
        for name, r in acc["strategies"].items():
            same = acc["held_out_same_items"].get(name)
            print(
                f"| {name} | {r['kept_mean']:.0f} | {_fmt_acc(r['accuracy'])} | "
                f"{_fmt_delta(r['accuracy'], base['accuracy'] if base else None)} | {_fmt_acc(same)} |"
            )


def _train_steps(args: Args, device: str, data: Path, report: dict[str, Any]) -> None:
    import tempfile
    from contextlib import nullcontext

    from processing import InstructionCollator, WSIProcessor, load_annotations
    from wsi_llava import WSILlavaForConditionalGeneration
    from wsi_llava.arguments import LlavaTrainingArguments
    from wsi_llava.assembly import count_parameters, prepare_stage

    rows_all = load_annotations(data / args.train_file, "llava")
    count = min(args.train_batch, len(rows_all))
    picks = [round(k * (len(rows_all) - 1) / max(count - 1, 1)) for k in range(count)]
    rows = [rows_all[i] for i in picks]
    processor = WSIProcessor.from_pretrained(args.model)
    model = WSILlavaForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        targs = LlavaTrainingArguments(
            output_dir=tmp, stage=3, lora_r=16, lora_alpha=32, lora_dropout=0.0, report_to="none"
        )
        peft_model = prepare_stage(model, targs)
    peft_model.train()
    trainable, total = count_parameters(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    autocast = (
        torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
        if args.train_bf16
        else nullcontext()
    )
    out: dict[str, Any] = {
        "rows": count,
        "trainable_params": trainable,
        "total_params": total,
        "bf16_autocast": args.train_bf16,
        "max_tiles": args.train_max_tiles,
        "selection": peft_model.config.token_selection,
        "selection_kwargs": peft_model.config.token_selection_kwargs,
    }
    for variant, text_only in (("slide", False), ("text_only", True)):
        collator = InstructionCollator(
            processor,
            max_tiles=args.train_max_tiles,
            tile_sampling="random",
            seed=0,
            max_length=args.train_max_length,
            text_only=text_only,
        )
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        collate_s = time.perf_counter() - start
        info: dict[str, Any] = {}

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                output = peft_model(**batch)
            output.loss.backward()
            optimizer.step()
            if output.visual_token_counts is not None:
                info["visual_tokens"] = float(output.visual_token_counts.float().mean())
            info["sequence"] = int(output.logits.shape[1])

        step()  # warm-up
        seconds, _ = _best_of(step, device, args.train_repeats)
        out[variant] = {
            "step_s": seconds,
            "collate_s": collate_s,
            "text_tokens_mean": float(batch["attention_mask"].sum(dim=1).float().mean()),
            **info,
        }
    out["ratio"] = out["slide"]["step_s"] / out["text_only"]["step_s"]
    out["ratio_incl_collate"] = (out["slide"]["step_s"] + out["slide"]["collate_s"]) / (
        out["text_only"]["step_s"] + out["text_only"]["collate_s"]
    )
    report["train_step"] = out


def _print_train(args: Args, out: dict[str, Any]) -> None:
    s, t = out["slide"], out["text_only"]
    print(
        f"\n## Training step: WSI-LLaVA vs the same LM text-only (stage-3 recipe: LoRA r 16 on the LM + the "
        f"projector, {out['trainable_params'] / 1e6:.2f} M of {out['total_params'] / 1e6:.1f} M parameters "
        f"trainable; AdamW; {'bf16 autocast' if out['bf16_autocast'] else args.dtype})\n"
    )
    print(
        f"Same batch of {out['rows']} rows of {args.train_file} (evenly spaced), forward + backward + optimizer "
        f"step, best of {args.train_repeats} after a warm-up. Slide path: ≤ {out['max_tiles']} tiles per slide, "
        f"selection {out['selection']} {out['selection_kwargs']}.\n"
    )
    print("| variant | text tokens / row | LM sequence | visual tokens / slide | step ms | collate ms |")
    print("|---|---|---|---|---|---|")
    print(
        f"| with the slide | {s['text_tokens_mean']:.0f} | {s['sequence']} | {s.get('visual_tokens', 0):.1f} | "
        f"{_fmt_ms(s['step_s'])} | {_fmt_ms(s['collate_s'])} |"
    )
    print(
        f"| text only | {t['text_tokens_mean']:.0f} | {t['sequence']} | - | {_fmt_ms(t['step_s'])} | "
        f"{_fmt_ms(t['collate_s'])} |"
    )
    print(
        f"\nSlide-path overhead: step time ratio {out['ratio']:.2f}x (incl. collate / H5 read: "
        f"{out['ratio_incl_collate']:.2f}x)."
    )


def run_trained(args: Args) -> dict[str, Any]:
    from processing import WSIProcessor
    from wsi_llava import WSILlavaForConditionalGeneration

    model_dir, data = Path(args.model), Path(args.data_dir)
    for path, what in (
        (model_dir / "config.json", "--model (a trained, merged WSI-LLaVA checkpoint)"),
        (data / args.diagnosis_file, "--data_dir / --diagnosis_file"),
    ):
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: {what}. Run `python scripts/run_demo.py` first, or pass --model "
                "<dir>/llava_stage3/merged --data_dir <dir>/data of a finished demo run (or use "
                "--mode synthetic)."
            )
    device = _device(args)
    started = time.perf_counter()
    cpu_share = CpuShare()
    torch.manual_seed(0)
    model = WSILlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=getattr(torch, args.dtype))
    model.to(device).eval()
    processor = WSIProcessor.from_pretrained(str(model_dir))
    lm = model.config.text_config
    print(
        f"device {device} ({args.dtype}, {torch.get_num_threads()} threads); model {model_dir} (trained with "
        f"{model.config.token_selection} {model.config.token_selection_kwargs}); LM {lm.model_type} "
        f"{lm.num_hidden_layers}x{lm.hidden_size}; slide tower {model.config.vision_config.num_hidden_layers}x"
        f"{model.config.vision_config.hidden_size}",
        flush=True,
    )
    report: dict[str, Any] = {"model": str(model_dir), "data_dir": str(data), "device": device, "dtype": args.dtype}
    items, majority = _held_out(args, model, processor, device, data, report)
    _large(args, model, processor, device, items, majority, report)
    del model
    if args.train_batch > 0 and (data / args.train_file).is_file():
        _train_steps(args, device, data, report)
    elif args.train_batch > 0:
        print(f"(training step skipped: {data / args.train_file} not found)")
    report["seconds"] = time.perf_counter() - started
    report["other_processes_cores"] = cpu_share.others_cores()
    print_report(args, report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        print(f"numbers written to {args.output}")
    return report


def print_report(args: Args, report: dict[str, Any]) -> None:
    """Print every table and the target lines of a trained-mode run (also from its saved ``--output`` JSON)."""
    _print_held_out(args, report["held_out"])
    if "enlarged" in report:
        _print_large(args, report["enlarged"])
    if "train_step" in report:
        _print_train(args, report["train_step"])
    print("\n## Targets: PruMerge ≥ 5x faster prefill than none at ≤ 2 points accuracy loss\n")
    held = {r["strategy"]: r for r in report["held_out"]["strategies"]}
    verdicts = {}
    for name in ("prumerge", "prumerge_plus"):
        if name not in held or "none" not in held:
            continue
        speed = held["none"]["prefill_s"] / held[name]["prefill_s"]
        delta = (held[name]["accuracy"] - held["none"]["accuracy"]) * 100
        blind = max(held["none"]["majority_baseline"], held["none"]["random_baseline"])
        verdicts[f"{name}, held-out"] = _verdict(
            speed, delta, held["none"]["accuracy"], blind, f" (n={report['held_out']['items']})"
        )
        enlarged = report.get("enlarged", {})
        accuracy = enlarged.get("accuracy", {})
        acc = accuracy.get("strategies", {})
        for entry in enlarged.get("sizes", []):
            rows = entry["strategies"]
            if name in rows and "none" in rows:
                delta_big = none_acc = blind = None
                if entry["tiles"] == accuracy.get("tiles") and name in acc and "none" in acc:
                    delta_big = (acc[name]["accuracy"] - acc["none"]["accuracy"]) * 100
                    none_acc, blind = acc["none"]["accuracy"], acc["none"].get("blind_baseline")
                verdicts[f"{name}, enlarged {entry['tiles']:,} tiles"] = _verdict(
                    rows["none"]["prefill_s"] / rows[name]["prefill_s"],
                    delta_big,
                    none_acc,
                    blind,
                    f" (n={accuracy.get('items')}, not held-out)",
                )
    for key, line in verdicts.items():
        print(f"* {key}: {line}")
    held_out = report["held_out"]
    n, text = held_out["tiles_mean"], held_out["text_tokens_mean"]
    if "none" in held:
        k, floor = args.max_tokens, held_out["text_only_prefill_s"]
        print(
            f"\nWhat bounds the held-out speed-up (measured): none splices ~{n:.0f} visual tokens after "
            f"~{text:.0f} text tokens; a selector keeping K tokens still runs the LM over ~{text:.0f} + K. Even "
            f"K = 0 (the prompt alone, the floor row) prefills in {_fmt_ms(floor)} ms, so no selector can beat "
            f"{held['none']['prefill_s'] / floor:.2f}x on these slides; in tokens, ({text:.0f} + {n:.0f}) / "
            f"{text:.0f} = {(text + n) / text:.1f}x at K = 0 and ({text:.0f} + {n:.0f}) / ({text:.0f} + {k}) = "
            f"{(text + n) / (text + k):.1f}x at K = {k}. Accuracy: 1 item = {100 / held_out['items']:.1f} "
            f"points at n={held_out['items']}."
        )
    report["verdicts"] = verdicts
    others = report["other_processes_cores"]
    load = (
        ""
        if others is None
        else (
            f"; other processes kept {others:.2f} of {os.cpu_count()} cores busy on average meanwhile"
            + (" — the machine was NOT idle: timings are inflated, rerun on an idle machine" if others > 0.25 else "")
        )
    )
    print(f"\n(benchmark took {report['seconds']:.0f} s{load})")


# ================================================================================================ synthetic mode
@torch.no_grad()
def run_synthetic(args: Args) -> None:
    from transformers import LlamaConfig

    from wsi_llava import WSILlavaConfig, WSILlavaForConditionalGeneration
    from wsi_llava.token_selection import TokenSelectionInputs, run_token_selector

    device = _device(args)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    vision = dict(
        input_dim=1536,
        hidden_size=args.encoder_width,
        num_hidden_layers=args.encoder_layers,
        num_attention_heads=16 if args.encoder_width % 16 == 0 else 8,
        intermediate_size=4 * args.encoder_width,
        dropout=0.0,
        drop_path_rate=0.0,
    )
    text = LlamaConfig(
        hidden_size=args.lm_width,
        intermediate_size=int(args.lm_width * 8 / 3) // 64 * 64,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=9 if args.lm_width % 9 == 0 else 8,
        num_key_value_heads=3 if args.lm_width % 9 == 0 else 4,
        vocab_size=49152,
        max_position_embeddings=args.tiles + 1024,
    )
    model = (
        WSILlavaForConditionalGeneration(WSILlavaConfig(vision_config=vision, text_config=text, slide_token_id=49151))
        .to(device, dtype)
        .eval()
    )
    inner = model.model
    side = int(args.tiles**0.5) + 1
    i = torch.arange(args.tiles)
    coords = (torch.stack([i % side, i // side], 1) * 256).unsqueeze(0).to(device)
    features = (torch.randn(1, args.tiles, 1536) * 33 / 1536**0.5).to(device, dtype)
    mask = torch.ones(1, args.tiles, dtype=torch.bool, device=device)
    prompt = torch.randint(0, 49000, (1, 48), device=device)
    prompt[0, 5] = 49151  # the slide placeholder

    t_enc, m_enc, (tokens, tower_out) = _measure(
        lambda: inner._tower_tokens(features, coords, mask, need_attention=True), device, args.repeats
    )
    question = inner.question_embedding(prompt, torch.ones_like(prompt, dtype=torch.bool))
    grid = torch.div(coords, 256, rounding_mode="floor")
    print(
        f"device {device} ({args.dtype}); slide of {args.tiles} tiles; slide encoder {args.encoder_layers}x"
        f"{args.encoder_width}: {t_enc * 1e3:.0f} ms, peak +{m_enc:.0f} MiB; LM {args.lm_layers}x{args.lm_width} "
        f"(SmolLM2-135M shape, random weights), prompt 48 text tokens\n"
    )
    print(
        f"{'strategy':>14} {'kept':>6} {'select ms':>10} {'sel/enc':>8} {'prefill ms':>11} {'speed-up':>9} "
        f"{'prefill MiB':>12}"
    )
    base_prefill = None
    for name in args.strategies:
        options = selection_kwargs(name, args.topk)
        if name == "prumerge_plus":
            options = {}  # adaptive, as PruMerge: the synthetic suite compares the uncapped selectors
        inputs = TokenSelectionInputs(
            tokens=tokens,
            token_mask=mask,
            grid=grid,
            cls_attention=tower_out.cls_attention,
            keys=tower_out.tile_keys,
            question_embedding=question,
            project=inner.multi_modal_projector,
        )
        t_sel, _, selection = _measure(lambda: run_token_selector(name, inputs, **options), device, args.repeats)

        def prefill(selection=selection):
            visual = inner.multi_modal_projector(selection.tokens)
            embeds, attn, _, pos = inner.splice(
                prompt, inner.get_input_embeddings()(prompt), visual, selection.token_mask
            )
            hidden = inner.language_model(
                inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=True
            ).last_hidden_state
            return model.lm_head(hidden[:, -1:])

        t_pre, m_pre, _ = _measure(prefill, device, args.repeats)
        base_prefill = base_prefill or (t_pre if name == "none" else None)
        speed = f"{base_prefill / t_pre:8.1f}x" if base_prefill else f"{'-':>9}"
        print(
            f"{name:>14} {int(selection.token_mask.sum()):>6} {t_sel * 1e3:>10.1f} {t_sel / t_enc:>7.1%} "
            f"{t_pre * 1e3:>11.0f} {speed} {m_pre:>12.0f}"
        )
    print(
        f"\nkept = visual tokens spliced into the LM (uniform / topk_prompt: K = --topk {args.topk}); select ms = "
        "selection alone (tower outputs given); sel/enc = selection / slide-encoder time (target <= 10%); "
        "speed-up = prefill(none) / prefill (target for prumerge >= 5x)."
    )
