"""keras-hub backbones, built from small configs with random weights (presets need downloads):
ViT, ResNet, BERT (dict inputs and outputs) and Gemma (a tied embedding) on every path a task takes.
Run alone: `python -m pytest tests/test_keras_hub.py`."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO, random_masks, tflite_ops
from tf_piggyback.core.fingerprint import old_fingerprint
from tf_piggyback.core.layers import is_kernel
from tf_piggyback.core.surgery import masked_layers
from tf_piggyback.devices.tflite import export_tflite
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.serving.taskbank import TaskBank

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


def bert_backbone():
    import keras_hub

    keras.utils.set_random_seed(4)
    return keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32,
                                         intermediate_dim=64, max_sequence_length=16)


def gemma_backbone():
    import keras_hub

    keras.utils.set_random_seed(5)
    return keras_hub.models.GemmaBackbone(vocabulary_size=100, num_layers=2, num_query_heads=2,
                                          num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16)


def resnet_backbone():
    import keras_hub

    keras.utils.set_random_seed(6)
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block", image_shape=(32, 32, 3))


def images(count, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, 32, 32, 3)).astype("float32")


def tokens(count, seed=0, segments=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (count, 16)).astype("int32")
    mask = (np.arange(16) < rng.integers(8, 17, (count, 1))).astype("int32")
    return {"token_ids": ids, "padding_mask": mask, **({"segment_ids": np.zeros_like(ids)} if segments else {})}


# name: (builder, piggyback options, inputs)
KERAS_HUB = {
    "ViTBackbone": (vit_backbone, {}, images),
    "ResNetBackbone": (resnet_backbone, {}, images),
    "BertBackbone": (bert_backbone, {"feature_layer": "pooled_output"}, tokens),
    "GemmaBackbone": (gemma_backbone, {}, lambda count, seed=0: tokens(count, seed, segments=False)),
}


@pytest.mark.parametrize("name", list(KERAS_HUB))
def test_keras_hub_backbone(name, tmp_path):
    """Masks on every kernel (and embedding table), a few training steps change only the masks
    and the head, the task file reloads exactly in a fresh process, `bake` agrees."""
    build, options, inputs = KERAS_HUB[name]
    backbone = build()
    before = [w.numpy().copy() for w in backbone.weights]
    model = pb.piggyback(backbone, 3, **options)
    paths = [k.path for layer in masked_layers(model) for k in layer.kernels]
    masked = set(paths)
    assert len(paths) == len(masked)  # a variable used twice (Gemma's tied embedding) has one mask
    features = pb.core.surgery.feature_model(backbone, options.get("feature_layer"))
    assert masked >= {w.path for w in features.weights if is_kernel(w)}
    assert masked - {w.path for w in features.weights if is_kernel(w)} <= {
        w.path for w in features.weights if w.path.endswith("embeddings") and "position" not in w.path}
    head = [w.numpy().copy() for w in model.get_layer("head").weights]
    masks = [m.numpy().copy() for layer in masked_layers(model) for m in layer.masks]
    x = inputs(32)
    labels = np.arange(32) % 3
    batches = tf.data.Dataset.from_tensor_slices((x, labels)).batch(8)
    pb.train(model, batches, pb.TrainConfig(epochs=2, mask_lr=1e-2, head_lr=1e-2), log=lambda line: None)
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))
    assert not any(np.array_equal(v, w.numpy()) for v, w in zip(head, model.get_layer("head").weights))
    assert not all(np.array_equal(v, m.numpy()) for v, m in zip(
        masks, [m for layer in masked_layers(model) for m in layer.masks]))

    path = str(tmp_path / "task.npz")
    pb.save_task(model, path)
    expected = model(x).numpy()
    np.testing.assert_array_equal(in_fresh_process(backbone, path, x, tmp_path), expected)
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), expected, atol=1e-4)


def random_task(backbone, num_classes, seed, path, **options):
    model = random_masks(pb.piggyback(backbone, num_classes, **options), seed)
    rng = np.random.default_rng(seed)
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
    x = images(4)
    expected = model(x).numpy()
    single = tf.saved_model.load(export_saved_model(backbone, [a], str(tmp_path / "single")))
    np.testing.assert_allclose(single.signatures["serving_default"](image=tf.constant(x))["logits"], expected,
                               atol=1e-5)
    bank = tf.saved_model.load(export_saved_model(backbone, [f"a={a}", f"b={b}"], str(tmp_path / "bank"), slots=1))
    for name, path in (("a", a), ("b", b), ("a", a)):
        np.testing.assert_allclose(bank.signatures[name](image=tf.constant(x))["logits"],
                                   pb.load_task(path, backbone)(x).numpy(), atol=1e-4)

    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, [a], str(tmp_path / "a.tflite"))
    assert not [op for op in tflite_ops(str(tmp_path / "a.tflite")) if op.startswith("Flex") or op == "CUSTOM"]
    out = Interpreter(model_path=str(tmp_path / "a.tflite")).get_signature_runner("serving_default")(image=x)
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4)
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))


def test_tflite_converts_resnet_and_refuses_gemma_in_one_line(tmp_path):
    """ResNet converts with builtin ops, one task and two; Gemma's attention slices a boolean
    mask with a new axis, which TFLite's builtin STRIDED_SLICE does not take: one line, no file."""
    from ai_edge_litert.interpreter import Interpreter

    backbone = resnet_backbone()
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    expected = random_task(backbone, 3, 1, a)(images(4)).numpy()
    random_task(backbone, 4, 2, b)
    export_tflite(backbone, [a], str(tmp_path / "a.tflite"))
    export_tflite(backbone, [f"a={a}", f"b={b}"], str(tmp_path / "ab.tflite"))
    for path, runner in (("a.tflite", "serving_default"), ("ab.tflite", "a")):
        assert not [op for op in tflite_ops(str(tmp_path / path)) if op.startswith("Flex") or op == "CUSTOM"]
        out = Interpreter(model_path=str(tmp_path / path)).get_signature_runner(runner)(image=images(4))
        np.testing.assert_allclose(out["logits"], expected, atol=1e-4)

    gemma = gemma_backbone()
    random_task(gemma, 3, 1, str(tmp_path / "g.npz"))
    with pytest.raises(ValueError, match=r"^the TFLite converter cannot convert 'gemma_backbone\w*': it has no builtin "
                                         r"TFLite kernel for the TensorFlow ops StridedSlice; export a SavedModel"):
        export_tflite(gemma, [str(tmp_path / "g.npz")], str(tmp_path / "g.tflite"))
    assert not os.path.exists(tmp_path / "g.tflite")


@pytest.mark.parametrize("name", ["ViTBackbone", "BertBackbone", "GemmaBackbone"])
def test_lora_adapts_the_kernels_inside_keras_hub_layers(name, tmp_path):
    """keras-hub keeps every kernel inside composite layers (encoders, attention, MLP, patch
    embedding). LoRA adapts each of them; before, it trained the head alone."""
    build, options, inputs = KERAS_HUB[name]
    backbone = build()
    before = [w.numpy().copy() for w in backbone.weights]
    model = pb.lora(backbone, 3, rank=2, **options)
    features = pb.core.surgery.feature_model(backbone, options.get("feature_layer"))
    adapted = {p.rsplit("/", 1)[0] for p in (w.path for w in model.trainable_variables) if "lora_kernel" in p}
    assert adapted == {w.path.rsplit("/", 1)[0] for w in features.weights if is_kernel(w)}
    assert {w.path for w in model.trainable_variables} == {
        *(f"{p}/lora_kernel_{ab}" for p in adapted for ab in "ab"), "head/kernel", "head/bias"}
    frozen = {w.path: w.numpy().copy() for w in model.weights if "lora" not in w.path and "head" not in w.path}
    x = inputs(32)
    batches = tf.data.Dataset.from_tensor_slices((x, np.arange(32) % 3)).batch(8)
    pb.train(model, batches, pb.TrainConfig(method="lora", epochs=2, head_lr=1e-2), log=lambda line: None)
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))
    assert all(np.array_equal(frozen[w.path], w.numpy()) for w in model.weights if w.path in frozen)
    assert all(np.any(w.numpy()) for w in model.trainable_variables if w.path.endswith("lora_kernel_b"))

    path = str(tmp_path / "task.npz")
    pb.save_task(model, path)
    expected = model(x).numpy()
    np.testing.assert_array_equal(in_fresh_process(backbone, path, x, tmp_path), expected)
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), expected, atol=1e-4)


def test_finetune_copies_a_keras_hub_backbone_whole(tmp_path):
    """Cloned layer by layer, keras-hub 0.32's ViT patch embedding could not be rebuilt from its
    config: `--method=finetune` crashed. The copy is the backbone's own class, nested."""
    backbone = vit_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    model = pb.finetune(backbone, 3)
    assert len(model.trainable_weights) == len(backbone.weights) + 2
    x = images(16)
    batches = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 3)).batch(8)
    pb.train(model, batches, pb.TrainConfig(method="finetune", epochs=1), log=lambda line: None)
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))
    copy = [w.numpy() for w in model.weights if not w.path.startswith("head/")]
    assert [v.shape for v in copy] == [v.shape for v in before]
    assert not all(np.array_equal(v, w) for v, w in zip(before, copy))
    model.save(tmp_path / "model.keras")
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "model.keras")(x).numpy(), model(x).numpy())


def test_vit_backbone_trains_from_the_cli(tmp_path):
    """README's keras-hub rows: `make_keras_hub_vit.py` pretrains the ViT on digits 0-4 (here for
    one epoch), `train.py` takes the `.keras` file."""
    made = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_keras_hub_vit.py"), "--epochs=1",
                           f"--output={tmp_path / 'vit.keras'}"], capture_output=True, text=True, cwd=REPO)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "pretrained on digits:base for 1 epochs" in made.stdout
    assert isinstance(keras.models.load_model(tmp_path / "vit.keras"), keras.Model)
    refused = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_keras_hub_vit.py"),
                              f"--output={tmp_path / 'vit.h5'}"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == \
        f"error: --output must end in .keras. Received: --output={tmp_path / 'vit.h5'}"
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"),
                          f"--backbone={tmp_path / 'vit.keras'}", "--dataset=digits:upper", "--epochs=1",
                          f"--model_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = pb.read_manifest(str(tmp_path / "run" / "task.npz"))
    assert manifest["num_classes"] == 5 and len(manifest["layers"]) == 13


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

    loaded = tf.saved_model.load(export_saved_model(backbone, [a], str(tmp_path / "single")))
    served = loaded.signatures["serving_default"]
    assert set(served.structured_input_signature[1]) == {"token_ids", "segment_ids", "padding_mask"}
    np.testing.assert_allclose(served(**{k: tf.constant(v) for k, v in x.items()})["logits"], expected, atol=1e-5)

    from ai_edge_litert.interpreter import Interpreter

    export_tflite(backbone, [f"a={a}", f"b={b}"], str(tmp_path / "tasks.tflite"))
    assert not [op for op in tflite_ops(str(tmp_path / "tasks.tflite")) if op.startswith("Flex") or op == "CUSTOM"]
    interpreter = Interpreter(model_path=str(tmp_path / "tasks.tflite"))
    for name, path in (("a", a), ("b", b)):
        np.testing.assert_allclose(interpreter.get_signature_runner(name)(**x)["logits"],
                                   pb.load_task(path, backbone)(x).numpy(), atol=1e-4)



def token_inputs(backbone, count, seed=0):
    """`count` random examples for a text backbone's dict inputs: token ids, a padding mask
    (every other example padded after half its tokens), segment ids 0."""
    import keras_hub_zoo as zoo

    rng = np.random.default_rng(seed)
    lengths = np.where(np.arange(count) % 2, zoo.TOKENS // 2, zoo.TOKENS)
    padding = (np.arange(zoo.TOKENS)[None] < lengths[:, None]).astype("int32")
    values = {"token_ids": rng.integers(1, zoo.VOCABULARY, (count, zoo.TOKENS)) * padding,
              "padding_mask": padding, "segment_ids": np.zeros((count, zoo.TOKENS))}
    return {name: values[name].astype(tensor.dtype) for name, tensor in backbone.input.items()}


@pytest.mark.parametrize("name", ["BertBackbone", "Llama3Backbone"])
def test_many_text_tasks_in_one_saved_model(name, tmp_path):
    """Issue 40: tasks over one text backbone share a multi-task SavedModel as image tasks do. A
    request carries the backbone's inputs by name (`token_ids`, `padding_mask`, BERT's
    `segment_ids`) and names its task by signature, or per example in `tasks` (index) and
    `tasks_by_name`; each answer is its task's own Keras model's within 1e-4, in both versions
    (the second adds a task), in mixed-task batches and from `TaskBank.predict`."""
    import keras_hub_zoo as zoo

    backbone = zoo.build(name)
    paths, expected = {}, {}
    x = token_inputs(backbone, 6)
    for seed, (task, classes, options) in enumerate([("a", 5, {}), ("b", 3, {"mask_type": "ternary"}), ("c", 4, {})]):
        paths[task] = str(tmp_path / f"{task}.npz")
        random_task(backbone, classes, seed, paths[task], **zoo.OPTIONS.get(name, {}), **options)
        expected[task] = pb.load_task(paths[task], backbone)(x).numpy()
    root = str(tmp_path / "bank")
    for version, names in ((1, "ab"), (2, "abc")):
        export_saved_model(backbone, [f"{t}={paths[t]}" for t in names], root, version)
    order = ["c", "a", "b", "a", "c", "b"]
    for version, names in ((1, "ab"), (2, "abc")):
        loaded = tf.saved_model.load(os.path.join(root, str(version)))
        tensors = {key: tf.constant(value) for key, value in x.items()}
        assert set(loaded.signatures["tasks"].structured_input_signature[1]) == {*x, "task"}
        for task in names:
            np.testing.assert_allclose(loaded.signatures[task](**tensors)["logits"], expected[task], atol=1e-4)
        rows = [i for i, t in enumerate(order) if t in names]  # example i of x for task order[i]
        mixed = [order[i] for i in rows]
        picked = {key: tf.gather(value, rows) for key, value in tensors.items()}
        out = loaded.signatures["tasks_by_name"](**picked, task=tf.constant(mixed))
        for i, (task, row) in enumerate(zip(mixed, rows)):
            np.testing.assert_allclose(out["logits"][i, :expected[task].shape[1]], expected[task][row], atol=1e-4)
    bank = TaskBank(backbone)
    bank.add_all([paths[t] for t in "abc"], names=list("abc"))
    np.testing.assert_allclose(bank.predict(x, "b"), expected["b"], atol=1e-4)
    logits = bank.predict(x, order)
    for i, task in enumerate(order):
        np.testing.assert_allclose(logits[i, :expected[task].shape[1]], expected[task][i], atol=1e-4)


@pytest.mark.parametrize("name", ["DeiTBackbone", "SwinTransformerBackbone", "Llama3Backbone"])
def test_fingerprint_is_built_from_what_every_layer_has(name, tmp_path):
    """keras-hub 0.32's DeiT and Llama 3 layers have no config of their own and Swin's
    `get_config` fails; the fingerprint guessed their `__init__` arguments from attributes and
    crashed `piggyback`. Now: the same for the backbone loaded from its `.keras` file, a task
    file reloads on that one, and one changed weight refuses it."""
    import keras_hub_zoo as zoo

    backbone = zoo.build(name)
    model = random_masks(pb.piggyback(backbone, 3), 1)
    path = str(tmp_path / "task.npz")
    pb.save_task(model, path)
    backbone.save(tmp_path / "backbone.keras")
    loaded = keras.models.load_model(tmp_path / "backbone.keras", compile=False)
    assert pb.fingerprint(loaded) == pb.fingerprint(backbone)
    x = zoo.inputs_for(backbone, 4)
    np.testing.assert_array_equal(pb.load_task(path, loaded)(x).numpy(), model(x).numpy())
    loaded.weights[-1].assign(loaded.weights[-1] + 1)
    with pytest.raises(pb.TaskFileError, match=r"was trained on backbone .* \(fingerprint"):
        pb.load_task(path, loaded)


@pytest.mark.parametrize("name", ["Qwen3Backbone", "MiTBackbone", "SegFormerBackbone", "DeepLabV3Backbone"])
def test_bake_copies_the_backbone_through_keras_saving(name):
    """keras-hub 0.32's Qwen 3 decoder does not rebuild from its own config, and its MiT encoder
    rebuilds with 18 weights of 22: `bake` (and LoRA, which copies the layers it adapts) crashed
    rebuilding them one by one. A copy of the whole backbone through `keras.saving` bakes exactly
    and merges LoRA exactly (DeepLab's pooling layer only when the copy is frozen as its source
    is: otherwise its BatchNormalization trains); the backbone is unchanged."""
    import keras_hub_zoo as zoo

    backbone = zoo.build(name)
    before = [w.numpy().copy() for w in backbone.weights]
    x = zoo.inputs_for(backbone, 4)
    model = random_masks(pb.piggyback(backbone, 3), 1)
    baked = pb.bake(model)
    assert not masked_layers(baked)
    np.testing.assert_allclose(baked(x).numpy(), model(x).numpy(), atol=1e-5)
    adapted = pb.lora(backbone, 3, rank=2)
    rng = np.random.default_rng(0)
    for w in adapted.trainable_weights:
        w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
    np.testing.assert_allclose(pb.bake(adapted)(x).numpy(), adapted(x).numpy(), atol=1e-4)
    assert all(np.array_equal(v, w.numpy()) for v, w in zip(before, backbone.weights))


def test_freezing_the_backbone_leaves_its_fingerprint():
    """keras-hub MiT's encoder writes its MLP's config, trainable flag included, into its own;
    `piggyback` freezes the backbone, so the fingerprint a task file recorded was not the one of
    the same backbone loaded in a fresh process, which refused the file."""
    import keras_hub_zoo as zoo

    backbone = zoo.build("MiTBackbone")
    before = pb.fingerprint(backbone)
    pb.piggyback(backbone, 3)
    assert pb.fingerprint(backbone) == before


def test_weights_sharing_a_path_are_refused_in_one_line():
    """keras-hub 0.32's SmolLM 3 names every attention output projection `o_proj` with no parent: its
    weights share a path, which is how task files find masks; refused where a task starts."""
    import keras_hub_zoo as zoo

    with pytest.raises(ValueError, match=r"^SmolLM3Backbone 'smol_lm3_backbone\w*' has several weights at one "
                                         r"path \(o_proj/kernel, rotary_emb/inv_freq\); task files find weights"):
        pb.piggyback(zoo.build("SmolLMBackbone"), 3)


def test_head_takes_a_name_the_backbone_does_not_use(tmp_path):
    """keras-hub SigLIP's vision encoder has its own layer `head` (attention pooling): the task's
    head took the same name and `piggyback` crashed. Now it is `head_1`; the task owns it alone,
    SigLIP's `head` is masked like any backbone layer, the task file records the name, and the task
    reloads and bakes exactly."""
    import keras_hub_zoo as zoo

    backbone = zoo.build("SigLIPVisionEncoder")
    model = random_masks(pb.piggyback(backbone, 3), 1)
    assert pb.core.surgery.head_name(model) == "head_1"
    assert [w.path for w in pb.core.surgery.task_weights(model)] == ["head_1/kernel", "head_1/bias"]
    assert any(k.path.startswith("head/") for layer in masked_layers(model) for k in layer.kernels)
    x = zoo.images(4)
    path = str(tmp_path / "task.npz")
    assert pb.save_task(model, path)["head_name"] == "head_1"
    np.testing.assert_array_equal(pb.load_task(path, backbone)(x).numpy(), model(x).numpy())
    np.testing.assert_allclose(pb.bake(model)(x).numpy(), model(x).numpy(), atol=1e-5)


def test_task_file_with_the_old_fingerprint_loads():
    """`tests/data/gemma_task_20cf180.npz` was written by tf_piggyback at commit 20cf180 (Gemma
    below, masks `random_masks(..., 1)`), whose fingerprint described keras-hub's
    `RMSNormalization` by its attributes named like its constructor's arguments; that description
    was dropped (it guessed from attributes), and since issue 39 Keras' automatic config, the
    arguments themselves, describes it again: the old file's fingerprint is the current one. The
    old file still loads, to the logits it was saved with; another backbone is still refused."""
    data = os.path.join(REPO, "tests", "data")
    path = os.path.join(data, "gemma_task_20cf180.npz")
    saved = dict(np.load(os.path.join(data, "gemma_task_20cf180_io.npz")))
    logits = saved.pop("logits")
    backbone = gemma_backbone()
    assert pb.read_manifest(path)["backbone"]["fingerprint"] == old_fingerprint(backbone) == pb.fingerprint(backbone)
    np.testing.assert_allclose(pb.load_task(path, backbone)(saved).numpy(), logits, atol=1e-6)
    other = gemma_backbone()
    other.weights[0].assign(other.weights[0] * 2)
    with pytest.raises(pb.TaskFileError, match="fingerprint"):
        pb.load_task(path, other)
