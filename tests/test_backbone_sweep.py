"""The keras-hub sweep (BUILD.md, "Which backbones work"): every `keras_hub.models` backbone,
built from a small config with random weights (`keras_hub_zoo`), masks every kernel and
embedding table (§3), trains with `pb.train` (head and masks change; a decoder language model
classifies a sequence from its hidden states pooled over `padding_mask`), bakes exactly,
reloads its task file exactly in a fresh process and leaves the backbone bit-identical; or is
refused in one line. Then its task exports as a SavedModel and as a `.tflite` file, each run
(`tf.saved_model.load`, LiteRT's `Interpreter`) and compared with the Keras task, or the export
is refused in one line (the TFLite converter has no builtin kernel for an op). A few families
run by default, the rest are `slow`. With `TF_PIGGYBACK_SWEEP=path` each test appends its row
(JSON) to `path`: `scripts/backbone_table.py` writes BUILD.md's table from them.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_hub_zoo as zoo
import tf_piggyback as pb
from conftest import random_masks, tflite_ops
from test_keras_hub import in_fresh_process
from tf_piggyback.core.surgery import feature_model, head_name, iter_layers, kernel_weights, masked_layers
from tf_piggyback.devices.tflite import export_tflite
from tf_piggyback.serving.saved_model import export_saved_model

# One of each kind, fast to build: a decoder language model, an encoder and a ViT-like (CNNs:
# test_keras_hub.py's ResNet).
FAST = {"Qwen3Backbone", "DistilBertBackbone", "DINOV2Backbone"}
# Exports take 5 s more each: one family by default (test_keras_hub.py exports ViT, BERT, ResNet).
FAST_EXPORTS = {"DistilBertBackbone"}


def _param(name, fast=FAST):
    return pytest.param(name, marks=[] if name in fast else [pytest.mark.slow])


def record(name, status, checked=(), note=""):
    """Appends this class's row to `$TF_PIGGYBACK_SWEEP`, when set."""
    path = os.environ.get("TF_PIGGYBACK_SWEEP")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"class": name, "status": status, "checked": list(checked), "note": note}) + "\n")


def one_line(name, error):
    message = str(error)
    assert "\n" not in message.strip(), f"{name}: a refusal must be one line: {message!r}"
    return message


def refused(name, error, checked):
    record(name, "refused", checked, one_line(name, error))


def test_every_backbone_class_is_swept():
    assert len(zoo.names()) >= 80 and set(zoo.names()) == set(zoo.CONFIGS) | set(zoo.NOT_BUILT)


@pytest.mark.parametrize("name", [_param(name) for name in zoo.names()])
def test_backbone(name, tmp_path):
    if name not in zoo.CONFIGS:
        record(name, "not built", note=zoo.NOT_BUILT[name])
        pytest.skip(zoo.NOT_BUILT[name])
    backbone = zoo.build(name)
    before = [w.numpy().copy() for w in backbone.weights]
    options = zoo.OPTIONS.get(name, {})
    if name in zoo.CRASHES:  # known, not yet refused in one line: fails here once that changes
        with pytest.raises(ValueError, match="cannot mix tensors and non-tensors"):
            pb.piggyback(backbone, 3, **options)
        record(name, "crash", note=zoo.CRASHES[name])
        pytest.xfail(zoo.CRASHES[name])
    checked = []
    try:
        model = pb.piggyback(backbone, 3, **options)
    except ValueError as e:
        return refused(name, e, checked)
    features = feature_model(backbone, options.get("feature_layer"))
    kernels = {w.path for layer in iter_layers(features) for w in kernel_weights(layer)}
    masked = [k.path for layer in masked_layers(model) for k in layer.kernels]
    assert len(masked) == len(set(masked)) and set(masked) >= kernels
    assert set(masked) - kernels <= {w.path for w in features.weights if w.path.endswith("embeddings")}
    checked.append(f"masks {len(masked)} kernels")

    x, labels = zoo.inputs_for(backbone, 16), np.arange(16) % 3
    batches = tf.data.Dataset.from_tensor_slices((x, labels)).batch(8)
    head = [w.numpy().copy() for w in model.get_layer(head_name(model)).weights]
    masks = [m.numpy().copy() for layer in masked_layers(model) for m in layer.masks]
    pb.train(model, batches, pb.TrainConfig(epochs=1, mask_lr=1e-2, head_lr=1e-2), log=lambda line: None)
    assert not any(np.array_equal(v, w.numpy()) for v, w in zip(head, model.get_layer(head_name(model)).weights))
    assert not all(np.array_equal(v, m.numpy()) for v, m in zip(masks, (m for layer in masked_layers(model)
                                                                       for m in layer.masks)))
    checked.append("trains")

    random_masks(model, 1)
    x = zoo.inputs_for(backbone, 4, seed=1)
    expected = model(x).numpy()
    try:  # before the reload: a family whose own save and load is broken is refused here
        baked = pb.bake(model)
    except ValueError as e:
        return refused(name, e, checked)
    np.testing.assert_allclose(baked(x).numpy(), expected, atol=1e-4)
    checked.append("bakes")
    path = str(tmp_path / "task.npz")
    pb.save_task(model, path)
    np.testing.assert_array_equal(in_fresh_process(backbone, path, x, tmp_path), expected)
    checked.append("reloads in a fresh process")
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))
    checked.append("backbone unchanged")
    record(name, "works", checked)


@pytest.mark.parametrize("name", [_param(name, FAST_EXPORTS) for name in zoo.names()])
def test_backbone_exports(name, tmp_path):
    """A task with random masks exports as a SavedModel and as a `.tflite` file (one task: its
    masks baked), each giving the Keras task's logits within 1e-4; or the export is refused in one
    line. Rows of status `exports`, which `backbone_table.py` adds to the class's row."""
    if name not in zoo.CONFIGS:
        pytest.skip(zoo.NOT_BUILT[name])
    backbone = zoo.build(name)
    try:  # test_backbone records why
        model = random_masks(pb.piggyback(backbone, 3, **zoo.OPTIONS.get(name, {})), 1)
        pb.bake(model)
    except ValueError:
        pytest.skip("refused before export: see test_backbone")
    task = str(tmp_path / "task.npz")
    pb.save_task(model, task)
    x = zoo.inputs_for(backbone, 4, seed=2)
    feeds = x if isinstance(x, dict) else {"image": x}
    expected = model(x).numpy()
    checked, notes = [], []
    try:
        loaded = tf.saved_model.load(export_saved_model(backbone, [task], str(tmp_path / "saved")))
    except ValueError as e:
        notes.append(f"SavedModel: {one_line(name, e)}")
    else:
        served = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in feeds.items()})
        np.testing.assert_allclose(served["logits"].numpy(), expected, atol=1e-4)
        checked.append("SavedModel")
    try:
        export_tflite(backbone, [task], str(tmp_path / "task.tflite"))
    except ValueError as e:
        notes.append(f"TFLite: {one_line(name, e)}")
    else:
        from ai_edge_litert.interpreter import Interpreter

        assert not [op for op in tflite_ops(str(tmp_path / "task.tflite")) if op.startswith("Flex") or op == "CUSTOM"]
        runner = Interpreter(model_path=str(tmp_path / "task.tflite")).get_signature_runner("serving_default")
        np.testing.assert_allclose(runner(**feeds)["logits"], expected, atol=1e-4)
        checked.append("TFLite")
    record(name, "exports", checked, "; ".join(notes))
