"""``python scripts/benchmark.py gpu`` (``bash scripts/gpu_check.sh``): the slide encoder on one CUDA GPU, < 5 min.

1. **Parity**: the Prov-GigaPath fixtures (outputs of the original encoder, CPU fp32) against this package on the GPU
   with every attention kernel available (``chunked`` matmul; ``fused``: PyTorch's flash / memory-efficient SDPA, and
   the flash-attn package's kernel when it is installed) in fp32 / bf16 / fp16. Error = max |ours − original| /
   max |original| over ``encoder_out`` and the pooled outputs. Tolerances: fp32 1e-4 (TF32 off), fp16 2e-2,
   bf16 6e-2 (bf16 keeps 8 mantissa bits; the original itself runs under fp16 autocast on GPUs).
2. **A bf16 train step** (forward + backward, dropout on) of the released 12-layer 768-d shape at ``train_tiles``
   tiles: loss and every gradient finite.
3. **Peak memory** of inference (bf16, B=1) at each of ``sizes`` tiles, and of the train step.
4. **Embedding throughput**: :mod:`bench_embed` on the GPU (ragged batches vs one slide at a time).

Without CUDA it prints why and exits 0 (``--device cpu`` runs the same code on tiny sizes, as the test suite does).
Results also go to ``--json_out``.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Args:
    device: str = field(default="cuda", metadata={"help": "cuda (the check) or cpu (a smoke run of the same code)"})
    fixtures: str = field(
        default=str(REPO.parent / "shared" / "fixtures" / "gigapath"), metadata={"help": "parity fixture folder"}
    )
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16", "fp16"], metadata={"help": "parity dtypes"})
    sizes: list[int] = field(default_factory=lambda: [16384, 65536, 100000], metadata={"help": "tiles per slide"})
    train_tiles: int = field(default=16384, metadata={"help": "tiles of the bf16 train step"})
    hidden_size: int = 768
    num_layers: int = 12
    input_dim: int = 1536
    embed_slides: int = field(default=32, metadata={"help": "slides of the embedding benchmark (0: skip it)"})
    embed_min_tiles: int = 1000
    embed_max_tiles: int = 20000
    json_out: str = field(default="", metadata={"help": "also write the results to this JSON file"})


def _encoder(args: Args, device: str, dtype: torch.dtype, **overrides):
    from wsi_clip import SlideEncoderConfig, SlideEncoderModel

    config = SlideEncoderConfig(
        input_dim=args.input_dim,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=16,
        intermediate_size=4 * args.hidden_size,
        **overrides,
    )
    torch.manual_seed(0)
    return SlideEncoderModel(config).to(device=device, dtype=dtype)


def _slide(n: int, dim: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    side = int(n**0.5) + 1
    cells = torch.arange(n, device=device)
    coords = torch.stack([cells % side, cells // side], dim=1)[None] * 256  # [1, N, 2]
    return torch.randn(1, n, dim, device=device, dtype=dtype), coords


def _attention_kernels(device: str) -> dict[str, object]:
    """Name → patch of ``dilated_attention._flash_attn_func`` selecting that kernel (``None``: leave it)."""
    from wsi_clip import dilated_attention

    kernels: dict[str, object] = {"chunked": None}
    if device.startswith("cuda"):
        kernels["fused (torch SDPA)"] = lambda: None
        if dilated_attention._flash_attn_func() is not None:
            kernels["fused (flash-attn)"] = dilated_attention._flash_attn_func
    else:
        kernels["fused (torch CPU flash)"] = lambda: None
    return kernels


def check_parity(args: Args, device: str) -> list[dict]:
    from safetensors.torch import load_file

    from wsi_clip import dilated_attention
    from wsi_clip.convert_gigapath import convert_gigapath_checkpoint

    folder = Path(args.fixtures)
    prefixes = sorted(p.name[: -len(".meta.json")] for p in folder.glob("*.meta.json")) if folder.is_dir() else []
    if not prefixes:
        print(f"parity: skipped, no fixtures at {folder}")
        return []
    rows = []
    original_kernel = dilated_attention._flash_attn_func
    for prefix in prefixes:
        meta = json.loads((folder / f"{prefix}.meta.json").read_text())["config"]
        inputs = load_file(str(folder / f"{prefix}.inputs.safetensors"))
        ref = load_file(str(folder / f"{prefix}.outputs.safetensors"))
        converted = convert_gigapath_checkpoint(
            folder / f"{prefix}.state_dict.safetensors",
            max_wsi_size=meta["max_wsi_size"],
            slide_ngrids=meta["slide_ngrids"],
            pooling="cls",
            embedding_layer="final",
        )
        for kernel, patch in _attention_kernels(device).items():
            for name in args.dtypes:
                dtype = DTYPES[name]
                model = copy.deepcopy(converted)
                model.config.attention_backend = "chunked" if kernel == "chunked" else "fused"
                for layer in model.layers:
                    layer.self_attn.backend = model.config.attention_backend
                model = model.to(device=device, dtype=dtype).eval()
                dilated_attention._flash_attn_func = patch or original_kernel
                try:
                    with torch.no_grad():
                        out = model(inputs["x"].to(device, dtype), inputs["coords"].to(device))
                except Exception as err:  # a kernel that does not take this dtype: reported, not fatal
                    rows.append({"fixture": prefix, "kernel": kernel, "dtype": name, "error": str(err)[:200]})
                    continue
                finally:
                    dilated_attention._flash_attn_func = original_kernel
                errors = {
                    key: float((ours.float().cpu() - ref[key]).abs().max() / ref[key].abs().max())
                    for key, ours in (("encoder_out", out.last_hidden_state), ("out_default", out.pooler_output))
                }
                worst = max(errors.values())
                rows.append(
                    {
                        "fixture": prefix,
                        "kernel": kernel,
                        "dtype": name,
                        **errors,
                        "tolerance": TOLERANCES[name],
                        "ok": worst <= TOLERANCES[name],
                    }
                )
    print(f"{'fixture':<34} {'kernel':<20} {'dtype':<5} {'encoder_out':>11} {'out_default':>11} {'ok':>4}")
    for r in rows:
        if "error" in r:
            print(f"{r['fixture']:<34} {r['kernel']:<20} {r['dtype']:<5} error: {r['error']}")
        else:
            print(
                f"{r['fixture']:<34} {r['kernel']:<20} {r['dtype']:<5} {r['encoder_out']:11.1e} "
                f"{r['out_default']:11.1e} {'yes' if r['ok'] else 'NO':>4}"
            )
    return rows


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def check_train_step(args: Args, device: str) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = _encoder(args, device, dtype).train()
    model.gradient_checkpointing_enable()
    feats, coords = _slide(args.train_tiles, args.input_dim, device, dtype)
    _peak_reset(device)
    start = time.perf_counter()
    out = model(feats, coords)
    loss = out.pooler_output.float().pow(2).mean() + out.last_hidden_state.float().pow(2).mean()
    loss.backward()
    finite = bool(torch.isfinite(loss)) and all(
        bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
    )
    result = {
        "tiles": args.train_tiles,
        "dtype": str(dtype).replace("torch.", ""),
        "loss": float(loss),
        "finite": finite,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_gb": _peak_gb(device),
    }
    print(f"train step: {result}")
    return result


def check_memory(args: Args, device: str) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = _encoder(args, device, dtype).eval()
    rows = []
    for n in args.sizes:
        feats, coords = _slide(n, args.input_dim, device, dtype)
        _peak_reset(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(feats, coords)
        seconds = time.perf_counter() - start
        rows.append(
            {"tiles": n, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds, "peak_gb": _peak_gb(device)}
        )
        del feats, coords
    for r in rows:
        peak = f"{r['peak_gb']:.2f} GB" if r["peak_gb"] is not None else "n/a"
        print(f"inference {r['tiles']:>7} tiles ({r['dtype']}): {r['seconds']:.2f} s, peak {peak}")
    return rows


def run(args: Args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu check: skipped, CUDA is not available on this machine (torch.cuda.is_available() is False).")
        return
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"gpu check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    results = {"device": device, "parity": check_parity(args, device)}
    results["train_step"] = check_train_step(args, device)
    results["memory"] = check_memory(args, device)
    if args.embed_slides:
        import bench_embed

        with tempfile.TemporaryDirectory() as tmp:
            bench_embed.run(
                bench_embed.Args(
                    num_slides=args.embed_slides,
                    min_tiles=args.embed_min_tiles,
                    max_tiles=args.embed_max_tiles,
                    feature_dim=args.input_dim,
                    hidden_size=args.hidden_size,
                    num_layers=args.num_layers,
                    device=device,
                    dtype="bf16" if device.startswith("cuda") else "fp32",
                    workdir=tmp,
                )
            )
    failed = [r for r in results["parity"] if r.get("ok") is False] + (
        [] if results["train_step"]["finite"] else [results["train_step"]]
    )
    print("gpu check: " + ("all within tolerance" if not failed else f"{len(failed)} check(s) FAILED"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if failed:
        raise SystemExit(1)
