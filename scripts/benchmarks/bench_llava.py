"""``python scripts/benchmark.py llava``: WSI-LLaVA prefill cost per token-selection strategy, side by side.

For one slide of ``tiles`` tiles (Prov-GigaPath-sized slide encoder) and a small causal LM (SmolLM2-135M shape,
random weights — only the shapes matter for time and memory), measures in one run:

* the slide encoder's forward (with the O(N) CLS-attention row PruMerge needs);
* per strategy (``none``, ``prumerge``, ``prumerge_plus``, ``topk_prompt`` with K = ``topk``): the selection step's
  own time (tower outputs → kept tokens, incl. scoring projections), the visual tokens kept, and the LM prefill
  (projector + splice + LM forward over the spliced prompt) time and peak memory.

Targets (issue 5): prumerge prefill ≥ 5× faster than ``none``; selection ≤ 10 % of the slide encoder's time.
Peak memory: CUDA's max allocated on GPUs; on CPU the peak RSS increase, sampled every 2 ms during the call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Args:
    tiles: int = field(default=8192, metadata={"help": "tiles in the slide"})
    topk: int = field(default=256, metadata={"help": "K of topk_prompt"})
    strategies: list[str] = field(default_factory=lambda: ["none", "prumerge", "prumerge_plus", "topk_prompt"])
    encoder_layers: int = field(default=12, metadata={"help": "slide encoder depth (GigaPath: 12)"})
    encoder_width: int = field(default=768, metadata={"help": "slide encoder width (GigaPath: 768)"})
    lm_layers: int = field(default=30, metadata={"help": "LM depth (SmolLM2-135M: 30)"})
    lm_width: int = field(default=576, metadata={"help": "LM width (SmolLM2-135M: 576)"})
    repeats: int = field(default=2, metadata={"help": "best-of repeats per timing"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (bfloat16 on GPUs)"})


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


@torch.no_grad()
def run(args: Args) -> None:
    from transformers import LlamaConfig

    from wsi_llava import WSILlavaConfig, WSILlavaForConditionalGeneration
    from wsi_llava.token_selection import TokenSelectionInputs, run_token_selector

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    vision = dict(input_dim=1536, hidden_size=args.encoder_width, num_hidden_layers=args.encoder_layers,
                  num_attention_heads=16 if args.encoder_width % 16 == 0 else 8,
                  intermediate_size=4 * args.encoder_width, dropout=0.0, drop_path_rate=0.0)
    text = LlamaConfig(hidden_size=args.lm_width, intermediate_size=int(args.lm_width * 8 / 3) // 64 * 64,
                       num_hidden_layers=args.lm_layers, num_attention_heads=9 if args.lm_width % 9 == 0 else 8,
                       num_key_value_heads=3 if args.lm_width % 9 == 0 else 4, vocab_size=49152,
                       max_position_embeddings=args.tiles + 1024)
    model = WSILlavaForConditionalGeneration(WSILlavaConfig(vision_config=vision, text_config=text,
                                                            slide_token_id=49151)).to(device, dtype).eval()
    inner = model.model
    side = int(args.tiles ** 0.5) + 1
    i = torch.arange(args.tiles)
    coords = (torch.stack([i % side, i // side], 1) * 256).unsqueeze(0).to(device)
    features = (torch.randn(1, args.tiles, 1536) * 33 / 1536 ** 0.5).to(device, dtype)
    mask = torch.ones(1, args.tiles, dtype=torch.bool, device=device)
    prompt = torch.randint(0, 49000, (1, 48), device=device)
    prompt[0, 5] = 49151  # the slide placeholder

    t_enc, m_enc, (tokens, tower_out) = _measure(
        lambda: inner._tower_tokens(features, coords, mask, need_attention=True), device, args.repeats)
    question = inner.question_embedding(prompt)
    grid = torch.div(coords, 256, rounding_mode="floor")
    print(f"device {device} ({args.dtype}); slide of {args.tiles} tiles; slide encoder {args.encoder_layers}x"
          f"{args.encoder_width}: {t_enc * 1e3:.0f} ms, peak +{m_enc:.0f} MiB; LM {args.lm_layers}x{args.lm_width} "
          f"(SmolLM2-135M shape), prompt 48 text tokens\n")
    print(f"{'strategy':>14} {'kept':>6} {'select ms':>10} {'sel/enc':>8} {'prefill ms':>11} {'speed-up':>9} "
          f"{'prefill MiB':>12}")
    base_prefill = None
    for name in args.strategies:
        options = {"max_tokens": args.topk} if name == "topk_prompt" else {}
        inputs = TokenSelectionInputs(tokens=tokens, token_mask=mask, grid=grid, cls_attention=tower_out.cls_attention,
                                      keys=tower_out.tile_keys, question_embedding=question,
                                      project=inner.multi_modal_projector)
        t_sel, _, selection = _measure(lambda: run_token_selector(name, inputs, **options), device, args.repeats)

        def prefill(selection=selection):
            visual = inner.multi_modal_projector(selection.tokens)
            embeds, attn, _, pos = inner.splice(prompt, inner.get_input_embeddings()(prompt), visual,
                                                selection.token_mask)
            hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos,
                                          use_cache=True).last_hidden_state
            return model.lm_head(hidden[:, -1:])

        t_pre, m_pre, _ = _measure(prefill, device, args.repeats)
        base_prefill = base_prefill or (t_pre if name == "none" else None)
        speed = f"{base_prefill / t_pre:8.1f}x" if base_prefill else f"{'-':>9}"
        print(f"{name:>14} {int(selection.token_mask.sum()):>6} {t_sel * 1e3:>10.1f} {t_sel / t_enc:>7.1%} "
              f"{t_pre * 1e3:>11.0f} {speed} {m_pre:>12.0f}")
    print("\nkept = visual tokens spliced into the LM; select ms = selection alone (tower outputs given); "
          "sel/enc = selection / slide-encoder time (target <= 10%); speed-up = prefill(none) / prefill "
          "(target for prumerge >= 5x).")
