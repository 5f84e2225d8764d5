"""The `fastbert` command: parses arguments and hands each subcommand to its module."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import runtime

# subcommand -> (module, one-line help); each module defines add_arguments(parser) and main(args) -> int
COMMANDS = {
    "pretrain": ("fastbert.pretrain", "pretrain BERT (masked LM + next-sentence prediction) on a corpus"),
    "finetune": ("fastbert.finetune", "fine-tune a checkpoint on a labelled task"),
    "encode": ("fastbert.encode", "sentence embeddings for lines of text"),
    "bench": ("fastbert.bench", "model-level benchmark: fastbert vs transformers in one process"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="BERT with fused Triton kernels")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    # Build only the parser of the subcommand asked for, so one module's import cost (or a
    # missing optional dependency) does not tax the others.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        if argv[0] != "bench":  # bench decides for itself (--tuned-malloc), for all its competitors alike
            runtime.tune_cpu_allocator()
        module = importlib.import_module(COMMANDS[argv[0]][0])
        parser = argparse.ArgumentParser(prog=f"fastbert {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(parser)
        return int(module.main(parser.parse_args(argv[1:])) or 0)
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
