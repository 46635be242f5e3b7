"""Dense prediction (§6): per-pixel labels, a user-supplied head, mIoU, from the CLI to the exports."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO
from tf_piggyback.core.surgery import fcn_head
from tf_piggyback.data.datasets import load_digits_segmentation, load_digits_variant, to_arrays
from tf_piggyback.devices.tflite import export_tflite
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.training.evaluation import segmentation_scores

BASE = ["--backbone=digits", "--dataset=digits_seg:upper", "--feature_layer=relu3", "--head_lr=1e-3", "--verbose=0"]


def script(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, *args[0].split("/")), *args[1:]],
                          capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("variant", ["upper", "inverted"])
def test_digit_strokes_are_labelled_with_their_digit(variant):
    (x, maps), (xt, maps_t), names = load_digits_segmentation(variant)
    (_, y), _, digit_names = load_digits_variant(variant)
    assert names == ["background", *digit_names] and maps.shape == x.shape[:3] and len(maps_t) == len(xt)
    ink = 255.0 - x[..., 0] if variant == "inverted" else x[..., 0]
    np.testing.assert_array_equal(maps > 0, ink > 127.5)
    for image_map, label in zip(maps[:50], y[:50]):  # one digit per image: its class + 1 on its strokes
        assert set(np.unique(image_map)) == {0, label + 1}


def test_miou_by_hand():
    labels = np.array([[[0, 0], [1, 2]]])  # classes 0, 1, 2
    logits = keras.ops.one_hot(np.array([[[0, 1], [1, 1]]]), 3)  # predicts 0, 1, 1, 1
    model = keras.Sequential([keras.layers.Lambda(lambda x: x)])
    scores = segmentation_scores(model, tf.data.Dataset.from_tensor_slices((logits, labels)), 3)
    # IoU: class 0 1/2, class 1 1/3, class 2 0/1
    assert scores["pixel_accuracy"] == pytest.approx(0.5)
    assert scores["miou"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)


def test_cli_trains_evaluates_and_exports_a_segmentation_task(tmp_path):
    run = str(tmp_path / "run")
    result = script("scripts/train.py", *BASE, f"--model_dir={run}", "--epochs=3")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["miou"] > 0.25 and metrics["accuracy"] > 0.75, metrics  # background alone: 0.69 and 0.12
    task = os.path.join(run, "task.npz")
    manifest = pb.read_manifest(task)
    assert manifest["options"]["head"]["class_name"] == "Sequential"
    assert [w["name"] for w in manifest["weights"]] == [f"head/{layer}/{w}" for layer in ("head_conv", "head_up")
                                                        for w in ("kernel", "bias")]
    evaluate = script("scripts/evaluate.py", "--backbone=digits", f"--task={task}", "--dataset=digits_seg:upper")
    scores = json.loads(evaluate.stdout.splitlines()[-1])
    assert scores["miou"] == metrics["miou"] and scores["accuracy"] == metrics["accuracy"]

    backbone = pb.digits_backbone()
    model = pb.load_task(task, backbone)
    x = to_arrays(pb.load_dataset("digits_seg:upper").test)[0][:16]
    expected = model(x).numpy()
    assert expected.shape == (16, 32, 32, 6)
    served = tf.saved_model.load(export_saved_model(backbone, [task], str(tmp_path / "served")))
    out = served.signatures["serving_default"](image=tf.constant(x))
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)  # per pixel
    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, [task], str(tmp_path / "seg.tflite"))
    runner = Interpreter(model_path=str(tmp_path / "seg.tflite")).get_signature_runner("serving_default")
    np.testing.assert_allclose(runner(image=x)["logits"], expected, atol=1e-4)
    pig = str(tmp_path / "pig" / "task.npz")
    pb.save_task(pb.piggyback(backbone, 5), pig)
    refused = script("export/saved_model.py", "--backbone=digits", f"--task=seg={task}", f"--task=pig={pig}",
                     f"--output={tmp_path}/multi")
    assert refused.returncode == 2 and "has its own head layers" in refused.stderr


def test_a_user_head_is_the_tasks_own_and_reloads_from_its_config(tmp_path):
    backbone = pb.digits_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    for make in (pb.piggyback, pb.classifier_only):
        model = make(backbone, 6, feature_layer="relu3", head=fcn_head(6, 4))
        assert set(model.task_spec.owned) == {"head_conv", "head_up"}
        data = pb.load_dataset("digits_seg:upper").train.take(64)
        pb.train(model, pb.training.trainer.epoch_batches(data, 32), pb.TrainConfig(method=model.task_spec.method, epochs=1,
                                                                          head_lr=1e-3), log=lambda line: None)
        path = str(tmp_path / make.__name__ / "task.npz")
        pb.save_task(model, path)
        x = to_arrays(data.take(4))[0]
        np.testing.assert_allclose(pb.load_task(path, pb.digits_backbone())(x).numpy(), model(x).numpy(), atol=1e-5)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, backbone.weights))
    with pytest.raises(ValueError, match=r"the head's layer names \['conv1'\] are the backbone's too"):
        pb.piggyback(backbone, 6, feature_layer="relu3", head=keras.layers.Conv2D(6, 1, name="conv1"))
    with pytest.raises(ValueError, match="the head outputs 4 channels; the task has 6 classes"):
        pb.piggyback(backbone, 6, feature_layer="relu3", head=keras.layers.Conv2D(4, 1, name="head"))


@pytest.mark.parametrize("args, message", [
    (["--head=dense"], "--head=dense does not fit digits_seg:upper: per-pixel labels need --head=fcn"),
    (["--feature_layer=fc"], "--head=fcn needs a spatial feature map"),
    (["--augment"], "--augment crops and flips the images only"),
    (["--method=packnet"], "per-pixel labels train with --method=piggyback, classifier or finetune"),
])
def test_bad_segmentation_flags_are_one_line_errors(tmp_path, args, message):
    result = script("scripts/train.py", *BASE, f"--model_dir={tmp_path}/run", "--epochs=1", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-1000:]
    assert not os.path.exists(tmp_path / "run")
