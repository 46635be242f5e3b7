"""`mask_from`: masks learned only from one layer on (§5.2, Fig. 3), honoured end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO
from tf_piggyback.core.surgery import masked_layers
from tf_piggyback.data.datasets import to_arrays
from tf_piggyback.devices.ondevice import LiteRTTrainer, export_ondevice
from tf_piggyback.devices.tflite import export_tflite
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.training.backbones import load_backbone
from tf_piggyback.training.trainer import TrainConfig, make_optimizers, make_train_step

BASE = ["--backbone=digits", "--dataset=digits:upper", "--head_lr=1e-3", "--verbose=0"]
UPSTREAM = ("rescale", "conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "pool2")  # before conv3


def script(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, *args[0].split("/")), *args[1:]],
                          capture_output=True, text=True, cwd=REPO)


def gradient_layers(model):
    """The layers a traced training step of `model` differentiates through, from its op names."""
    step = make_train_step(model, make_optimizers(model, TrainConfig(), 10), tf.distribute.get_strategy())
    graph = step.get_concrete_function(tf.TensorSpec([8, 32, 32, 1]), tf.TensorSpec([8], tf.int64)).graph
    names = [op.name.split("/") for op in graph.get_operations() if op.name.startswith("gradient_tape/")]
    return {parts[2].rsplit("_", 1)[0] for parts in names if len(parts) > 3}


def test_layers_before_mask_from_get_no_backward_pass():
    full = gradient_layers(pb.piggyback(pb.digits_backbone(), 5))
    assert {"conv1", "bn1", "conv3", "head"} <= full
    fast = gradient_layers(pb.piggyback(pb.digits_backbone(), 5, mask_from="conv3"))
    assert {"conv3", "bn3", "conv4", "fc", "head"} <= fast and not fast & set(UPSTREAM), fast


def test_resnet_mask_from_masks_stages_4_and_5_shortcut_included():
    backbone = load_backbone("ResNet50", "none", 32)
    model = pb.piggyback(backbone, 10, mask_from="conv4_block1_1_conv")
    names = [layer.name for layer in masked_layers(model)]
    assert len(names) == 29 and "conv4_block1_0_conv" in names  # the shortcut computes no input of it
    assert all(n.startswith(("conv4_", "conv5_")) for n in names), names
    assert model.get_layer("conv3_block4_3_conv") is backbone.get_layer("conv3_block4_3_conv")  # shared, frozen
    for name, message in (("nope", "mask_from 'nope' is not a layer of backbone 'resnet50'"),
                          ("conv4_block1_0_bn", "is a BatchNormalization, which has no kernel to mask")):
        with pytest.raises(ValueError, match=message):
            pb.piggyback(backbone, 10, mask_from=name)


def test_mask_from_end_to_end(tmp_path):
    """Trained from the CLI; the task file records it; reloaded in a fresh process, baked, exported
    as a SavedModel next to a task that masks every layer, and as a multi-task TFLite."""
    run = str(tmp_path / "run")
    result = script("scripts/train.py", *BASE, f"--model_dir={run}", "--epochs=2", "--mask_from=conv3")
    assert result.returncode == 0, result.stderr[-2000:]
    task = os.path.join(run, "task.npz")
    manifest = pb.read_manifest(task)
    assert manifest["options"]["mask_from"] == "conv3"
    assert [e["name"] for e in manifest["layers"]] == ["conv3/kernel", "conv4/kernel", "fc/kernel"]
    evaluate = script("scripts/evaluate.py", "--backbone=digits", f"--task={task}", "--dataset=digits:upper")
    with open(os.path.join(run, "metrics.json")) as f:
        assert json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] == json.load(f)["accuracy"]

    backbone = pb.digits_backbone()
    model = pb.load_task(task, backbone)
    assert [layer.name for layer in masked_layers(model)] == ["conv3", "conv4", "fc"]
    x = to_arrays(pb.load_dataset("digits:upper").test)[0][:64]
    reference = model(x).numpy()
    baked = pb.bake(model)
    np.testing.assert_allclose(baked(x).numpy(), reference, atol=1e-5)
    assert baked.get_layer("conv1") is backbone.get_layer("conv1")

    full = pb.piggyback(pb.digits_backbone(), 5)  # a task over every layer, its masks not all ones
    for layer in masked_layers(full):
        for mask in layer.masks:
            mask.assign(layer.mask_value(np.random.default_rng(0).random(mask.shape) >= 0.2))
    full_path = str(tmp_path / "full" / "task.npz")
    pb.save_task(full, full_path)
    full_reference = pb.load_task(full_path, pb.digits_backbone())(x).numpy()
    paths = [f"fast={task}", f"full={full_path}"]
    exported = export_saved_model(backbone, paths, str(tmp_path / "served"), slots=1)
    served = tf.saved_model.load(exported)
    for name, expected in (("fast", reference), ("full", full_reference), ("fast", reference)):
        np.testing.assert_allclose(served.signatures[name](image=tf.constant(x))["logits"].numpy(), expected,
                                   atol=1e-4)

    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, paths, str(tmp_path / "tasks.tflite"))
    interpreter = Interpreter(model_path=str(tmp_path / "tasks.tflite"))
    for name, expected in (("fast", reference), ("full", full_reference)):
        np.testing.assert_allclose(interpreter.get_signature_runner(name)(image=x)["logits"], expected, atol=1e-4)


def test_mask_from_on_device(tmp_path):
    """On-device training learns masks only from mask_from on, and writes a task file saying so."""
    export_ondevice(pb.digits_backbone(), 5, 32, str(tmp_path), mask_from="conv3")
    trainer = LiteRTTrainer(str(tmp_path))
    splits = pb.load_dataset("digits:upper")
    images, labels = to_arrays(splits.train)
    trainer.train_epoch(images[:128], labels[:128], np.random.default_rng(0))
    manifest = trainer.save_task(pb.digits_backbone(), str(tmp_path / "task.npz"))
    assert manifest["options"]["mask_from"] == "conv3"
    assert [e["name"] for e in manifest["layers"]] == ["conv3/kernel", "conv4/kernel", "fc/kernel"]
    x = to_arrays(splits.test)[0][:32]
    np.testing.assert_allclose(pb.load_task(str(tmp_path / "task.npz"), pb.digits_backbone())(x).numpy(),
                               trainer.logits(x), atol=1e-4)


def test_mask_from_with_another_method_is_a_one_line_error(tmp_path):
    result = script("scripts/train.py", *BASE, f"--model_dir={tmp_path}", "--method=finetune", "--mask_from=conv3")
    assert result.returncode == 2 and "--mask_from applies to --method=piggyback only" in result.stderr
    result = script("scripts/train.py", *BASE, f"--model_dir={tmp_path}", "--mask_from=bn1")
    assert result.returncode == 2 and "mask_from 'bn1' is a BatchNormalization" in result.stderr
