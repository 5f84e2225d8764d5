"""pytest-benchmark view of the CPU training step (run: pytest benchmarks/ --benchmark-enable).

Not part of the default test command (testpaths = tests/): timings are benchmarks, not tests.
"""
import pytest

from fastbert import bench

pytest.importorskip("transformers")


@pytest.mark.parametrize("case", ["pretrain", "finetune"])
@pytest.mark.parametrize("impl", ["fastbert", "transformers-sdpa"])
def test_training_step_cpu(benchmark, case, impl):
    batch = 16 if case == "pretrain" else 32
    models, _ = bench.build_models(case, "cpu-small", 30522, 128, "cpu", [impl])
    model, _ = models[impl]
    batches = bench.make_batches(case, 1, batch, 128, 30522, 0, "cpu")
    kw = batches[0][0]

    def step():
        loss = model(**kw).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert loss.isfinite()
