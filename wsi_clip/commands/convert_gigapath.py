"""``wsi-convert-gigapath``: the original Prov-GigaPath slide encoder checkpoint → a Hugging Face folder.

    wsi-convert-gigapath --checkpoint slide_encoder.pth --output_dir gigapath-slide-encoder \\
        [--max_wsi_size 262144] [--tile_size 256] [--pooling mean|cls] [--embedding_layer 11|final|0..L]
        [--num_attention_heads H]

Every upstream LongNet configuration converts (heads from upstream's table, ``--num_attention_heads`` for other
shapes), Prov-GigaPath-Flash (``prov-gigapath/prov-gigapath-flash``, 384-d tile features) included. Default
``pooler_output``: mean pooling of layer 11 for 12-layer models, of the final state otherwise (see
:func:`wsi_clip.convert_gigapath.convert_gigapath_checkpoint`).

The folder loads with ``SlideEncoderModel.from_pretrained(DIR)`` or ``AutoModel.from_pretrained(DIR)`` after
``import wsi_clip`` (or with ``trust_remote_code=True`` without the package); the output can also be chosen at
load time: ``from_pretrained(DIR, pooling="cls", embedding_layer="final")``.
"""

from __future__ import annotations

from ..arguments import ConvertArguments
from ..cli import exit_status, parse_command_line, setup_logging

COMMAND = "wsi-convert-gigapath"


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_command_line(ConvertArguments, argv, COMMAND)
    setup_logging()
    from wsi_clip.convert_gigapath import convert_gigapath_checkpoint, describe_longnet_config, find_longnet_config

    model = convert_gigapath_checkpoint(
        args.checkpoint,
        args.output_dir,
        max_wsi_size=args.max_wsi_size,
        tile_size=args.tile_size,
        pooling=args.pooling,
        embedding_layer=args.embedding_layer,
        num_attention_heads=args.num_attention_heads,
        slide_ngrids=args.slide_ngrids,
    )
    cfg = model.config
    upstream = describe_longnet_config(
        find_longnet_config(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    )
    print(
        f"converted {args.checkpoint} -> {args.output_dir}: {upstream}, {cfg.num_hidden_layers} layers, width "
        f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}, input {cfg.input_dim}, "
        f"segment_length {cfg.segment_length}, dilated_ratio {cfg.dilated_ratio}, pooling {cfg.pooling!r}, "
        f"embedding_layer {cfg.embedding_layer!r}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )


def cli() -> int:
    """The ``wsi-convert-gigapath`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
