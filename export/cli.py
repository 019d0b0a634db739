"""The export stage's subcommand: `pod export`. `register` only declares flags; torch and ONNX load when the
export runs."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> None:
    from export.export import export_bundle

    export_bundle(
        args.checkpoint,
        args.out,
        data=args.data,
        quantize=args.quantize,
        dtype=args.dtype,
        opset=args.opset,
        force=args.force,
        min_overlap=args.min_overlap,
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `export` to the `pod` command's subparsers."""
    ex = sub.add_parser(
        "export",
        help="freeze a checkpoint into an ONNX bundle, with parity checks",
        description="Freeze a checkpoint into an ONNX bundle (everything a server needs), checking its parity "
        "with PyTorch before writing it.",
    )
    ex.add_argument("--checkpoint", required=True, help="a checkpoint directory or a training run directory")
    ex.add_argument("--out", required=True, help="the bundle directory to write")
    ex.add_argument("--data", help="prepared data the model was trained on (default: from the checkpoint)")
    ex.add_argument("--quantize", default="none", choices=["none", "int8"], help="weight quantization")
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="floating-point type of the graphs")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset")
    ex.add_argument(
        "--min-overlap",
        type=float,
        default=0.9,
        help="int8/fp16: least top-10 overlap with fp32 before the export refuses",
    )
    ex.add_argument("--force", action="store_true", help="write the bundle even under --min-overlap")
    ex.set_defaults(func=_export)
