"""The ``st-bitembed`` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from st_bitembed.quantization.convert import NORM_PLACEMENTS


def _convert(args: argparse.Namespace) -> None:
    from transformers.integrations.bitnet import AutoBitLinear

    from st_bitembed import BitEmbed

    model = BitEmbed.from_backbone(args.base, norm=args.norm, pooling=args.pooling, eos_token=args.eos_token)
    model.save(args.output_dir)
    layers = sum(1 for module in model[0].auto_model.modules() if isinstance(module, AutoBitLinear))
    print(f"Converted {args.base} ({layers} BitLinear layers, norm={args.norm}) -> {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-bitembed", description="BitNet text-embedding models.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a Hugging Face backbone into an (untrained) BitEmbed model")
    convert.add_argument("base", help="Hub id or local directory of a transformers or sentence-transformers model")
    convert.add_argument("output_dir", help="where to save the converted sentence-transformers model")
    convert.add_argument("--norm", choices=NORM_PLACEMENTS, default="all", help="where to insert RMSNorms")
    convert.add_argument(
        "--pooling",
        choices=("lasttoken", "mean", "cls"),
        default=None,
        help="pooling for a plain transformers backbone (default: lasttoken for decoders)",
    )
    convert.add_argument("--eos-token", default=None, help="token appended to every text for last-token pooling")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        print(f"st-bitembed {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
