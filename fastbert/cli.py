"""The `fastbert` command: parses arguments and hands each subcommand to its module."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from . import runtime

# subcommand -> (module, one-line help); each module defines add_arguments(parser) and main(args) -> int
COMMANDS = {
    "pretrain": ("fastbert.pretrain", "pretrain BERT (masked LM + next-sentence prediction) on a corpus"),
    "finetune": ("fastbert.finetune", "fine-tune a checkpoint on a labelled task"),
    "predict": ("fastbert.predict", "apply a fine-tuned model to a file of its task"),
    "encode": ("fastbert.encode", "sentence embeddings for lines of text"),
    "bench": ("fastbert.bench", "model-level benchmark: fastbert vs transformers in one process"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="BERT with fused Triton kernels")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def _version() -> str:
    """fastbert's version and what it runs on: the first thing a bug report needs."""
    import platform

    import torch

    from . import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return (f"fastbert {__version__} (torch {torch.__version__}, {cuda}; triton {triton_version}; "
            f"Python {platform.python_version()})")


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
        args = parser.parse_args(argv[1:])
        # a library warning reads as the command's own line, not as a source path plus the line that warned
        saved = warnings.formatwarning
        warnings.formatwarning = lambda message, *_a, **_k: f"fastbert {argv[0]}: warning: {message}\n"
        try:
            return int(module.main(args) or 0)
        finally:
            warnings.formatwarning = saved
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
