"""Transformer backbones: masks on EinsumDense and MultiHeadAttention, per-task LayerNormalization."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO, random_masks, tflite_ops
from tf_piggyback.core.layers import MaskedLayer
from tf_piggyback.core.surgery import masked_layers
from tf_piggyback.data.datasets import to_arrays
from tf_piggyback.devices.tflite import export_tflite
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.training.backbones import digits_vit_backbone

ATTENTION_KERNELS = ["query/kernel", "key/kernel", "value/kernel", "attention_output/kernel"]


def script(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, *args[0].split("/")), *args[1:]],
                          capture_output=True, text=True, cwd=REPO)


def test_surgery_masks_attention_and_mlp_and_owns_layer_norms():
    model = pb.piggyback(digits_vit_backbone(), 5, train_bn=True)
    wrappers = {layer.name: layer for layer in masked_layers(model)}
    assert list(wrappers) == ["patches", "block1_attention", "block1_mlp1", "block1_mlp2",
                              "block2_attention", "block2_mlp1", "block2_mlp2"]
    assert isinstance(wrappers["block1_attention"], MaskedLayer)
    assert wrappers["block1_attention"].kernel_names == ATTENTION_KERNELS
    assert set(model.task_spec.owned) == {"block1_ln1", "block1_ln2", "block2_ln1", "block2_ln2", "final_ln", "head"}
    # with every mask 1 the task model is the backbone (plus the head): nothing re-implemented differs
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    features = keras.Model(model.input, model.get_layer("head_pool").output)(x)
    np.testing.assert_allclose(features, np.mean(digits_vit_backbone()(x), axis=1), atol=1e-5)


def test_attention_keeps_its_call_arguments():
    """Masks, causal masking and dropout of the wrapped MultiHeadAttention still apply."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 8), name="tokens")
    outputs = keras.layers.MultiHeadAttention(2, 4, dropout=0.5, name="attention")(inputs, inputs, use_causal_mask=True)
    backbone = keras.Model(inputs, outputs, name="causal")
    masked = pb.piggyback(backbone, 3).get_layer("attention")
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32"))
    np.testing.assert_allclose(masked(x, x, use_causal_mask=True), backbone.get_layer("attention")(
        x, x, use_causal_mask=True), atol=1e-6)
    changed = x.numpy().copy()
    changed[:, -1] += 1.0  # a later token cannot change an earlier one's output under the causal mask
    out, out_changed = masked(x, x, use_causal_mask=True), masked(changed, changed, use_causal_mask=True)
    np.testing.assert_allclose(out[:, :-1], out_changed[:, :-1], atol=1e-6)
    # dropout draws new noise on every training call: the seed state's update goes through
    first, second = masked(x, x, training=True), masked(x, x, training=True)
    assert not np.allclose(first, second)


def test_training_round_trip_exports_and_an_unchanged_backbone(tmp_path):
    backbone = digits_vit_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    splits = pb.load_dataset("digits:upper")
    model = pb.piggyback(backbone, 5, train_bn=True)
    history = pb.train(model, pb.training.trainer.epoch_batches(splits.train.take(256), 32),
                       pb.TrainConfig(epochs=2, mask_lr=1e-3, head_lr=1e-3), log=lambda line: None)
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, backbone.weights))
    assert any(np.any(m == 0) for layer in masked_layers(model) for m in layer.thresholded_masks())
    a = str(tmp_path / "a" / "task.npz")
    pb.save_task(model, a)
    b = str(tmp_path / "b" / "task.npz")
    pb.save_task(random_masks(pb.piggyback(backbone, 3), seed=1), b)
    assert [e["name"] for e in pb.read_manifest(a)["layers"]][1:5] == [
        f"block1_attention/{k}" for k in ATTENTION_KERNELS]

    x = to_arrays(splits.test)[0][:32]
    expected = {name: pb.load_task(path, digits_vit_backbone())(x).numpy() for name, path in (("a", a), ("b", b))}
    np.testing.assert_allclose(expected["a"], model(x).numpy(), atol=1e-5)
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), expected["a"], atol=1e-5)
    served = tf.saved_model.load(export_saved_model(backbone, [f"a={a}", f"b={b}"], str(tmp_path / "served"), slots=1))
    for name in ("a", "b", "a"):
        np.testing.assert_allclose(served.signatures[name](image=tf.constant(x))["logits"].numpy(), expected[name],
                                   atol=1e-4)

    from ai_edge_litert.interpreter import Interpreter

    path = str(tmp_path / "tasks.tflite")
    export_tflite(backbone, [f"a={a}", f"b={b}"], path)
    ops = tflite_ops(path)
    assert "BATCH_MATMUL" in ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    interpreter = Interpreter(model_path=path)
    for name in ("a", "b"):
        np.testing.assert_allclose(interpreter.get_signature_runner(name)(image=x)["logits"], expected[name],
                                   atol=1e-4)


def test_cli_trains_and_evaluates_a_vit_task(tmp_path):
    run = str(tmp_path / "run")
    result = script("scripts/train.py", "--backbone=digits_vit", "--dataset=digits:upper", f"--model_dir={run}",
                    "--epochs=2", "--head_lr=1e-3", "--train_bn", "--verbose=0")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = pb.read_manifest(os.path.join(run, "task.npz"))
    assert manifest["backbone"]["name"] == "digits_vit" and len(manifest["layers"]) == 1 + 2 * (4 + 2)
    evaluate = script("scripts/evaluate.py", "--backbone=digits_vit", f"--task={run}/task.npz",
                      "--dataset=digits:upper")
    with open(os.path.join(run, "metrics.json")) as f:
        assert json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] == json.load(f)["accuracy"]
    # the CNN's task files are refused on the ViT, naming both
    wrong = script("scripts/evaluate.py", "--backbone=digits", f"--task={run}/task.npz", "--dataset=digits:upper")
    assert wrong.returncode == 2 and "digits_vit" in wrong.stderr


@pytest.mark.parametrize("weights", ["pretrained", None])
def test_digits_vit_is_the_same_in_every_process(weights):
    code = ("import tf_piggyback as pb; from tf_piggyback.training.backbones import digits_vit_backbone; "
            f"print(pb.fingerprint(digits_vit_backbone({weights!r})))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert other.stdout.strip().splitlines()[-1] == pb.fingerprint(digits_vit_backbone(weights))
