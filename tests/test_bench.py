"""scripts/bench.py's measurements run end to end (tiny sizes; no timing is asserted)."""

from tf_piggyback import bench


def test_bench_runs_every_figure():
    config = bench.BenchConfig(model="digits", batch_size=4, repeats=1, warmup=1)
    rows = bench.run(config, log=lambda line: None)
    figures = [row["figure"] for row in rows]
    assert len(figures) == 11 and figures[0] == "train step, piggyback / finetune"
    for row in rows:
        assert row["median"] > 0 and (row["ratio"] is None or row["ratio"] > 0), row
    assert "| switching task" in bench.markdown(rows)
