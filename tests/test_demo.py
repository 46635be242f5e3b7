"""The demo end to end, as `make demo` runs it, and the CLIs' error handling."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", args[0]), *args[1:]],
                          capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    result = run_script("demo.py", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_demo_shows_piggyback_well_above_classifier_only(demo):
    out, stdout = demo
    accuracy = {}
    for task in ("upper", "inverted"):
        for method in ("piggyback", "classifier", "finetune"):
            with open(os.path.join(out, task, method, "metrics.json")) as f:
                metrics = json.load(f)
            accuracy[task, method] = metrics["accuracy"]
            assert metrics["top1_error"] == pytest.approx(1 - metrics["accuracy"])
            assert metrics["task_bytes"] == os.path.getsize(
                os.path.join(out, task, method, "model.keras" if method == "finetune" else "task.npz"))
        assert accuracy[task, "piggyback"] >= accuracy[task, "classifier"] + 0.10, accuracy
        assert accuracy[task, "finetune"] >= accuracy[task, "classifier"] + 0.10, accuracy
    assert "| upper | piggyback |" in stdout


def test_demo_writes_report_plot_and_reloadable_tasks(demo):
    out, _ = demo
    report = open(os.path.join(out, "report.md")).read()
    assert "| inverted | classifier |" in report and "exactly the same accuracy" in report
    with open(os.path.join(out, "sparsity.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| SavedModel `serving/digits_tasks/1` |" in report and "upper 100.00%, inverted 100.00%" in report
    assert os.path.exists(os.path.join(out, "serving", "upper", "1", "saved_model.pb"))
    for name in ("digits_tasks.tflite", "upper_int8.tflite"):
        assert os.path.getsize(os.path.join(out, "tflite", name)) > 100_000
    task = os.path.join(out, "upper", "piggyback", "task.npz")
    result = run_script("evaluate.py", "--backbone=digits", f"--task={task}", "--dataset=digits:upper")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "upper", "piggyback", "metrics.json")) as f:
        assert json.loads(result.stdout.splitlines()[-1])["accuracy"] == json.load(f)["accuracy"]
    # a piggyback task stores its masks at about 1 bit per parameter or less, far below finetuning
    assert os.path.getsize(task) * 10 < os.path.getsize(os.path.join(out, "upper", "finetune", "model.keras"))


@pytest.mark.parametrize("args,message", [
    (["--task=/nonexistent/task.npz", "--dataset=digits:upper"], "does not exist"),
    (["--task=README.md", "--dataset=digits:upper"], "not a readable tf_piggyback task file"),
    (["--task=README.md", "--dataset=digits:upper", "--backbone=NoSuchNet"], "unknown backbone 'NoSuchNet'"),
])
def test_cli_user_errors_are_one_line(args, message):
    if not any(a.startswith("--backbone") for a in args):
        args = ["--backbone=digits", *args]
    result = run_script("evaluate.py", *args)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr
