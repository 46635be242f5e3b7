"""Reports over model_dirs: Table 2 layout, storage, PackNet order labels, the Decathlon score."""

import json
import os
import subprocess
import sys

import pytest

import tf_piggyback as pb
from conftest import REPO
from tf_piggyback.training.report import (DECATHLON_BASELINE_ERRORS, backbone_bytes, collect, comparison,
                                          decathlon_score, write_csv)


def test_decathlon_score_by_hand_and_against_table_8():
    # E_max = 2 x 10 = 20: 1000 * (20 - 5)^2 / 20^2 = 562.5; an error above E_max scores 0.
    assert decathlon_score({"a": 5.0, "b": 100.0}, {"a": 10.0, "b": 40.0}) == pytest.approx(562.5)
    # the baseline itself scores 250 per task: Table 8's Finetune row, 2500
    assert decathlon_score(DECATHLON_BASELINE_ERRORS) == pytest.approx(2500)
    # Table 8's Piggyback row (top-1 accuracies) gives the paper's 2838 to within rounding
    accuracies = dict(zip(DECATHLON_BASELINE_ERRORS, [57.69, 65.29, 79.87, 96.99, 57.45, 97.27, 79.09, 87.63,
                                                      97.24, 47.48]))
    assert decathlon_score({t: 100 - a for t, a in accuracies.items()}) == pytest.approx(2838, abs=5)
    with pytest.raises(ValueError, match="no baseline error for task\\(s\\) mnist"):
        decathlon_score({"mnist": 1.0})


def fake_run(root, name, dataset, method, error, task_bytes, **extra):
    model_dir = os.path.join(root, name)
    os.makedirs(model_dir)
    config = {"backbone": "digits", "weights": "imagenet", "image_size": None, "dataset": dataset,
              "packnet_base": extra.pop("packnet_base", "")}
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    metrics = {"method": method, "accuracy": 1 - error, "top1_error": error, "sparsity": 0.1, "params": 100,
               "task_bytes": task_bytes, "config": config, **extra}
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return model_dir


def test_comparison_table_and_report_cli(tmp_path):
    root = str(tmp_path)
    dirs = [fake_run(root, "pu", "digits:upper", "piggyback", 0.05, 10_000),
            fake_run(root, "pi", "digits:inverted", "piggyback", 0.04, 14_000),
            fake_run(root, "fu", "digits:upper", "finetune", 0.02, 500_000),
            fake_run(root, "fi", "digits:inverted", "finetune", 0.03, 500_000)]
    first = fake_run(root, "p1", "digits:upper", "packnet", 0.06, 600_000, task_index=1)
    dirs += [first, fake_run(root, "p2", "digits:inverted", "packnet", 0.08, 610_000, task_index=2,
                             packnet_base=first)]
    for name in ("pu", "pi"):
        pb.save_task(pb.piggyback(pb.digits_backbone(), 5), os.path.join(root, name, "task.npz"))
    rows = collect(dirs)
    assert {row["method"] for row in rows} == {"piggyback", "finetune", "packnet (upper → inverted)"}
    table = comparison(rows, backbone_bytes=400_000)
    assert "| task | piggyback | finetune | packnet (upper → inverted) |" in table
    assert "| upper | 5.00 | 2.00 | 6.00 |" in table and "| inverted | 4.00 | 3.00 | 8.00 |" in table
    # piggyback: one backbone + two task files; finetune: two models; PackNet: its last pack
    assert f"| storage, all tasks | {424_000 / 2**20:.2f} MB (1.06x) | {1e6 / 2**20:.2f} MB (2.50x) | " \
           f"{610_000 / 2**20:.2f} MB (1.52x) |" in table
    assert "| # models | 1 | 2 | 1 |" in table
    out = tmp_path / "report"
    args = [sys.executable, os.path.join(REPO, "scripts", "report.py"), f"--output={out}"]
    result = subprocess.run(args + [f"--model_dir={d}" for d in dirs], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert comparison(rows, backbone_bytes(dirs[0])) in (out / "report.md").read_text()
    assert backbone_bytes(dirs[0]) == 4 * pb.digits_backbone().count_params()
    assert (out / "report.csv").read_text().count("\n") == 7 and (out / "sparsity.png").exists()
    result = subprocess.run(args + [f"--model_dir={tmp_path}/nothing"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "holds no metrics.json" in result.stderr.strip().splitlines()[-1]


def test_several_seeds_show_mean_and_std_and_top5_in_parentheses(tmp_path):
    """Runs of one task and method (seeds) are all reported: mean ± std over them, with their
    count, not one of them silently; top-5 errors stand in parentheses, as in Table 2."""
    root = str(tmp_path)
    dirs = [fake_run(root, f"s{seed}", "tfds:cars196", "piggyback", error, 10_000, top5_error=top5)
            for seed, (error, top5) in enumerate([(0.10, 0.02), (0.14, 0.04), (0.12, 0.03)])]
    table = comparison(collect(dirs), backbone_bytes=400_000)
    assert "| cars196 | 12.00 ± 2.00 (3.00 ± 1.00) [n=3] |" in table, table


def test_a_run_at_chance_is_marked_in_every_table(tmp_path):
    """Issue 33: a run whose metrics.json holds `warnings` (it trained at chance level) is marked in
    Table 2's layout, in the runs table and in the CSV, and named under each table: never shown as
    a clean result, alone or among seeds."""
    from tf_piggyback.training.report import AT_CHANCE, markdown_table

    root = str(tmp_path)
    warning = "epoch 2 trained at chance level: loss 2.3025 ..."
    dirs = [fake_run(root, "p", "digits:upper", "piggyback", 0.05, 10_000),
            fake_run(root, "f", "digits:upper", "finetune", 0.915, 500_000, warnings=[warning])]
    dirs += [fake_run(root, f"s{seed}", "digits:upper", "classifier", 0.2 + seed / 100, 4_000,
                      warnings=[warning] if seed == 1 else []) for seed in range(3)]
    rows = collect(dirs)
    table = comparison(rows, backbone_bytes=400_000)
    assert f"| upper | 5.00 | 91.50 {AT_CHANCE} | 21.00 ± 1.00 [n=3] {AT_CHANCE} (1 of 3) |" in table, table
    assert f"{AT_CHANCE}: 2 run(s) trained at chance level" in table and dirs[1] in table and dirs[3] in table
    runs = markdown_table(rows).splitlines()
    assert [AT_CHANCE in line for line in runs if line.startswith("| upper |")] == [False, True, False, True, False]
    write_csv(rows, str(tmp_path / "report.csv"))
    lines = (tmp_path / "report.csv").read_text().splitlines()
    assert lines[0].endswith(",warnings") and [warning in line for line in lines[1:]] == [False, True, False, True, False]
