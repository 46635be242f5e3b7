"""PackNet, the order-dependent baseline of Table 2: ownership, pruning, packing, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tf_piggyback as pb
from conftest import REPO
from tf_piggyback.core.methods.packnet import FREE, PackNet, _kernels
from tf_piggyback.training.experiment import RunConfig, run
from tf_piggyback.training.trainer import epoch_batches, train


def fitter(pack, spec, epochs=1):
    splits = pb.load_dataset(spec)
    examples = splits.train.take(128)

    def fit(model, phase):
        config = pb.TrainConfig(method="packnet", epochs=epochs, seed=len(pack.tasks))
        train(model, epoch_batches(examples, 32), config, log=lambda line: None,
              gradient_masks=pack.gradient_masks())

    return fit, len(splits.class_names)


def owned(pack, owner):
    return sum(np.count_nonzero(o == owner) for o in pack.owners) / sum(o.size for o in pack.owners)


def test_tasks_own_what_pruning_leaves_and_never_change(tmp_path):
    backbone = pb.digits_backbone()
    pack = PackNet(backbone)  # §4: the backbone 50% pruned, each task's weights 75%
    assert owned(pack, FREE) == pytest.approx(0.5, abs=1e-3) and owned(pack, 0) == pytest.approx(0.5, abs=1e-3)
    # the backbone's largest weights are the ones kept
    kernel, owners = pack.kernels[0].numpy(), pack.owners[0]
    assert np.abs(kernel[owners == 0]).min() >= np.abs(_kernels(backbone)[0].numpy()[owners == FREE]).max() - 1e-7
    k1 = pack.add_task(*fitter(pack, "digits:upper"))
    assert k1 == 1
    assert owned(pack, 1) == pytest.approx(0.5 * 0.25, abs=1e-3) and owned(pack, FREE) == pytest.approx(0.375, 1e-3)
    probe = next(iter(pb.load_dataset("digits:all").test.batch(32)))[0]
    first = pack.task_model(k1)(probe).numpy()
    before = [(k.numpy().copy(), o >= 0) for k, o in zip(pack.kernels, pack.owners)]
    assert pack.add_task(*fitter(pack, "digits:inverted")) == 2
    # task 2 trained only the free weights: every weight owned before is untouched
    for kernel, (values, taken) in zip(pack.kernels, before):
        np.testing.assert_array_equal(kernel.numpy()[taken], values[taken])
    np.testing.assert_array_equal(pack.task_model(1)(probe).numpy(), first)
    assert owned(pack, 2) == pytest.approx(0.375 * 0.25, abs=1e-3)
    # a pack file round trip; the backbone itself never changed
    path = str(tmp_path / "packnet.npz")
    pack.save(path)
    again = PackNet.load(path, pb.digits_backbone())
    np.testing.assert_array_equal(again.task_model(1)(probe).numpy(), first)
    for w, w0 in zip(backbone.get_weights(), pb.digits_backbone().get_weights()):
        np.testing.assert_array_equal(w, w0)
    with pytest.raises(pb.TaskFileError, match="was trained on backbone .digits.*not on the given"):
        PackNet.load(path, pb.digits_backbone(weights=None))
    with pytest.raises(pb.TaskFileError, match="not a readable tf_piggyback packnet file"):
        PackNet.load(os.path.join(REPO, "README.md"), backbone)
    with pytest.raises(ValueError, match="prune must be a fraction strictly between 0 and 1"):
        PackNet(backbone, prune=1.0)
    with pytest.raises(ValueError, match="this pack has tasks 1..2"):
        pack.task_model(3)


def train_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"), "--backbone=digits",
                           "--method=packnet", "--epochs=1", "--verbose=0", *args],
                          cwd=REPO, capture_output=True, text=True)


def test_packnet_in_both_orders(tmp_path):
    """Each order grows one pack a task at a time (the first order from the CLI); the task added
    second gets fewer weights, which is why PackNet's results depend on task order."""
    share = {}
    for order in (("upper", "inverted"), ("inverted", "upper")):
        base = ""
        for task in order:
            model_dir = tmp_path / "_".join(order) / task
            if order[0] == "upper":
                result = train_cli(f"--dataset=digits:{task}", f"--model_dir={model_dir}", f"--packnet_base={base}")
                assert result.returncode == 0, result.stderr[-2000:]
            else:
                run(RunConfig(dataset=f"digits:{task}", packnet_base=base,
                              train=pb.TrainConfig(method="packnet", epochs=1)), str(model_dir), log=lambda line: None)
            base = str(model_dir)
        with open(os.path.join(base, "metrics.json")) as f:
            assert json.load(f)["task_index"] == 2
        pack = PackNet.load(os.path.join(base, "packnet.npz"), pb.digits_backbone())
        assert [t["num_classes"] for t in pack.tasks] == [5 if t == "upper" else 10 for t in order]
        share[order] = {task: owned(pack, i + 1) for i, task in enumerate(order)}
    assert share["upper", "inverted"]["upper"] > share["inverted", "upper"]["upper"]
    result = train_cli("--dataset=digits:upper", f"--model_dir={tmp_path}/x", f"--packnet_base={tmp_path}/none")
    assert result.returncode == 2 and "holds no packnet.npz" in result.stderr.strip().splitlines()[-1]
    result = train_cli("--dataset=digits:upper", f"--model_dir={tmp_path}/y", "--prune=1.5")
    assert result.returncode == 2 and "prune must be a fraction" in result.stderr.strip().splitlines()[-1]
