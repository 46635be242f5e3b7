"""The LoRA baseline (`--method=lora`): adapters and a head in a task file, exported like any task."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO, composite_backbone
from tf_piggyback import lora
from tf_piggyback.data.datasets import to_arrays
from tf_piggyback.devices.tflite import export_tflite
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.training.backbones import digits_vit_backbone


def script(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, *args[0].split("/")), *args[1:]],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_trains_a_task_file_of_adapters_and_head_that_exports(tmp_path):
    run = str(tmp_path / "run")
    result = script("scripts/train.py", "--backbone=digits", "--dataset=digits:upper", f"--model_dir={run}",
                    "--method=lora", "--lora_rank=2", "--epochs=2", "--head_lr=1e-3", "--verbose=0")
    assert result.returncode == 0, result.stderr[-2000:]
    task = os.path.join(run, "task.npz")
    manifest = pb.read_manifest(task)
    assert manifest["method"] == "lora" and manifest["options"] == {"rank": 2, "feature_layer": None}
    names = [w["name"] for w in manifest["weights"]]
    assert names[:2] == ["conv1/lora_kernel_a", "conv1/lora_kernel_b"] and names[-2:] == ["head/kernel", "head/bias"]
    assert all(n.endswith(("lora_kernel_a", "lora_kernel_b")) or n.startswith("head/") for n in names), names
    assert not manifest["layers"] and os.path.getsize(task) < 40_000  # no kernels: the backbone is 530 KB
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    evaluate = script("scripts/evaluate.py", "--backbone=digits", f"--task={task}", "--dataset=digits:upper")
    assert json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] == metrics["accuracy"]
    wrong = script("scripts/evaluate.py", "--backbone=digits", "--weights=none", f"--task={task}",
                   "--dataset=digits:upper")
    assert wrong.returncode == 2 and "fingerprint" in wrong.stderr

    backbone = pb.digits_backbone()
    model = pb.load_task(task, backbone)
    x = to_arrays(pb.load_dataset("digits:upper").test)[0][:32]
    expected = model(x).numpy()
    baked = pb.bake(model)
    assert not any("lora" in w.path for w in baked.weights)
    np.testing.assert_allclose(baked(x).numpy(), expected, atol=1e-5)
    served = tf.saved_model.load(export_saved_model(backbone, [task], str(tmp_path / "served")))
    np.testing.assert_allclose(served.signatures["serving_default"](image=tf.constant(x))["logits"].numpy(), expected,
                               atol=1e-4)
    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, [task], str(tmp_path / "lora.tflite"))
    runner = Interpreter(model_path=str(tmp_path / "lora.tflite")).get_signature_runner("serving_default")
    np.testing.assert_allclose(runner(image=x)["logits"], expected, atol=1e-4)
    # a bank shares one backbone: a LoRA task's merged kernels are a copy of their own
    pig = str(tmp_path / "pig" / "task.npz")
    pb.save_task(pb.piggyback(backbone, 5), pig)
    refused = script("export/saved_model.py", "--backbone=digits", f"--task={task}", f"--task=pig={pig}",
                     f"--output={tmp_path}/multi")
    assert refused.returncode == 2 and "is a LoRA task" in refused.stderr and not os.path.exists(tmp_path / "multi")
    report = script("scripts/report.py", f"--model_dir={run}", f"--output={tmp_path}/report")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "lora (r=2)" in open(tmp_path / "report" / "report.md").read()


def test_adapters_train_and_nothing_else_changes():
    """On the ViT: attention projections, MLP and patch embedding get adapters; kernels,
    biases and LayerNormalization stay the backbone's, before and after training."""
    backbone = digits_vit_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    model = lora(backbone, 5, rank=1)
    trained = [w.path for w in model.trainable_variables]
    assert "block1_attention/query/lora_kernel_a" in trained and "block2_mlp2/lora_kernel_b" in trained
    assert all(p.endswith(("lora_kernel_a", "lora_kernel_b")) or p.startswith("head/") for p in trained), trained
    copy = {w.path: w.numpy().copy() for w in model.weights if "lora" not in w.path and not w.path.startswith("head/")}
    splits = pb.load_dataset("digits:upper")
    pb.train(model, pb.training.trainer.epoch_batches(splits.train.take(128), 32),
             pb.TrainConfig(method="lora", epochs=1, head_lr=1e-3), log=lambda line: None)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, backbone.weights))
    assert all(np.array_equal(copy[w.path], w.numpy()) for w in model.weights if w.path in copy)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1"):
        lora(backbone, 5, rank=0)


def test_adapters_reach_kernels_inside_a_users_own_layers():
    """A `Layer` subclass holding `Dense` layers (one level down and two, in a `Sequential`) gets an
    adapter on each; its LayerNormalization and kernels stay frozen; bake merges them."""
    backbone = composite_backbone()
    model = lora(backbone, 3, rank=2)
    adapted = sorted({w.path.rsplit("/", 1)[0] for w in model.trainable_variables if "lora_kernel" in w.path})
    assert adapted == ["block1/gate", "block1/mlp/fc1", "block1/mlp/fc2", "block2/gate", "block2/mlp/fc1",
                       "block2/mlp/fc2", "stem"]
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    frozen = {w.path: w.numpy().copy() for w in model.weights if "lora" not in w.path and "head" not in w.path}
    batches = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 3)).batch(8)
    pb.train(model, batches, pb.TrainConfig(method="lora", epochs=2, head_lr=1e-2), log=lambda line: None)
    assert all(np.array_equal(frozen[w.path], w.numpy()) for w in model.weights if w.path in frozen)
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), model(x).numpy(), atol=1e-5)


def test_a_layer_holding_kernels_lora_cannot_adapt_is_refused():
    """A composite whose only kernel is a transposed convolution's (no `enable_lora`): refused in one
    line (without the refusal such a task would train its head alone)."""
    inner = keras.layers.Conv2DTranspose(4, 3, name="up")

    class Up(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.up = inner

        def call(self, x):
            return self.up(x)

    inputs = keras.Input((4, 4, 3))
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(Up(name="up_block")(inputs)))
    with pytest.raises(ValueError, match=r"these hold kernels in no such layer: up_block \(Up\)\. Use piggyback"):
        lora(backbone, 3, rank=2)
