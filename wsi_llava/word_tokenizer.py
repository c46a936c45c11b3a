"""A word-level tokenizer built offline from the training texts: the tokenizer of a randomly initialised tiny LM
(``wsi-train-llava --tokenizer_name_or_path word`` and the tests)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def build_word_tokenizer(texts: Sequence[str], extra_tokens: Sequence[str] = ()):
    """A word-level fast tokenizer over ``texts`` (words and punctuation, case kept), built offline: the demo's
    tokenizer for a randomly initialised tiny LM. Special tokens: [PAD] [UNK] <s> </s> and ``extra_tokens``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    specials = ["[PAD]", "[UNK]", "<s>", "</s>", *extra_tokens]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(str(text)):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def conversation_texts(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every turn's text of LLaVA-task annotation rows (``load_annotations(..., "llava")``), in order."""
    return [turn["content"] for row in rows for turn in row["conversations"]]


__all__ = ["build_word_tokenizer", "conversation_texts"]
