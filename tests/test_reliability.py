"""Issue 7: faults lose nothing, unwritable outputs are one-line errors, tasks never change."""

import hashlib
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_piggyback as pb
from conftest import REPO

# Saves a task, then dies by SIGKILL while saving a changed one: in the middle of writing the
# file's bytes ("mid-write") or after writing them, before the rename ("before-rename").
DYING_SAVE = """
import os, signal, sys
import tf_piggyback as pb
from tf_piggyback.core import taskfile

path, mode = sys.argv[1], sys.argv[2]
model = pb.piggyback(pb.digits_backbone(), 5)
pb.save_task(model, path)
pb.masked_layers(model)[0].masks[0].assign(-pb.masked_layers(model)[0].masks[0])
real_write_atomic, real_replace = taskfile.write_atomic, os.replace


class DiesMidWrite:
    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        self.written += len(data)
        if self.written > 4096:
            self.f.write(bytes(data)[:100])
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def dies_before_rename(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)


if mode == "mid-write":
    taskfile.write_atomic = lambda p, write: real_write_atomic(p, lambda f: write(DiesMidWrite(f)))
else:
    os.replace = dies_before_rename
pb.save_task(model, path)
"""


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_killed_while_saving_a_task_file_keeps_the_previous_one(tmp_path, mode):
    path = tmp_path / "task.npz"
    died = subprocess.run([sys.executable, "-c", DYING_SAVE, str(path), mode], cwd=REPO, capture_output=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    leftovers = [name for name in os.listdir(tmp_path) if name != "task.npz"]
    assert leftovers and all(name.startswith(".task.npz.") for name in leftovers)  # it died writing
    model = pb.load_task(str(path), pb.digits_backbone())  # the first save, whole and checked
    assert pb.masked_layers(model)[0].thresholded_masks()[0].all()


def run_cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, *script.split("/")), *args], cwd=REPO,
                          capture_output=True, text=True)


def test_unwritable_outputs_are_one_line_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    cases = [
        ("scripts/train.py", "--backbone=digits", "--dataset=digits:upper", "--epochs=1",
         f"--model_dir={blocker}/run"),
        ("export/saved_model.py", "--backbone=digits", f"--task={tmp_path}/missing.npz", f"--output={blocker}/m"),
    ]
    messages = []
    for script, *args in cases:
        result = run_cli(script, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and lines and lines[-1].startswith("error: "), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        messages.append(lines[-1])
    assert messages[0].endswith(f": {blocker}/run; check the path and its permissions"), messages[0]
    assert "missing.npz" in messages[1] and "does not exist" in messages[1]
    with pytest.raises(OSError):
        pb.save_task(pb.piggyback(pb.digits_backbone(), 5), str(blocker / "task.npz"))
    assert blocker.read_text() == "a file where a folder should be"


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_adding_five_tasks_never_changes_earlier_ones(tmp_path):
    """§1: tasks learned one after another on one backbone leave every earlier task's predictions,
    task file bytes and the backbone's weights exactly as they were."""
    backbone = pb.digits_backbone()
    before = [w.copy() for w in backbone.get_weights()]
    probe = next(iter(pb.load_dataset("digits:all").test.batch(64)))[0]
    specs = ["digits:upper", "digits:inverted", "digits:all", "digits:base", "digits:upper"]

    def learn(k, path):
        splits = pb.load_dataset(specs[k])
        keras.utils.set_random_seed(k)
        model = pb.piggyback(backbone, len(splits.class_names), train_bn=k % 2 == 1)
        config = pb.TrainConfig(epochs=1, mask_lr=1e-3, head_lr=1e-3, seed=k)
        pb.train(model, pb.training.trainer.epoch_batches(splits.train.take(256), 32, seed=k), config, log=lambda line: None)
        pb.save_task(model, path)
        return model

    tasks = []  # (path, file sha, predictions right after training)
    for k in range(len(specs)):
        path = str(tmp_path / f"task{k}" / "task.npz")
        model = learn(k, path)
        tasks.append((path, _sha(path), model(probe, training=False).numpy()))
        for j, (earlier, sha, predictions) in enumerate(tasks):
            assert _sha(earlier) == sha
            reloaded = pb.load_task(earlier, backbone)
            np.testing.assert_array_equal(reloaded(probe, training=False).numpy(), predictions)
            resaved = str(tmp_path / f"resaved{k}_{j}.npz")
            pb.save_task(reloaded, resaved)
            assert _sha(resaved) == sha  # the same task, the same bytes
        for w, w0 in zip(backbone.get_weights(), before):
            np.testing.assert_array_equal(w, w0)
    assert len({sha for _, sha, _ in tasks}) == 5
    # order does not matter: the first task learned again after the other four is the same file
    learn(0, str(tmp_path / "again.npz"))
    assert _sha(str(tmp_path / "again.npz")) == tasks[0][1]
