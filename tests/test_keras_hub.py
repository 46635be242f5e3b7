"""keras-hub backbones: a ViT built from its config (presets need downloads), every path a task takes."""

import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO
from tf_piggyback.export import export_saved_model, export_tflite
from tf_piggyback.layers import is_kernel
from tf_piggyback.surgery import masked_layers

FRESH_PROCESS = """
import sys, keras, numpy as np
import tf_piggyback as pb
backbone = keras.models.load_model(sys.argv[1], compile=False)
np.save(sys.argv[4], pb.load_task(sys.argv[2], backbone)(np.load(sys.argv[3])).numpy())
"""


def vit_backbone():
    import keras_hub

    keras.utils.set_random_seed(3)
    return keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                        hidden_dim=32, mlp_dim=64)


def random_task(backbone, num_classes, seed, path):
    model = pb.piggyback(backbone, num_classes)
    rng = np.random.default_rng(seed)
    for layer in masked_layers(model):
        for mask in layer.masks:
            mask.assign(np.where(rng.random(mask.shape) < 0.3, 0.0, 0.01).astype("float32"))
    model.get_layer("head").set_weights([rng.normal(0, 0.3, w.shape).astype("float32")
                                         for w in model.get_layer("head").get_weights()])
    pb.save_task(model, path)
    return model


def test_vit_backbone_every_path(tmp_path):
    backbone = vit_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    model = random_task(backbone, 5, 1, a)
    random_task(backbone, 3, 2, b)
    # every kernel the backbone owns, in its composite layers too (patch embedding, attention, MLP)
    masked = [k.path for layer in masked_layers(model) for k in layer.kernels]
    assert len(masked) == len([w for w in backbone.weights if is_kernel(w)]) == 13
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = model(x).numpy()

    # the task file in a fresh process, the backbone from a .keras file
    backbone.save(tmp_path / "vit.keras")
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "vit.keras"), a, str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npy")], check=True, capture_output=True, cwd=REPO)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
    np.testing.assert_allclose(pb.bake(pb.load_task(a, backbone))(x).numpy(), expected, atol=1e-5)

    single = tf.saved_model.load(export_saved_model(backbone, [a], str(tmp_path / "single")))
    np.testing.assert_allclose(single.signatures["serving_default"](image=tf.constant(x))["logits"], expected,
                               atol=1e-5)
    bank = tf.saved_model.load(export_saved_model(backbone, [f"a={a}", f"b={b}"], str(tmp_path / "bank"), slots=1))
    for name, path in (("a", a), ("b", b), ("a", a)):
        np.testing.assert_allclose(bank.signatures[name](image=tf.constant(x))["logits"],
                                   pb.load_task(path, backbone)(x).numpy(), atol=1e-4)

    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, [a], str(tmp_path / "a.tflite"))
    out = Interpreter(model_path=str(tmp_path / "a.tflite")).get_signature_runner("serving_default")(image=x)
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4)
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))


def test_vit_backbone_trains_from_the_cli(tmp_path):
    vit_backbone().save(tmp_path / "vit.keras")
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"),
                          f"--backbone={tmp_path / 'vit.keras'}", "--dataset=digits:upper", "--epochs=1",
                          f"--model_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = pb.read_manifest(str(tmp_path / "run" / "task.npz"))
    assert manifest["num_classes"] == 5 and len(manifest["layers"]) == 13
