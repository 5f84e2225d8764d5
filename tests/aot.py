"""Ahead-of-time compilation of Triton kernels for real GPU targets, with no GPU present.

The interpreter accepts programs that a GPU compiler rejects (non-power-of-2 aranges, tl.dot on
dims < 16, too much shared memory, mismatched dot dtypes). Compiling every shipped configuration
for sm_90 and sm_80 catches those in CI. Pointers and strides are compiled as 16-divisible, as a
launch on torch tensors specialises them: that is what turns on vectorised loads and the cp.async
pipeline, and with it the shared memory a pipelined kernel really asks for. Compilation must happen in a process without
TRITON_INTERPRET, so ``compile_in_subprocess`` runs a small script in a clean child process.

Usage from a test:
    compile_in_subprocess("fastbert.kernels.gelu", "_bias_gelu_fwd",
                          [({"x_ptr": "*bf16", ..., "BLOCK": "constexpr"}, {"BLOCK": 1024}), ...])
A configuration may carry a third element, the compile options of its launch (e.g. {"num_warps": 8}):
the layout, hence what the compiler accepts, depends on them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ARCHS = (90, 80)

_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, kernel, configs, archs = json.loads(sys.stdin.read())
    fn = getattr(importlib.import_module(module), kernel)

    def launch_attrs(signature):
        # What a launch specialises on (Triton marks 16-byte-aligned pointers and multiples of 16):
        # torch's allocations are aligned and BERT's strides are multiples of 16. Without these the
        # compiler cannot vectorise the loads and skips the cp.async pipeline: a different kernel,
        # with a fraction of the shared memory the GPU's launch asks for.
        return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
                if ty.startswith("*") or (name.startswith("stride") and ty == "i32")}

    failures = []
    for config in configs:
        signature, constexprs, options = (list(config) + [None])[:3]
        for arch in archs:
            try:
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=launch_attrs(signature))
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                assert compiled.asm.get("cubin"), "no cubin produced"
                # what a launch may use (opt-in maximum per block): more fails only at launch, on a GPU
                limit = 232448 if arch == 90 else 166912
                assert compiled.metadata.shared <= limit, f"shared memory {compiled.metadata.shared} > {limit}"
            except Exception as exc:  # report every failing configuration, not just the first
                failures.append(f"sm_{arch} {constexprs} {options or ''} {signature}: "
                                f"{type(exc).__name__}: {str(exc)[:400]}")
    print(json.dumps(failures))
""")


def compile_in_subprocess(module: str, kernel: str, configs, archs=ARCHS, timeout=900):
    """Compile `module.kernel` for each (signature, constexprs[, options]) and arch; raise listing every failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([module, kernel, [list(c) for c in configs], list(archs)])
    # on stdin: one command-line argument may hold at most 128 KiB on Linux, less than a long list of configs
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=payload, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compile of {module}.{kernel} crashed:\n{proc.stderr[-3000:]}")
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
