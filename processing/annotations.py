"""Annotation files (CSV / JSON / JSONL) → validated ``datasets.Dataset``.

Accepted inputs:

* the seed CSV: ``h5_path, caption, question, answer, slide_id, dataset`` (+ optional ``case_id``, ``split``,
  and any extra column such as ``label``, which is kept);
* LLaVA-style conversations (WSI-Bench / SlideChat): ``{"id", "image", "conversations": [{"from", "value"}]}``;
* WSI-Bench JSONL rows: ``{"question_id", "image", "question", "T-answer", "metadata"}``;
* JSON / JSONL records with the seed column names.

``image`` values name feature files of other pipelines (``.pt`` / ``.csv``): the slide is looked up as the same
path with an ``.h5`` suffix. ``<image>`` markers in conversations are removed — the processor inserts its own
slide placeholder. Relative ``h5_path``s resolve against ``h5_root`` when given (and must stay inside it), else
against the annotation file's folder. Every problem in the file is reported at once, with row numbers.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import AnnotationError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

AnnotationTask = Literal["clip", "llava"]
SEED_COLUMNS = ("h5_path", "caption", "question", "answer", "slide_id", "dataset")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "clip": ("h5_path", "caption"),
    "llava": ("h5_path", "question", "answer"),
}
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model"}
_IMAGE_MARKERS = ("<image>", "<wsi>", "<slide>")
_MAX_LISTED_PROBLEMS = 50


def _read_records(path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """Raw records and the set of columns/keys present, for CSV, JSON and JSONL files."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                records = [dict(row) for row in reader]
                return records, set(reader.fieldnames or [])
        if suffix == ".jsonl":
            records = []
            with path.open(encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise AnnotationError(f"{path}: line {line_no} is not valid JSON ({err}).") from err
        elif suffix == ".json":
            with path.open(encoding="utf-8") as fh:
                data = json.load(fh)
            records = data.get("data", data) if isinstance(data, dict) else data
            if not isinstance(records, list):
                raise AnnotationError(f"{path}: expected a JSON list of records (or {{'data': [...]}}).")
        else:
            raise AnnotationError(f"{path}: unsupported annotation format '{suffix}'; use .csv, .tsv, .json or .jsonl.")
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}).") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err}).") from err
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise AnnotationError(f"{path}: records {bad[:5]} are not JSON objects.")
    keys: set[str] = set()
    for record in records:
        keys.update(record)
    return records, keys


def _strip_markers(text: str) -> str:
    for marker in _IMAGE_MARKERS:
        text = text.replace(marker, "")
    return text.strip()


def _normalise_conversation(turns: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for turn in turns:
        role = str(turn.get("from", turn.get("role", ""))).lower()
        content = _strip_markers(str(turn.get("value", turn.get("content", "")) or ""))
        role = "user" if role in _USER_ROLES else "assistant" if role in _ASSISTANT_ROLES else role
        out.append({"role": role, "content": content})
    return out


def _to_seed_record(record: dict[str, Any]) -> dict[str, Any]:
    """Map LLaVA / WSI-Bench records onto the seed column names (CSV rows pass through)."""
    rec = {k: v for k, v in record.items() if k not in ("conversations", "image", "T-answer")}
    image = record.get("image")
    if not rec.get("h5_path") and image:
        image = image[0] if isinstance(image, list) and image else image
        rec["h5_path"] = str(Path(str(image)).with_suffix(".h5"))
    if "T-answer" in record and not rec.get("answer"):
        rec["answer"] = record["T-answer"]
    if "conversations" in record and isinstance(record["conversations"], list):
        conv = _normalise_conversation(record["conversations"])
        rec["conversations"] = conv
        users = [t["content"] for t in conv if t["role"] == "user"]
        answers = [t["content"] for t in conv if t["role"] == "assistant"]
        rec.setdefault("question", users[0] if users else "")
        rec.setdefault("answer", answers[0] if answers else "")
        if not rec.get("caption") and answers:
            rec["caption"] = answers[0]
    for key in ("question", "answer", "caption"):
        if isinstance(rec.get(key), str):
            rec[key] = _strip_markers(rec[key]) if key == "question" else rec[key].strip()
    return rec


def _resolve(h5_path: str, base: Path, root: Path | None) -> tuple[Path, str | None]:
    """Resolved path and, when it escapes ``root``, the reason it is refused."""
    candidate = Path(h5_path).expanduser()
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if root is not None:
        try:
            resolved.relative_to(root)
        except ValueError:
            return resolved, f"h5_path '{h5_path}' resolves to {resolved}, outside h5_root {root} (refused)"
    return resolved, None


def load_annotations(
    path: str | Path,
    task: AnnotationTask = "clip",
    *,
    h5_root: str | Path | None = None,
    split: str | None = None,
    check_files: bool = True,
    require_case_id: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
) -> datasets.Dataset:
    """Load and validate an annotation file for ``task`` (``"clip"`` or ``"llava"``).

    Returns a ``datasets.Dataset`` with (at least) ``h5_path`` (absolute), ``slide_id``, ``case_id``
    (default: the slide id), ``dataset``, ``split``, ``row`` (1-based record number in the file) and
    ``caption`` (clip) or ``question``, ``answer``, ``conversations`` (llava; a list of
    ``{"role", "content"}`` turns). Extra columns are kept.

    Args:
        h5_root: resolve relative ``h5_path``s here and refuse paths escaping it.
        split: keep only rows whose ``split`` column equals this value.
        check_files: check that every H5 file exists (only the file system is touched, no H5 is opened).
        require_case_id: the loss groups slides by case: a missing ``case_id`` column or empty value is an
            error instead of defaulting to the slide id.
        on_error: ``"raise"`` (default) lists every bad row in one :class:`AnnotationError`; ``"skip"``
            drops bad rows with a warning that counts them.
    """
    import datasets  # heavy import, kept local so ``import processing`` stays cheap

    if task not in REQUIRED_COLUMNS:
        raise ValueError(f"task={task!r} must be 'clip' or 'llava'.")
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found.")
    records, keys = _read_records(path)
    if not records:
        raise AnnotationError(f"{path}: the annotation file has no rows.")

    records = [_to_seed_record(r) for r in records]
    keys = set().union(*(r.keys() for r in records))
    required = REQUIRED_COLUMNS[task]
    has_conv = "conversations" in keys
    missing = [
        c for c in required if c not in keys and not (task == "llava" and has_conv and c in ("question", "answer"))
    ]
    if missing:
        raise AnnotationError(
            f"{path}: missing required column(s) {missing} for task '{task}' (found {sorted(keys)}). "
            f"A {task} file needs {list(required)}"
            + (" (or a 'conversations' list)" if task == "llava" else "")
            + "; rename your columns or pass the right task."
        )

    if require_case_id and "case_id" not in keys:
        raise AnnotationError(
            f"{path}: no 'case_id' column, but the loss groups slides by case (several slides "
            "of one case share one report). Add a case_id column (e.g. the 12-character TCGA "
            "patient barcode), or disable case grouping."
        )
    root = Path(h5_root).expanduser().resolve() if h5_root is not None else None
    base = root if root is not None else path.parent.resolve()
    text_columns = ("caption",) if task == "clip" else ("question", "answer")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, rec in enumerate(records, 1):
        if split is not None and str(rec.get("split", "")) != split:
            continue
        row_problems = []
        h5 = str(rec.get("h5_path") or "").strip()
        resolved = None
        if not h5:
            row_problems.append("empty h5_path")
        else:
            resolved, refused = _resolve(h5, base, root)
            if refused:
                row_problems.append(refused)
            elif check_files and not resolved.is_file():
                row_problems.append(f"H5 file '{h5}' not found (looked at {resolved})")
        if require_case_id and not str(rec.get("case_id") or "").strip():
            row_problems.append("empty case_id")
        conv = rec.get("conversations") if task == "llava" else None
        if conv:
            if not any(t["role"] == "assistant" and t["content"] for t in conv):
                row_problems.append("conversation has no non-empty assistant answer")
            if not any(t["role"] == "user" and t["content"] for t in conv):
                row_problems.append("conversation has no non-empty user question")
        else:
            for col in text_columns:
                if not str(rec.get(col) or "").strip():
                    row_problems.append(f"empty {col}")
        if row_problems:
            problems.append(f"row {number}: " + "; ".join(row_problems))
            continue
        slide_id = str(rec.get("slide_id") or "").strip() or Path(h5).stem
        out = {k: ("" if v is None else v) for k, v in rec.items()}
        out.update(
            h5_path=str(resolved),
            slide_id=slide_id,
            row=number,
            case_id=str(rec.get("case_id") or "").strip() or slide_id,
            dataset=str(rec.get("dataset") or ""),
            split=str(rec.get("split") or ""),
        )
        if task == "llava" and not conv:
            out["conversations"] = [
                {"role": "user", "content": str(rec["question"]).strip()},
                {"role": "assistant", "content": str(rec["answer"]).strip()},
            ]
        for key in ("caption", "question", "answer"):
            out[key] = str(out.get(key) or "")
        rows.append(out)

    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more" if len(problems) > _MAX_LISTED_PROBLEMS else ""
        )
        message = (
            f"{path}: {len(problems)} of {len(records)} row(s) are unusable for task '{task}':\n  {listed}{more}\n"
            "Fix the rows (paths resolve against "
            + (f"h5_root {root}" if root else f"the file's folder {base}")
            + "), or pass on_error='skip' (--skip_bad_samples) to drop them."
        )
        if on_error != "skip":
            raise AnnotationError(message)
        logger.warning("%s", message)
    if not rows:
        raise AnnotationError(
            f"{path}: no usable rows" + (f" with split == {split!r}" if split is not None else "") + "."
        )
    # Arrow needs one type per column: stringify values of mixed-type extra columns.
    all_keys = set().union(*(r.keys() for r in rows))
    for r in rows:  # Dataset.from_list takes its columns from the first row
        for key in all_keys:
            r.setdefault(key, "")
    for key in all_keys - {"conversations", "row"}:
        types = {type(r.get(key)) for r in rows}
        if len(types) > 1 or types == {dict} or types == {list}:
            for r in rows:
                v = r.get(key, "")
                r[key] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return datasets.Dataset.from_list(rows)


def list_slide_files(source: str | Path, h5_root: str | Path | None = None) -> list[dict[str, Any]]:
    """The slides of a cohort: every ``*.h5`` of a folder (sorted by name), or the distinct ``h5_path`` values of a
    CSV / JSON / JSONL annotation file (in file order; relative paths resolve against ``h5_root``, else the file's
    folder). Returns ``[{"slide_id", "h5_path", "row", ...}]`` (an annotation file's other columns too: ``case_id``,
    ``label``, ``patch_size_level0`` …); the slide id is the ``slide_id`` column or the file name without ``.h5``, and
    must be unique (it names the output files). Rows of one file after the first are dropped."""
    source = Path(source).expanduser()
    if source.is_dir():
        rows = [{"slide_id": p.stem, "h5_path": str(p.resolve())} for p in sorted(source.glob("*.h5"))]
        if not rows:
            raise AnnotationError(f"{source}: no *.h5 slide files in this folder.")
    elif source.is_file():
        records, columns = _read_records(source)
        if "h5_path" not in columns and "image" not in columns:
            raise AnnotationError(f"{source}: no 'h5_path' column (found {sorted(columns)}).")
        root = Path(h5_root).expanduser().resolve() if h5_root else None
        base = root or source.parent.resolve()
        rows, seen = [], set()
        for number, record in enumerate(records, 1):
            record = _to_seed_record(record)
            if not str(record.get("h5_path") or "").strip():
                raise AnnotationError(f"{source}: record {number} has no h5_path.")
            path, refused = _resolve(str(record["h5_path"]), base, root)
            if refused:
                raise AnnotationError(f"{source}: record {number}: {refused}.")
            if str(path) in seen:
                continue
            seen.add(str(path))
            extra = {k: v for k, v in record.items() if isinstance(v, (str, int, float)) and v != ""}
            row = {**extra, "slide_id": str(record.get("slide_id") or "").strip() or path.stem, "h5_path": str(path)}
            row["row"] = number
            rows.append(row)
    else:
        raise AnnotationError(f"{source}: no such folder or annotation file.")
    ids: dict[str, str] = {}
    for row in rows:
        if row["slide_id"] in ids:
            raise AnnotationError(
                f"{source}: slide id {row['slide_id']!r} names two files ({ids[row['slide_id']]} and "
                f"{row['h5_path']}); give them distinct slide_id values (the output files are named by slide id)."
            )
        ids[row["slide_id"]] = row["h5_path"]
    return rows


def row_patch_size(row: dict[str, Any], default: int | None = None) -> int | None:
    """The row's optional ``patch_size_level0`` column (the slide's tile side in level-0 pixels, for files that
    state none or state it wrongly), else ``default``; empty cells (CSV ``""``, NaN) count as absent."""
    value = row.get("patch_size_level0")
    if value is None or (isinstance(value, str) and not value.strip()) or value != value:  # NaN != NaN
        return default
    try:
        size = int(float(value))
    except (TypeError, ValueError):
        size = 0
    if size <= 0 or size != float(value):
        raise AnnotationError(
            f"annotation row {row.get('row', '?')} ({row.get('h5_path', '?')}): patch_size_level0={value!r} is not a "
            "positive integer (the tile side in level-0 pixels, e.g. 512 for 20x tiles on a 40x scan)."
        )
    return size


__all__ = ["load_annotations", "list_slide_files", "row_patch_size", "SEED_COLUMNS", "REQUIRED_COLUMNS"]
