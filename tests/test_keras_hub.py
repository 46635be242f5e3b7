"""keras-hub backbones, built from their configs (presets need downloads): a ViT, BERT (dict inputs
and outputs) and Gemma, on every path a task takes."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
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
inputs = dict(np.load(sys.argv[3]))
np.save(sys.argv[4], pb.load_task(sys.argv[2], backbone)(inputs.get("image", inputs)).numpy())
"""


def in_fresh_process(backbone, task, inputs, tmp_path):
    """`task`'s logits computed in a new Python process, its backbone read from a `.keras` file."""
    backbone.save(tmp_path / "backbone.keras")
    np.savez(tmp_path / "inputs.npz", **inputs if isinstance(inputs, dict) else {"image": inputs})
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "backbone.keras"), task,
                    str(tmp_path / "inputs.npz"), str(tmp_path / "out.npy")], check=True, capture_output=True, cwd=REPO)
    return np.load(tmp_path / "out.npy")


def vit_backbone():
    import keras_hub

    keras.utils.set_random_seed(3)
    return keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                        hidden_dim=32, mlp_dim=64)


def random_task(backbone, num_classes, seed, path, **options):
    model = pb.piggyback(backbone, num_classes, **options)
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

    np.testing.assert_array_equal(in_fresh_process(backbone, a, x, tmp_path), expected)
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


def bert_backbone():
    import keras_hub

    keras.utils.set_random_seed(4)
    return keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32,
                                         intermediate_dim=64, max_sequence_length=16)


def test_bert_takes_its_dict_inputs_on_every_path(tmp_path):
    backbone = bert_backbone()
    with pytest.raises(ValueError, match=r"has 2 outputs \(sequence_output, pooled_output\); pass feature_layer="):
        pb.piggyback(backbone, 5)
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    model = random_task(backbone, 5, 1, a, feature_layer="sequence_output")
    random_task(backbone, 3, 2, b, feature_layer="sequence_output")
    masked = [k.path for layer in masked_layers(model) for k in layer.kernels]
    # every kernel the sequence output depends on (not pooled_dense), and the token and segment tables
    assert len(masked) == 14 and {"token_embedding/embeddings", "segment_embedding/embeddings"} < set(masked)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 100, (2, 16)).astype("int32"), "segment_ids": np.zeros((2, 16), "int32"),
         "padding_mask": np.array([[1] * 16, [1] * 8 + [0] * 8], "int32")}
    expected = model(x).numpy()
    padded = {**x, "token_ids": np.where(x["padding_mask"] == 1, x["token_ids"], 7).astype("int32")}
    np.testing.assert_array_equal(model(padded).numpy(), expected)  # pooled over the unpadded tokens only

    np.testing.assert_array_equal(in_fresh_process(backbone, a, x, tmp_path), expected)
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), expected, atol=1e-5)
    loaded = tf.saved_model.load(export_saved_model(backbone, [a], str(tmp_path / "single")))
    served = loaded.signatures["serving_default"]
    assert set(served.structured_input_signature[1]) == {"token_ids", "segment_ids", "padding_mask"}
    np.testing.assert_allclose(served(**{k: tf.constant(v) for k, v in x.items()})["logits"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="a TaskBank serves backbones of one image input; 'bert_backbone' takes"):
        export_saved_model(backbone, [a, b], str(tmp_path / "bank"))
    # pb.train takes batches of dicts
    tokens = rng.integers(0, 100, (64, 16)).astype("int32")
    batches = tf.data.Dataset.from_tensor_slices(
        ({"token_ids": tokens, "segment_ids": np.zeros_like(tokens), "padding_mask": np.ones_like(tokens)},
         (tokens[:, 0] < 50).astype("int32"))).batch(16)
    history = pb.train(pb.piggyback(backbone, 2, feature_layer="pooled_output"), batches,
                       pb.TrainConfig(epochs=3, head_lr=1e-2, mask_lr=1e-3), log=lambda line: None)
    assert history[-1]["loss"] < history[0]["loss"]

    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, [f"a={a}", f"b={b}"], str(tmp_path / "tasks.tflite"))
    interpreter = Interpreter(model_path=str(tmp_path / "tasks.tflite"))
    for name, path in (("a", a), ("b", b)):
        np.testing.assert_allclose(interpreter.get_signature_runner(name)(**x)["logits"],
                                   pb.load_task(path, backbone)(x).numpy(), atol=1e-4)


def test_gemma_masks_its_embedding_once_and_bakes(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(5)
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=100, num_layers=2, num_query_heads=2,
                                              num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16)
    path = str(tmp_path / "task.npz")
    model = random_task(backbone, 4, 3, path)
    masked = [k.path for layer in masked_layers(model) for k in layer.kernels]
    assert masked.count("token_embedding/embeddings") == 1 and len(masked) == 15
    x = {"token_ids": np.random.default_rng(1).integers(0, 100, (2, 8)).astype("int32"),
         "padding_mask": np.ones((2, 8), "int32")}
    expected = model(x).numpy()
    np.testing.assert_array_equal(pb.load_task(path, backbone)(x).numpy(), expected)
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), expected, atol=1e-5)
