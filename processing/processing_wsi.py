"""``WSIProcessor``: slides (tile-feature bags) + text → model-ready ``BatchFeature``.

Hub-shipped (copied next to checkpoints by ``save_pretrained``): imports only stdlib, numpy, torch,
transformers and sibling modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .coordinates import resolve_patch_size, validate_coords
from .errors import PromptError, SlideFormatError
from .slide_io import SlideFeatures, read_slide
from .tile_sampling import TILE_SAMPLING_STRATEGIES, sample_tile_indices

logger = logging.getLogger(__name__)

SlideInput = Union[str, "os.PathLike[str]", SlideFeatures, torch.Tensor, tuple, dict]

# Used when the tokenizer has no chat template. Plain, model-agnostic, and prefix-stable (each turn only appends).
DEFAULT_USER_TEMPLATE = "USER: {content}\nASSISTANT:"
DEFAULT_ASSISTANT_TEMPLATE = " {content}{eos}"  # the space belongs to the answer: trained, and generated
DEFAULT_TURN_SEPARATOR = "\n"


@dataclass(frozen=True)
class PromptPiece:
    """A run of prompt text (``trained=False``) or one assistant reply (``trained=True``), tokenised on its own;
    ``questions`` holds the character spans of the user questions inside a prompt piece."""

    text: str
    trained: bool
    questions: tuple[tuple[int, int], ...] = ()


def model_frame_coords(slide: SlideFeatures, tile_size: int) -> torch.Tensor:
    """``[N, 2]`` int64 ``floor(coords / patch_size_level0) * tile_size``: the slide's tile grid in the frame of a
    model whose ``config.tile_size`` is ``tile_size`` (a slide without a known tile side is taken to be in it)."""
    patch = slide.patch_size_level0 or tile_size
    return torch.div(slide.coords, patch, rounding_mode="floor") * tile_size


def pad_slides(slides: Sequence[SlideFeatures], tile_size: int = 256) -> dict[str, torch.Tensor]:
    """Right-pad ragged slides into ``tile_features [B, Nmax, D]`` (float32), ``tile_coords [B, Nmax, 2]`` (int64,
    in the model's frame: :func:`model_frame_coords`) and ``tile_mask [B, Nmax]`` (True = real tile)."""
    if not slides:
        raise ValueError("pad_slides needs at least one slide.")
    dims = {s.feature_dim for s in slides}
    if len(dims) > 1:
        raise SlideFormatError(
            f"slides in one batch have different feature dimensions {sorted(dims)}: "
            + ", ".join(f"{s.path or 'in-memory'}: {s.feature_dim}" for s in slides)
        )
    n_max = max(s.num_tiles for s in slides)
    batch, dim = len(slides), dims.pop()
    features = torch.zeros(batch, n_max, dim, dtype=torch.float32)  # [B, Nmax, D]
    coords = torch.zeros(batch, n_max, 2, dtype=torch.long)  # [B, Nmax, 2]
    mask = torch.zeros(batch, n_max, dtype=torch.bool)  # [B, Nmax]
    for i, s in enumerate(slides):
        n = s.num_tiles
        features[i, :n] = s.features
        coords[i, :n] = model_frame_coords(s, tile_size)
        mask[i, :n] = True
    return {"tile_features": features, "tile_coords": coords, "tile_mask": mask}


class WSIProcessor(ProcessorMixin):
    """Tokenizer + slide options for WSI-CLIP and WSI-LLaVA.

    ``processor(slides=..., text=...)`` returns ``tile_features [B, Nmax, D]`` (float32), ``tile_coords
    [B, Nmax, 2]`` (int64 (x, y) in the model's frame, see below), ``tile_mask [B, Nmax]`` (True = real tile;
    padding is zeros with mask False), and ``input_ids`` / ``attention_mask`` for the texts.

    Positions at any magnification: each slide's tiles are placed on the grid ``floor(coords / patch_size_level0)``
    with the slide's own tile side in level-0 pixels (the file's attribute, else its tile stride; see
    :func:`~processing.coordinates.resolve_patch_size`), and ``tile_coords`` are returned as ``grid * tile_size``,
    so the slide encoder's ``floor(tile_coords / config.tile_size)`` is that grid whatever the scan magnification:
    a 40× file (512-px level-0 tiles) and the same slide at 20× (256 px) give the same tensors. The slides' level-0
    coordinates stay in :class:`~processing.slide_io.SlideFeatures` (``load_slide``) for drawing on the slide.

    Args:
        tokenizer: any Hugging Face tokenizer (may be ``None`` for slide-only use).
        max_tiles: tile cap per slide (``None``: no cap).
        tile_sampling: ``"uniform"`` (deterministic, evaluation), ``"random"`` (training) or ``"all"``.
        feature_dim: expected tile feature dimension; slides with another D are refused with a clear error.
        tile_size: the slide encoder's ``config.tile_size``: the frame ``tile_coords`` are returned in (above), and
            the stride that lays out bare feature tensors given without coordinates.
        slide_token: the placeholder string standing for the slide's visual tokens in WSI-LLaVA prompts.
        max_length: default token limit for texts / instruction examples.
    """

    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        max_tiles: int | None = 4096,
        tile_sampling: str = "uniform",
        feature_dim: int | None = None,
        tile_size: int = 256,
        slide_token: str = "<slide>",
        max_length: int | None = None,
        chat_template: str | None = None,
        **kwargs,
    ):
        if tile_sampling not in TILE_SAMPLING_STRATEGIES:
            raise ValueError(f"tile_sampling={tile_sampling!r} is not one of {TILE_SAMPLING_STRATEGIES}.")
        self.max_tiles = max_tiles
        self.tile_sampling = tile_sampling
        self.feature_dim = feature_dim
        self.tile_size = tile_size
        self.slide_token = slide_token
        self.max_length = max_length
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)

    # ------------------------------------------------------------------------------------------------ slides
    def load_slide(
        self,
        slide: SlideInput,
        *,
        max_tiles: int | None = None,
        tile_sampling: str | None = None,
        seed: int | None = None,
        coords: torch.Tensor | np.ndarray | None = None,
        patch_size_level0: int | None = None,
    ) -> SlideFeatures:
        """Any accepted slide input → validated, spatially ordered, sampled :class:`SlideFeatures` (level-0
        coordinates, ``patch_size_level0`` resolved).

        Accepts an H5 path, a ``SlideFeatures``, a ``(features, coords)`` tuple, a ``{"features", "coords"}``
        dict, or a bare ``[N, D]`` tensor (with ``coords=`` or, without, laid out row-major on a square grid of
        stride ``tile_size`` — fine for position-free towers, meaningless for LongNet). ``patch_size_level0``
        overrides the tile side the slide states (or that is inferred from its coordinates).
        """
        cap = self.max_tiles if max_tiles is None else max_tiles
        strategy = tile_sampling or self.tile_sampling
        if isinstance(slide, (str,)) or hasattr(slide, "__fspath__"):
            result = read_slide(
                slide, max_tiles=cap, tile_sampling=strategy, seed=seed, patch_size_level0=patch_size_level0
            )
            if result.patch_size_level0 is None:  # one tile, or no two tiles in a row or column: the model's frame
                result = dataclasses.replace(result, patch_size_level0=self.tile_size, patch_size_source="default")
        else:
            result = self._in_memory_slide(slide, coords, patch_size_level0)
            keep = sample_tile_indices(result.num_tiles, cap, strategy, seed)
            if keep.size != result.num_tiles:
                result = result.select(keep)
        if self.feature_dim is not None and result.feature_dim != self.feature_dim:
            raise SlideFormatError(
                f"{result.path or 'in-memory slide'}: tile features have dimension "
                f"{result.feature_dim} but this processor / model expects {self.feature_dim}. "
                "Use features from the tile encoder the model was trained on (e.g. 1536-d "
                "Prov-GigaPath) or a model configured for this dimension."
            )
        return result

    def _in_memory_slide(self, slide: Any, coords: Any, patch_size_level0: int | None = None) -> SlideFeatures:
        patch_origin = None
        if isinstance(slide, SlideFeatures):
            features, xy, patch, path = slide.features, slide.coords, slide.patch_size_level0, slide.path
            patch_origin = slide.patch_size_source
        else:
            if isinstance(slide, dict):
                features, xy = slide.get("features"), slide.get("coords", coords)
            elif isinstance(slide, (tuple, list)) and len(slide) == 2:
                features, xy = slide
            else:
                features, xy = slide, coords
            features = torch.as_tensor(features)
            patch, path = None, None
            if xy is None:
                if features.ndim != 2:
                    raise SlideFormatError(f"in-memory slide: features must be [N, D], got {tuple(features.shape)}.")
                side = max(1, math.ceil(math.sqrt(features.shape[0])))
                grid = torch.arange(features.shape[0])
                xy = torch.stack([grid % side, grid // side], dim=1) * self.tile_size  # [N, 2] (x, y)
                patch, patch_origin = self.tile_size, "default"
        features = torch.as_tensor(features)
        xy = torch.as_tensor(xy)
        source = path or "in-memory slide"
        if features.ndim != 2 or features.shape[0] == 0:
            raise SlideFormatError(
                f"{source}: features must be a non-empty [N, D] tensor, got {tuple(features.shape)}."
            )
        if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != features.shape[0]:
            raise SlideFormatError(
                f"{source}: coords must be [N, 2] with N = {features.shape[0]} (features rows), got {tuple(xy.shape)}."
            )
        if xy.dtype == torch.float16:
            raise SlideFormatError(f"{source}: float16 coordinates lose precision above 2048 px; pass int64.")
        if not torch.isfinite(features.float()).all():
            raise SlideFormatError(f"{source}: features contain NaN/Inf values.")
        xy = torch.floor(xy).long() if xy.is_floating_point() else xy.long()
        xy_np = xy.cpu().numpy()
        order = validate_coords(xy_np, source)  # None: already row-major
        if patch_size_level0 is not None or patch_origin != "default":  # a SlideFeatures' own size counts as stated
            resolved, how = resolve_patch_size(xy_np, patch, patch_size_level0, source, default=self.tile_size)
            keep_origin = patch_size_level0 is None and patch is not None and patch_origin is not None
            patch, patch_origin = resolved, patch_origin if keep_origin else how
        features = features.float()
        if order is not None:
            order = torch.from_numpy(order)
            features, xy = features[order], xy[order]
        return SlideFeatures(features, xy, patch, path, "memory", patch_origin)

    def pad_slides(self, slides: Sequence[SlideFeatures]) -> dict[str, torch.Tensor]:
        """:func:`pad_slides` with this processor's ``tile_size`` (``tile_coords`` in the model's frame)."""
        return pad_slides(slides, self.tile_size)

    # ------------------------------------------------------------------------------------------------- text
    def _require_tokenizer(self):
        if getattr(self, "tokenizer", None) is None:
            raise ValueError("This WSIProcessor has no tokenizer; build it with WSIProcessor(tokenizer=...).")
        return self.tokenizer

    def __call__(
        self,
        slides: SlideInput | Sequence[SlideInput] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        coords: Sequence[Any] | None = None,
        max_tiles: int | None = None,
        tile_sampling: str | None = None,
        seed: int | None = None,
        patch_size_level0: int | None = None,
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str = "pt",
        **text_kwargs,
    ) -> BatchFeature:
        """Process a batch of slides and/or texts (a single slide or string is treated as a batch of one)."""
        if slides is None and text is None:
            raise ValueError("WSIProcessor needs `slides`, `text` or both.")
        data: dict[str, Any] = {}
        if slides is not None:
            single = (
                isinstance(slides, (str, SlideFeatures, dict))
                or hasattr(slides, "__fspath__")
                or (isinstance(slides, torch.Tensor) and slides.ndim == 2)
            )
            slide_list = [slides] if single else list(slides)
            coord_list = list(coords) if coords is not None else [None] * len(slide_list)
            if len(coord_list) != len(slide_list):
                raise ValueError(f"got {len(slide_list)} slides but {len(coord_list)} coords.")
            loaded = [
                self.load_slide(
                    s,
                    max_tiles=max_tiles,
                    tile_sampling=tile_sampling,
                    seed=None if seed is None else seed + i,
                    coords=c,
                    patch_size_level0=patch_size_level0,
                )
                for i, (s, c) in enumerate(zip(slide_list, coord_list))
            ]
            data.update(self.pad_slides(loaded))
        if text is not None:
            tokenizer = self._require_tokenizer()
            texts = [text] if isinstance(text, str) else list(text)
            encoded = tokenizer(
                texts,
                padding=padding,
                truncation=truncation,
                max_length=max_length or self.max_length,
                return_tensors=return_tensors,
                **text_kwargs,
            )
            data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self._require_tokenizer().batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self._require_tokenizer().decode(*args, **kwargs)

    # ------------------------------------------------------------------------------------ instruction prompts
    def ensure_slide_token(self) -> int:
        """Add ``slide_token`` to the tokenizer as a special token if missing; returns how many were added.

        After adding, the language model's embeddings must be resized (``resize_token_embeddings``).
        """
        tokenizer = self._require_tokenizer()
        if self.slide_token in tokenizer.get_vocab():
            return 0
        return tokenizer.add_special_tokens(
            {"additional_special_tokens": [self.slide_token]}, replace_extra_special_tokens=False
        )

    @property
    def slide_token_id(self) -> int:
        tokenizer = self._require_tokenizer()
        vocab = tokenizer.get_vocab()
        if self.slide_token not in vocab:
            raise PromptError(
                f"the slide placeholder {self.slide_token!r} is not in the tokenizer's vocabulary. "
                "Call processor.ensure_slide_token() and resize the language model's embeddings."
            )
        return vocab[self.slide_token]

    def _chat_turns(self, conversation: Sequence[dict[str, str]], with_slide: bool = True) -> list[dict[str, str]]:
        """Normalised turns with the slide placeholder at the start of the first user turn (``with_slide=False``:
        no placeholder at all, for text-only baselines)."""
        turns = [{"role": t["role"], "content": str(t["content"])} for t in conversation]
        if not turns or turns[0]["role"] not in ("user", "system"):
            raise PromptError("a conversation must start with a user (or system) turn.")
        if not with_slide:
            for turn in turns:
                turn["content"] = turn["content"].replace(self.slide_token, "").strip()
        elif not any(self.slide_token in t["content"] for t in turns):
            first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
            turns[first_user]["content"] = f"{self.slide_token}\n{turns[first_user]['content']}"
        return turns

    def _question_text(self, content: str) -> str:
        """A user turn's question without the slide placeholder (what prompt-guided selection reads)."""
        return content.replace(self.slide_token, "").strip()

    def prompt_pieces(
        self, conversation: Sequence[dict[str, str]], add_generation_prompt: bool = False, with_slide: bool = True
    ) -> list[PromptPiece]:
        """The conversation as alternating prompt / answer pieces, each tokenised on its own.

        Tokenising piece by piece makes the generation prompt of turn ``k`` the training prefix of that turn *token for
        token*: a tokenizer that merges across the prompt/answer boundary (byte-level BPE turns ``'ASSISTANT: 3'`` into
        ``[..., ':', 'Ġ', '3']``) would otherwise train with a different prefix than it generates from. In the plain
        format the space before an answer belongs to the answer piece, so it is trained and generated like any token.
        Each user turn's piece records the character span of its question (placeholder excluded).
        """
        tokenizer = self._require_tokenizer()
        turns = self._chat_turns(conversation, with_slide)
        if add_generation_prompt and turns[-1]["role"] == "assistant":
            raise PromptError("add_generation_prompt needs a conversation ending with a user turn.")
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        pieces: list[PromptPiece] = []

        def add_prompt(text: str, question: tuple[int, int] | None = None) -> None:
            if pieces and not pieces[-1].trained:  # adjacent prompt text is one piece (same rule in every call)
                last = pieces[-1]
                shift = len(last.text)
                spans = last.questions + ((question[0] + shift, question[1] + shift),) if question else last.questions
                pieces[-1] = PromptPiece(last.text + text, False, spans)
            else:
                pieces.append(PromptPiece(text, False, (question,) if question else ()))

        if template is None:
            eos = tokenizer.eos_token or ""
            for turn in turns:
                if turn["role"] == "assistant":
                    pieces.append(
                        PromptPiece(DEFAULT_ASSISTANT_TEMPLATE.format(content=turn["content"], eos=eos), True)
                    )
                    add_prompt(DEFAULT_TURN_SEPARATOR)
                elif turn["role"] == "system":
                    add_prompt(turn["content"] + "\n")
                else:
                    text = DEFAULT_USER_TEMPLATE.format(content=turn["content"])
                    question = self._question_text(turn["content"])
                    start = text.rfind(question) if question else -1
                    add_prompt(text, (start, start + len(question)) if start >= 0 else None)
            if (
                pieces
                and not pieces[-1].trained
                and pieces[-1].text == DEFAULT_TURN_SEPARATOR
                and turns[-1]["role"] == "assistant"
            ):
                pieces.pop()  # no dangling separator after the last answer
            return pieces

        def render(msgs: list[dict[str, str]], gen: bool) -> str:
            if not msgs:
                return ""
            return tokenizer.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
            )

        done = ""  # text rendered so far (a prefix of every later rendering)
        for k, turn in enumerate(turns):
            if turn["role"] == "assistant":
                prefix, full = render(turns[:k], True), render(turns[: k + 1], False)
                if not (prefix.startswith(done) and full.startswith(prefix)):
                    raise PromptError(
                        "the chat template is not prefix-stable (rendering a reply changes earlier "
                        "text), so answer tokens cannot be located; use a template that only appends."
                    )
                add_prompt(prefix[len(done) :])
                pieces.append(PromptPiece(full[len(prefix) :], True))
                done = full
            elif turn["role"] == "user":
                rendered = render(turns[: k + 1], False)
                if not rendered.startswith(done):
                    raise PromptError("the chat template is not prefix-stable (a new user turn changes earlier text).")
                new = rendered[len(done) :]
                question = self._question_text(turn["content"])
                start = new.rfind(question) if question else -1
                add_prompt(new, (start, start + len(question)) if start >= 0 else None)
                done = rendered
            # system turns are rendered together with the next user turn
        if turns[-1]["role"] != "assistant":
            final = render(turns, add_generation_prompt)
            if not final.startswith(done):
                raise PromptError(
                    "the chat template is not prefix-stable (the generation prompt changes earlier text)."
                )
            if len(final) > len(done):
                add_prompt(final[len(done) :])
        return pieces

    def render_conversation(
        self, conversation: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """Prompt text of a conversation and the character spans of every assistant reply (the trained part)."""
        text, spans = "", []
        for piece in self.prompt_pieces(conversation, add_generation_prompt):
            if piece.trained:
                spans.append((len(text), len(text) + len(piece.text)))
            text += piece.text
        return text, spans

    def _tokenize_pieces(
        self, pieces: Sequence[PromptPiece], current_question: int
    ) -> tuple[list[int], list[int], list[int]]:
        """ids, labels and question mask of ``pieces``; the question mask marks the tokens of the
        ``current_question``-th user question (``-1``: the last one)."""
        tokenizer = self._require_tokenizer()
        ids: list[int] = []
        labels: list[int] = []
        spans: list[list[int]] = []  # per user question: its token positions
        for piece in pieces:
            enc = tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=bool(piece.questions))
            piece_ids = list(enc["input_ids"])
            for start, end in piece.questions:
                spans.append(
                    [len(ids) + i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
                )
            ids += piece_ids
            labels += piece_ids if piece.trained else [-100] * len(piece_ids)
        bos = tokenizer.bos_token_id
        if (
            bos is not None
            and getattr(tokenizer, "add_bos_token", False)
            and (not ids or ids[0] != bos)
            and not (pieces and pieces[0].text.startswith(tokenizer.bos_token or "\0"))
        ):
            ids, labels = [bos] + ids, [-100] + labels
            spans = [[i + 1 for i in span] for span in spans]
        question = [0] * len(ids)
        if spans:
            slide_id = tokenizer.get_vocab().get(self.slide_token, -1)
            for i in spans[current_question]:
                question[i] = int(ids[i] != slide_id)
        return ids, labels, question

    def build_instruction_example(
        self,
        conversation: Sequence[dict[str, str]],
        max_length: int | None = None,
        source: str = "example",
        with_slide: bool = True,
    ) -> dict[str, list[int]]:
        """Token ids, labels and question mask for one training conversation.

        Labels are -100 everywhere but the assistant replies. ``question_mask`` marks the tokens of the question
        answered first (the user turn before the first reply: what prompt-guided token selection reads; one
        selection serves the whole conversation). Truncation (to ``max_length``) cuts from the end; it is an error
        when the slide placeholder or the whole first answer would be lost, never a silent shape mismatch.
        ``with_slide=False`` builds the same example without the placeholder (the text-only baseline).
        """
        slide_id = (
            self.slide_token_id if with_slide else self._require_tokenizer().get_vocab().get(self.slide_token, -1)
        )
        pieces = self.prompt_pieces(conversation, with_slide=with_slide)
        first_answer = next((i for i, p in enumerate(pieces) if p.trained), len(pieces))
        questions_before = sum(len(p.questions) for p in pieces[:first_answer])
        ids, labels, question = self._tokenize_pieces(pieces, max(questions_before - 1, 0))
        if ids.count(slide_id) != int(with_slide):
            raise PromptError(
                f"{source}: the prompt must contain the slide placeholder {self.slide_token!r} "
                f"{'exactly once' if with_slide else 'never (text only)'}, found {ids.count(slide_id)} "
                "(is it also written in the question?)."
            )
        full_length = len(ids)
        limit = max_length or self.max_length
        if limit is not None and len(ids) > limit:
            ids, labels, question = ids[:limit], labels[:limit], question[:limit]
            if with_slide and slide_id not in ids:
                raise PromptError(f"{source}: max_length={limit} cuts off the slide placeholder; raise max_length.")
            if all(label == -100 for label in labels):
                raise PromptError(
                    f"{source}: max_length={limit} cuts off the whole answer (the example is "
                    f"{full_length} tokens); raise max_length or shorten the question."
                )
        if all(label == -100 for label in labels):
            raise PromptError(f"{source}: the conversation has no answer tokens to train on.")
        return {"input_ids": ids, "labels": labels, "question_mask": question}

    def build_generation_example(
        self, question: str | Sequence[dict[str, str]], with_slide: bool = True
    ) -> dict[str, list[int]]:
        """Token ids and question mask of a generation prompt: the conversation so far (a question, or turns ending
        with a user turn) plus the assistant prefix. The ids equal the training ids of the same turns up to the
        first answer token, and the question mask marks the last user question."""
        turns = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        pieces = self.prompt_pieces(turns, add_generation_prompt=True, with_slide=with_slide)
        ids, _, mask = self._tokenize_pieces(pieces, -1)
        return {"input_ids": ids, "question_mask": mask}

    def build_generation_prompt(self, question: str | Sequence[dict[str, str]]) -> str:
        """Prompt text for ``generate()``: the conversation so far plus the assistant prefix."""
        turns = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        text, _ = self.render_conversation(turns, add_generation_prompt=True)
        return text

    @property
    def model_input_names(self) -> list[str]:
        return ["tile_features", "tile_coords", "tile_mask", "input_ids", "attention_mask"]


__all__ = ["WSIProcessor", "PromptPiece", "pad_slides", "model_frame_coords"]
