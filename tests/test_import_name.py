"""From the repository root the kernels/ folder is importable as a plain `kernels` too, and
transformers imports that name when it probes for Hugging Face's `kernels` package. It must then be
fastbert.kernels itself: a second execution would define fastbert's torch.library ops again, which
replaces them and leaves the first copy's op handles dangling (the flaky "vector::reserve" /
"no schema registered" crashes of interpreted-kernel tests after transformers was imported)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import sys
import torch._library.custom_ops as co
{first}
import fastbert.kernels as K
libs = {{q: lib for q, lib in co.OPDEF_TO_LIB.items() if q.startswith("fastbert::")}}
assert len(libs) >= 14, sorted(libs)
import kernels
import transformers.activations  # probes for a `kernels` package
assert sys.modules["kernels"] is K and kernels is K
assert sys.modules["kernels.linear_cross_entropy"] is sys.modules["fastbert.kernels.linear_cross_entropy"]
assert all(co.OPDEF_TO_LIB[q] is lib for q, lib in libs.items()), "a fastbert op was defined again"
print("ok")
"""


@pytest.mark.parametrize("first", ["", "import kernels", "import transformers"])
def test_plain_kernels_import_is_fastbert_kernels(first):
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CHECK.format(first=first)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
