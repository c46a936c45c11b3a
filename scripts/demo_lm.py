"""The demo's small causal LM: a tiny Llama pretrained from scratch on the demo's real texts (offline).

WSI-LLaVA expects a *pretrained* language model under the projector: stage 2 aligns visual tokens to a language
space the LM already has, and stage-3 LoRA adapts a model that already knows the dialogue format. No real LM
small enough for a 2-core CPU demo can be downloaded here, so the demo pretrains one in seconds on the training
split's captions, reports and question/answer dialogues (rendered with the processor's prompt template, so the
LM learns the USER / ASSISTANT format and the answer vocabulary). Held-out slides' texts are never seen.
"""

from __future__ import annotations

from pathlib import Path

import torch


def pretrain_demo_lm(data_dir: Path, tokenizer_dir: Path, output_dir: Path, *, epochs: int = 8, seed: int = 0) -> Path:
    """Train a 2-layer 128-d Llama on the demo's training-split dialogues; save model + tokenizer."""
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from processing import WSIProcessor, load_annotations

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    processor = WSIProcessor(tokenizer)
    texts = []
    for path in sorted(Path(data_dir).glob("llava_*_train.json")):
        for row in load_annotations(path, "llava", check_files=False):
            texts.append(processor.render_conversation(row["conversations"])[0])
    encoded = [tokenizer(t, truncation=True, max_length=384)["input_ids"] for t in texts]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=False,
    )
    dataset = [{"input_ids": ids} for ids in encoded]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with torch.no_grad():
        sample = tokenizer(texts[0][:200], return_tensors="pt")
        loss = model(**sample, labels=sample["input_ids"]).loss.item()
    print(
        f"demo LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(texts)} training "
        f"dialogues, final sample loss {loss:.2f}",
        flush=True,
    )
    return output_dir
