"""On-device learning (§7): the trainable LiteRT model, driven as an app would drive it."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_piggyback as pb
from conftest import REPO, tflite_ops
from tf_piggyback.data.datasets import to_arrays
from tf_piggyback.devices.ondevice import LiteRTTrainer

EPOCHS = 5


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, *args[0].split("/")), *args[1:]], cwd=REPO,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("ondevice"))
    result = run_cli("export/ondevice.py", "--backbone=digits", "--num_classes=5", "--batch_size=32",
                     f"--output={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(model_dir, "model.tflite"), "rb") as f:
        flatbuffer = f.read()
    result = run_cli("scripts/train_on_device.py", f"--model={model_dir}", "--backbone=digits",
                     "--dataset=digits:upper", f"--epochs={EPOCHS}")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, flatbuffer, result.stdout


def test_builtins_only(trained):
    model_dir, flatbuffer, _ = trained
    ops = tflite_ops(os.path.join(model_dir, "model.tflite"))  # Flex ops are custom ops
    assert "CONV_2D" in ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    trainer = LiteRTTrainer(model_dir)
    assert set(trainer.interpreter.get_signature_list()) == {"train", "infer", "export_task", "reset"}


def test_learns_like_tensorflow_and_writes_an_ordinary_task_file(trained):
    model_dir, _, stdout = trained
    accuracy = float(stdout.strip().splitlines()[-2].split("test accuracy ")[1].split()[0])
    splits = pb.load_dataset("digits:upper")
    keras.utils.set_random_seed(0)
    reference = pb.piggyback(pb.digits_backbone(), 5)
    pb.train(reference, pb.training.trainer.epoch_batches(splits.train, 32),
             pb.TrainConfig(epochs=EPOCHS, mask_lr=1e-4, head_lr=1e-3, lr_decay_epochs=EPOCHS), log=lambda line: None)
    assert accuracy >= pb.evaluate(reference, splits.test) - 0.05 and accuracy > 0.5, stdout
    # the task file it wrote, in TensorFlow, predicts what the device predicts
    model = pb.load_task(os.path.join(model_dir, "task.npz"), pb.digits_backbone())
    x = to_arrays(splits.test)[0]
    untrained = LiteRTTrainer(model_dir)  # a fresh interpreter starts from the exported state
    assert not np.allclose(untrained.logits(x), model(x).numpy(), atol=1e-3)
    trainer = LiteRTTrainer(model_dir)
    images, labels = to_arrays(splits.train)
    for i in range(3):
        trainer.train_step(images[32 * i:32 * (i + 1)], labels[32 * i:32 * (i + 1)])
    path = os.path.join(model_dir, "again.npz")
    trainer.save_task(pb.digits_backbone(), path)
    np.testing.assert_allclose(trainer.logits(x), pb.load_task(path, pb.digits_backbone())(x).numpy(), atol=1e-4)
    assert pb.read_manifest(os.path.join(model_dir, "task.npz"))["sparsity"] > 0  # masks were learned
    # ... and what training changed is only masks, head and optimizer state: after reset() the
    # outputs are the untrained model's again, so the backbone's weights are as exported
    trainer.interpreter.get_signature_runner("reset")()
    np.testing.assert_allclose(trainer.logits(x), untrained.logits(x), atol=1e-6)


def test_bad_batches_are_clear_errors(trained):
    model_dir, _, _ = trained
    trainer = LiteRTTrainer(model_dir)
    good = np.zeros((32, 32, 32, 1), np.float32)
    with pytest.raises(ValueError, match=r"images have shape \(28, 28, 1\); this model takes batches of \(32, 32, 1\)"):
        trainer.train_step(np.zeros((32, 28, 28, 1)), np.zeros(32))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\); got 0..7"):
        trainer.train_step(good, np.arange(32) % 8)
    with pytest.raises(ValueError, match="this model trains on exactly 32"):
        trainer.train_step(good[:10], np.zeros(10))
    result = run_cli("scripts/train_on_device.py", f"--model={model_dir}", "--backbone=digits",
                     "--dataset=digits:inverted")
    assert result.returncode == 2 and "digits:inverted has 10 classes; the on-device model was exported for 5" \
        in result.stderr.strip().splitlines()[-1]
    result = run_cli("scripts/train_on_device.py", f"--model={model_dir}/missing", "--backbone=digits",
                     "--dataset=digits:upper")
    assert result.returncode == 2 and "holds no model.tflite" in result.stderr.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="load it with the backbone, weights and preprocessing it was trained on"):
        trainer.save_task(pb.digits_backbone(weights=None), os.path.join(model_dir, "x.npz"))


def test_builtin_gradients_equal_tensorflows():
    """The ReLU, max-pooling and kernel gradients written with builtins give TensorFlow's gradients."""
    import tensorflow as tf

    from tf_piggyback.devices.ondevice import build_ondevice_module

    module, model = build_ondevice_module(pb.digits_backbone(), 5, 8)
    splits = pb.load_dataset("digits:upper")
    x, labels = to_arrays(splits.train.take(8))
    y = tf.one_hot(labels, 5)

    def loss(logits):
        return -tf.reduce_mean(tf.reduce_sum(y * tf.nn.log_softmax(logits), -1))

    @tf.function
    def ours():
        with tf.GradientTape() as tape:
            current = [tf.identity(v) for v in module.weights_]
            tape.watch(current)
            value = loss(module._forward(x, current))
        return tape.gradient(value, current)

    with tf.GradientTape() as tape:
        value = loss(model(x, training=False))
    reference = tape.gradient(value, [v.value for v in module._trainable_keras])
    for got, expected in zip(ours(), reference):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)
