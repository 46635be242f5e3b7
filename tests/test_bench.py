"""scripts/bench.py's measurements run end to end (tiny sizes; no timing is asserted)."""

import pytest

from benchmarks import suite as bench


def test_bench_runs_every_figure():
    config = bench.BenchConfig(model="digits", batch_size=4, repeats=1, warmup=1)
    rows = bench.run(config, log=lambda line: None)
    figures = [row["figure"] for row in rows]
    assert len(figures) == 11 and figures[0] == "train step, piggyback / finetune"
    for row in rows:
        assert row["median"] > 0 and (row["ratio"] is None or row["ratio"] > 0), row
    assert "| switching task" in bench.markdown(rows)


def test_train_preset_rows_and_profile():
    config = bench.BenchConfig(model="digits", batch_size=4, repeats=1, warmup=1, mask_from="conv3")
    rows = bench.run_train(config, log=lambda line: None)
    figures = [row["figure"] for row in rows]
    assert figures == ["train step, piggyback / floor (convolutions alone)", "train step, piggyback / finetune",
                       "train step, mask_from=conv3 / piggyback", "peak RAM while training, mask_from=conv3 / piggyback",
                       "profile of one piggyback step: self time by op type"]
    assert all(row["ratio"] > 0 for row in rows[:4])
    ops = {op["op"]: op["share"] for op in rows[-1]["ops"]}
    # the convolutions and their backward pass are where a step goes, even on this tiny network
    assert any(op.endswith("Conv2D") or "Conv2DBackprop" in op for op in ops), ops
    assert 0 < sum(ops.values()) <= 1.0 + 1e-9
    table = bench.markdown(rows)
    assert "| op | self time | share |" in table and "| train step, piggyback / floor" in table


def test_methods_preset_times_every_method():
    config = bench.BenchConfig(model="digits", batch_size=4, repeats=1, warmup=1)
    rows = bench.run_methods(config, log=lambda line: None)
    assert [row["figure"].split(", ")[-1] for row in rows] == [
        f"{m} / piggyback" for m in ("piggyback", "lora (r=1)", "lora (r=4)", "lora (r=8)", "classifier", "finetune")]
    assert rows[0]["ratio"] == 1.0 and all(row["median"] > 0 for row in rows)


@pytest.mark.parametrize("precisions", [("none",), pytest.param(("float16", "int8"), marks=pytest.mark.slow)])
def test_phone_preset_rows_in_every_precision(tmp_path, precisions):
    """`--preset=phone` at digits size: a row per precision, each against the first task's own
    file of it (no timing is asserted)."""
    from benchmarks import serving as bench_serving

    config = bench_serving.ServingConfig(model="digits", image_size=None, repeats=1, calls=1, workdir=str(tmp_path),
                                         tflite_tasks=2, phone_quantize=precisions)
    rows, table = bench_serving.run_phone(config, log=lambda line: None)
    assert [(r["tasks"], r["quantize"]) for r in rows] == [(2, p) for p in precisions]
    assert all(r["warm_ratio"] > 0 and r["switch_s"] > 0 and r["bytes"] > r["single_bytes"] for r in rows)
    assert all(f"| 2 | {dict(none='float32').get(p, p)} |" in table for p in precisions)
    if "int8" in precisions:
        assert rows[1]["single_bytes"] < rows[0]["single_bytes"]


@pytest.mark.slow
def test_many_tasks_preset_measures_every_count(tmp_path):
    """`--preset=many_tasks` at digits size: synthetic task files that load as task files, a row
    per count against the baked task, each version's tasks in its files (no timing is asserted)."""
    from benchmarks import many_tasks

    config = many_tasks.ManyTasksConfig(model="digits", image_size=None, tasks=(3,), samples=4, calls=2, compare=3,
                                        rounds=1, workdir=str(tmp_path))
    rows, table = many_tasks.run(config, log=lambda line: None)
    assert [r["tasks"] for r in rows] == [1, 3, 3, 3] and [r.get("form") for r in rows[2:]] == ["files", "variables"]
    assert "| variables |" in table
    assert rows[1]["cold_p99_s"] > 0 and rows[1]["next_version_s"] > 0 and rows[1]["bytes"] > rows[0]["bytes"]
    assert "| 1 (baked) |" in table and "| 3 |" in table
    assert not (tmp_path / "model_3").exists()  # measured, then deleted
