import io
import json
import os
import zipfile

import keras
import numpy as np
import pytest

from conftest import tiny_backbone
from tf_piggyback import TaskFileError, classifier_only, load_task, masked_layers, piggyback, read_manifest, save_task
from tf_piggyback.core import coding


def trained_like(model, sparsity=0.2, seed=0):
    """Sets random masks (and a random head) as if the model had been trained."""
    rng = np.random.default_rng(seed)
    for layer in masked_layers(model):
        for m in layer.masks:  # below sparsity/2: -1 (ternary) or 0; up to sparsity: 0; else 1
            r = rng.random(m.shape)
            m.assign(layer.mask_value(np.where(r < sparsity / 2, -1, np.where(r < sparsity, 0, 1))))
    for w in model.get_layer("head").weights:
        w.assign(rng.normal(size=w.shape))
    return model


X = np.random.default_rng(1).normal(size=(5, 12, 12, 3)).astype("float32")


@pytest.mark.parametrize("kwargs", [{}, {"mask_type": "ternary"}, {"train_bn": True}])
def test_round_trip_gives_identical_outputs(tmp_path, kwargs):
    backbone = tiny_backbone()
    model = trained_like(piggyback(backbone, 3, **kwargs))
    if kwargs.get("train_bn"):
        model.get_layer("bn1").moving_mean.assign(np.full(8, 0.7, "float32"))
    path = os.path.join(tmp_path, "task.npz")
    save_task(model, path, class_names=["a", "b", "c"], metrics={"accuracy": 0.5})
    loaded = load_task(path, tiny_backbone())
    np.testing.assert_array_equal(loaded(X).numpy(), model(X).numpy())
    for a, b in zip(masked_layers(model), masked_layers(loaded)):
        for ma, mb in zip(a.thresholded_masks(), b.thresholded_masks()):
            np.testing.assert_array_equal(ma, mb)
    manifest = loaded.manifest
    assert manifest["class_names"] == ["a", "b", "c"] and manifest["metrics"] == {"accuracy": 0.5}
    assert manifest["image_size"] == [12, 12, 3]
    assert [entry["name"] for entry in manifest["layers"]] == [
        "c1/kernel", "dw/kernel", "sep/depthwise_kernel", "sep/pointwise_kernel", "fc/kernel"]
    assert 0.05 < manifest["sparsity"] < 0.3


def test_classifier_round_trip(tmp_path):
    model = classifier_only(tiny_backbone(), 3)
    trained_like(model)
    path = os.path.join(tmp_path, "task.npz")
    save_task(model, path)
    np.testing.assert_array_equal(load_task(path, tiny_backbone())(X).numpy(), model(X).numpy())


def test_file_is_pickle_free_npz(tmp_path):
    path = os.path.join(tmp_path, "task.npz")
    save_task(trained_like(piggyback(tiny_backbone(), 3)), path)
    with np.load(path, allow_pickle=False) as data:
        assert {"manifest", "masks", "w0", "w1"} == set(data.files)
        manifest = json.loads(data["manifest"].tobytes().decode("utf-8"))
        assert all(data[key].dtype != object for key in data.files)
    assert manifest["format"] == "tf_piggyback.task" and manifest["version"] == 1
    assert len(manifest["backbone"]["fingerprint"]) == 64


def test_planted_pickle_is_refused(tmp_path):
    path = os.path.join(tmp_path, "task.npz")
    save_task(trained_like(piggyback(tiny_backbone(), 3)), path)
    evil = os.path.join(tmp_path, "evil.npz")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            if name == "w0.npy":
                buffer = io.BytesIO()
                np.save(buffer, np.array([os.system], dtype=object), allow_pickle=True)
                dst.writestr(name, buffer.getvalue())
            else:
                dst.writestr(name, src.read(name))
    with pytest.raises(TaskFileError, match="not a readable tf_piggyback task file"):
        load_task(evil, tiny_backbone())


def test_other_backbone_is_refused_with_the_fix(tmp_path):
    path = os.path.join(tmp_path, "task.npz")
    save_task(trained_like(piggyback(tiny_backbone(), 3)), path)
    other = tiny_backbone()
    other.get_layer("c1").kernel.assign(other.get_layer("c1").kernel * 2)
    with pytest.raises(TaskFileError, match=r"trained on backbone 'tiny' \(fingerprint .*load it with the backbone"):
        load_task(path, other)


@pytest.mark.parametrize("damage", ["truncate", "flip_masks", "flip_head", "empty", "text"])
def test_damaged_file_is_a_clear_error(tmp_path, damage):
    path = os.path.join(tmp_path, "task.npz")
    save_task(trained_like(piggyback(tiny_backbone(), 3)), path)
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage.startswith("flip"):
        with np.load(path) as arrays:
            payload = arrays["masks" if damage == "flip_masks" else "w0"].tobytes()
        offset = data.index(payload) + len(payload) // 2
        data = data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]
    elif damage == "empty":
        data = b""
    else:
        data = b"hello, not a task"
    open(path, "wb").write(data)
    with pytest.raises(TaskFileError, match=r"task\.npz"):
        load_task(path, tiny_backbone())


def test_missing_file_and_wrong_version(tmp_path):
    with pytest.raises(TaskFileError, match="does not exist"):
        read_manifest(os.path.join(tmp_path, "nope.npz"))
    path = os.path.join(tmp_path, "task.npz")
    save_task(trained_like(piggyback(tiny_backbone(), 3)), path)
    with np.load(path) as data:
        arrays = dict(data)
    manifest = json.loads(arrays["manifest"].tobytes())
    manifest["version"] = 99
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(TaskFileError, match="version 99.*reads version 1"):
        read_manifest(path)


def test_save_refuses_models_not_made_here(tmp_path):
    import keras
    with pytest.raises(ValueError, match="was not made by tf_piggyback.piggyback"):
        save_task(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), os.path.join(tmp_path, "t.npz"))


@pytest.mark.parametrize("sparsity", [0.0, 0.04, 0.1, 0.2, 0.34, 0.5, 0.66, 0.96])
def test_mask_coding_near_entropy_bound(sparsity):
    rng = np.random.default_rng(0)
    mask = (rng.random((3, 3, 64, 128)) >= sparsity).astype(np.int8)
    payload, info = coding.encode(mask, "binary")
    np.testing.assert_array_equal(coding.decode(payload, info, mask.shape), mask)
    assert len(payload) <= max(1.10 * coding.entropy_bits(mask) / 8, 1) or info["coding"] == "bits"
    assert len(payload) <= mask.size / 8
    if sparsity not in (0.0, 0.5) and 0.04 <= sparsity <= 0.34 or sparsity in (0.66, 0.96):
        assert len(payload) < mask.size / 8


def test_task_file_size_bounds(tmp_path):
    model = trained_like(piggyback(tiny_backbone(), 3), sparsity=0.1)
    path = os.path.join(tmp_path, "task.npz")
    manifest = save_task(model, path)
    masks = [m for layer in masked_layers(model) for m in layer.thresholded_masks()]
    bound = sum(coding.entropy_bits(m) for m in masks) / 8
    mask_bytes = sum(entry["nbytes"] for entry in manifest["layers"])
    assert mask_bytes <= 1.10 * bound + len(masks)  # at most one padding byte per layer
    n = sum(m.size for m in masks)
    head = sum(w.numpy().nbytes for w in model.get_layer("head").weights)
    assert os.path.getsize(path) <= n / 8 + head + 4096


@pytest.mark.parametrize("mask_type", ["binary", "ternary"])
def test_any_valid_threshold_reloads_the_same_masks(tmp_path, mask_type):
    """A stored mask holds {0, 1} (or {-1, 0, 1}); reloading it at tau = 5 (above 1) once gave
    an all-zero mask. Every valid tau gives back the saved masks; tau outside (0, 1000] is refused."""
    import tf_piggyback as pb

    backbone = pb.digits_backbone()
    model = pb.piggyback(backbone, 3, threshold=5.0, mask_scale=10.0, mask_type=mask_type)
    rng = np.random.default_rng(0)
    for layer in pb.masked_layers(model):
        for mask in layer.masks:
            mask.assign(rng.uniform(-10, 10, mask.shape).astype("float32") * layer.variable_threshold / layer.threshold)
    saved = [m for layer in pb.masked_layers(model) for m in layer.thresholded_masks()]
    path = str(tmp_path / "task.npz")
    pb.save_task(model, path)
    loaded = pb.load_task(path, pb.digits_backbone())
    again = [m for layer in pb.masked_layers(loaded) for m in layer.thresholded_masks()]
    assert all(np.array_equal(a, b) for a, b in zip(saved, again)) and any(m.any() for m in again)
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1000\]"):
        pb.piggyback(backbone, 3, threshold=1e4, mask_scale=2e4)


def test_fingerprint_covers_image_size_and_preprocessing(tmp_path):
    """Same weights are not the same backbone: a task trained at 32 px refuses a 40 px backbone
    (one line naming both sizes), and other preprocessing changes the fingerprint."""
    import keras

    from tf_piggyback import fingerprint
    from tf_piggyback.training.backbones import ImagePreprocessing, load_backbone

    keras.utils.set_random_seed(0)
    small = load_backbone("MobileNetV2", "none", 32)
    keras.utils.set_random_seed(0)
    large = load_backbone("MobileNetV2", "none", 40)
    path = str(tmp_path / "task.npz")
    save_task(piggyback(small, 3), path)
    with pytest.raises(TaskFileError, match=r"trained on 32x32x3 images; the given backbone takes 40x40x3.*--image_size=32"):
        load_task(path, large)

    def with_mode(mode):
        inputs = keras.Input((12, 12, 3))
        model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(ImagePreprocessing(mode)(inputs)))
        model.layers[-1].kernel.assign(np.ones((3, 3, 3, 2), np.float32))
        return model

    assert fingerprint(with_mode("caffe")) != fingerprint(with_mode("tf"))
    assert fingerprint(with_mode("tf")) == fingerprint(with_mode("tf"))


@pytest.mark.parametrize("mask_type", ["binary", "ternary"])
def test_one_threshold_rule_and_one_bit_order_everywhere(mask_type):
    """Training (TensorFlow), storage (NumPy), the TaskBank's unpacking, the TFLite words and the
    on-device export all threshold and pack masks the same way: one definition each, pinned here."""
    import tensorflow as tf

    from tf_piggyback.core.binarizers import threshold_mask, threshold_mask_numpy
    from tf_piggyback.serving.packing import unpack_binary, unpack_ternary

    rng = np.random.default_rng(0)
    real = rng.uniform(-0.02, 0.02, 1001).astype(np.float32)
    mask = threshold_mask_numpy(real, 5e-3, mask_type)
    np.testing.assert_array_equal(threshold_mask(tf.constant(real), 5e-3, mask_type).numpy(), mask)
    payload, info = coding.encode(mask, mask_type)
    np.testing.assert_array_equal(coding.decode(payload, info, mask.shape), mask)
    packed = coding.pack(mask, mask_type)
    np.testing.assert_array_equal(coding.unpack(packed, mask.size, mask_type), mask)
    unpack = unpack_binary if mask_type == "binary" else unpack_ternary
    np.testing.assert_array_equal(unpack(tf.constant(packed)).numpy()[:mask.size], mask)
    bits = coding.unpack_words(tf.constant(coding.pack_words(mask, mask_type)), coding.mask_bits(mask, mask_type).size).numpy()
    np.testing.assert_array_equal(bits, coding.mask_bits(mask, mask_type))


def test_masks_are_read_by_the_path_of_their_kernel(tmp_path):
    """The order of a manifest's entries does not matter: each mask goes to the kernel it names
    (the kernels `c1` and `fc` of the tiny backbone differ in shape, `dw` and `sep` do not)."""
    model = trained_like(piggyback(tiny_backbone(), 3, train_bn=True))
    path = os.path.join(tmp_path, "task.npz")
    save_task(model, path)
    with np.load(path) as data:
        arrays = dict(data)
    manifest = json.loads(arrays["manifest"].tobytes())
    manifest["layers"].reverse()
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    np.savez(path, **arrays)
    loaded = load_task(path, tiny_backbone())
    np.testing.assert_array_equal(loaded(X).numpy(), model(X).numpy())


def test_a_backbone_whose_layers_are_named_otherwise_loads_in_order(tmp_path):
    """Auto-generated layer names (`dense_3`) differ from process to process; the fingerprint
    shows the weights are the same, in the same order, and the masks are read in that order."""
    import keras

    def backbone():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Dense(8, activation="relu")(inputs)))

    first = backbone()
    model = trained_like(piggyback(first, 3))
    path = os.path.join(tmp_path, "task.npz")
    save_task(model, path)
    second = backbone()
    assert [w.path for w in second.weights] != [w.path for w in first.weights]
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    np.testing.assert_array_equal(load_task(path, second)(x).numpy(), model(x).numpy())


@keras.saving.register_keras_serializable(package="tests")
class Scale(keras.layers.Layer):
    """A weightless `x * factor` with no `get_config` of its own: Keras records its constructor
    arguments (its automatic config), and they are all that tells Scale(2.0) from Scale(-100.0)."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor


def scaled_backbone(factor):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(Scale(factor, name="scale")(x))
    return keras.Model(inputs, keras.layers.Dense(6, name="fc")(x), name="scaled")


def _rewrite_backbone_entry(path, entry):
    """The task file at `path` with its manifest's `backbone` replaced, as another writer made it."""
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    manifest = json.loads(arrays["manifest"].tobytes())
    manifest["backbone"] = entry
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    np.savez(path, **arrays)


def test_the_fingerprint_covers_a_custom_layers_settings(tmp_path):
    """Issue 39, 4: a task trained over Scale(2.0) loaded silently over Scale(-100.0) (the
    fingerprint described a layer without a `get_config` of its own by its weights alone, and
    Scale has none). Keras' automatic config now counts; a file written before still loads."""
    from tf_piggyback import fingerprint
    from tf_piggyback.core.fingerprint import lacks_config

    two, minus = scaled_backbone(2.0), scaled_backbone(-100.0)
    assert fingerprint(two) != fingerprint(minus)
    assert fingerprint(two, loose=True) == fingerprint(minus, loose=True)  # the old form is blind to it
    path = str(tmp_path / "task.npz")
    save_task(piggyback(two, 3), path)
    assert set(read_manifest(path)["backbone"]) == {"name", "fingerprint", "loose_fingerprint"}
    with pytest.raises(TaskFileError, match="was trained on backbone 'scaled'"):
        load_task(path, minus)
    two.save(tmp_path / "two.keras")  # Keras keeps the automatic config in a .keras file
    loaded = keras.models.load_model(tmp_path / "two.keras")
    assert not lacks_config(loaded) and fingerprint(loaded) == fingerprint(two)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(load_task(path, loaded)(x).numpy(), load_task(path, two)(x).numpy(), atol=1e-6)

    # A file from before: its fingerprint is the loose form, and it still loads (over either: it cannot tell).
    _rewrite_backbone_entry(path, {"name": "scaled", "fingerprint": fingerprint(two, loose=True)})
    assert load_task(path, two).output_shape == (None, 3)
