import keras
import numpy as np
import pytest

from conftest import tiny_backbone
from tf_piggyback import bake, classifier_only, finetune, fingerprint, masked_layers, piggyback
from tf_piggyback.core.layers import MaskedWrapper
import tensorflow as tf

from tf_piggyback.training.trainer import TrainConfig, epoch_batches, train

# Every model keras.applications has, at a small input size (their smallest, where above 32).
SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
FAST = {"ResNet50", "VGG16", "DenseNet121", "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
        "EfficientNetB0", "ConvNeXtTiny"}
APPLICATIONS = [pytest.param(name, SIZES.get(name, 32), marks=() if name in FAST else pytest.mark.slow)
                for name in sorted(dir(keras.applications))
                if name[0].isupper() and callable(getattr(keras.applications, name))]


def features_of(model):
    """The task model without its head: the masked backbone's output."""
    return keras.Model(model.input, model.get_layer("head").input)


def test_every_keras_application_is_listed():
    assert len(APPLICATIONS) >= 40 and {"MobileNetV3Small", "ConvNeXtTiny", "NASNetLarge"} <= {
        p.values[0] for p in APPLICATIONS}


@pytest.mark.parametrize("name,size", APPLICATIONS)
def test_surgery_on_keras_applications(name, size, tmp_path):
    """Every kernel masked, the first forward equal to the backbone's, random masks reloaded
    from a task file and baked exactly, the backbone unchanged."""
    from tf_piggyback import load_task, save_task
    from benchmarks.suite import paper_sparsities

    backbone = getattr(keras.applications, name)(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
    before = [w.numpy().copy() for w in backbone.weights]
    model = piggyback(backbone, num_classes=3)
    kernels = [layer for layer in backbone.layers if any(w.path.endswith("kernel") for w in layer.weights)]
    assert len(masked_layers(model)) == len(kernels) > 0
    trainable = {w.path.rsplit("/", 1)[-1] for w in model.trainable_weights}
    assert trainable <= {"mask", "depthwise_kernel_mask", "pointwise_kernel_mask", "kernel", "bias"}
    assert sum(1 for w in model.trainable_weights if not w.path.endswith("mask")) == 2  # head only
    x = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype("float32")
    # The constant init (1e-2 >= tau) gives all-ones masks: the first forward equals the backbone.
    np.testing.assert_allclose(features_of(model)(x), backbone(x), rtol=1e-4, atol=1e-4)
    paper_sparsities(model)
    save_task(model, str(tmp_path / "task.npz"))
    np.testing.assert_array_equal(load_task(str(tmp_path / "task.npz"), backbone)(x), model(x))
    np.testing.assert_allclose(bake(model)(x), model(x), rtol=1e-5, atol=1e-5)
    for value, weight in zip(before, backbone.weights):
        np.testing.assert_array_equal(value, weight.numpy())


def test_backbone_bit_identical_after_training():
    backbone = tiny_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    fp = fingerprint(backbone)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 3, 64)
    for method, build, kwargs in [("piggyback", piggyback, {}), ("piggyback", piggyback, {"train_bn": True}),
                                  ("classifier", classifier_only, {}), ("finetune", finetune, {})]:
        model = build(backbone, 3, **kwargs)
        config = TrainConfig(method=method, epochs=2, batch_size=16, mask_lr=1e-2, head_lr=1e-2)
        batches = epoch_batches(tf.data.Dataset.from_tensor_slices((x, y)), 16)
        train(model, batches, config, log=lambda line: None)
        if method == "piggyback":  # the masks did learn something
            assert any(m.min() == 0 for layer in masked_layers(model) for m in layer.thresholded_masks())
    for a, b in zip(before, backbone.weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert fingerprint(backbone) == fp


def test_train_bn_gives_the_task_its_own_batchnorm():
    backbone = tiny_backbone()
    shared = piggyback(backbone, 3)
    own = piggyback(backbone, 3, train_bn=True)
    assert shared.get_layer("bn1") is backbone.get_layer("bn1") and not shared.get_layer("bn1").trainable
    bn = own.get_layer("bn1")
    assert bn is not backbone.get_layer("bn1") and bn.trainable
    np.testing.assert_array_equal(bn.moving_variance.numpy(), backbone.get_layer("bn1").moving_variance.numpy())
    assert {"bn1/gamma", "bn1/beta", "bn2/gamma", "bn2/beta"} <= {w.path for w in own.trainable_weights}


def test_a_task_model_bakes_from_its_own_backbone_whatever_was_built_since():
    """`bake` copies a task's layers from one copy of its backbone through keras.saving. It found
    that backbone in process-wide state keyed by layer, which the last backbone to hold a layer
    overwrote: a task built later on a model holding the same backbone and a layer keras.saving
    cannot load made the first task's `bake` refuse. Each task model now carries its own."""

    class Unregistered(keras.layers.Layer):  # not registered: its model does not load back
        def call(self, x):
            return x

    backbone = tiny_backbone()
    model = piggyback(backbone, 3, mask_init="uniform", mask_scale=0.02)
    image = keras.Input(backbone.input.shape[1:])
    piggyback(keras.Model(image, Unregistered()(backbone(image))), 4)
    x = np.random.default_rng(0).normal(size=(4, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(bake(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_tasks_share_backbone_weights():
    backbone = tiny_backbone()
    a, b = piggyback(backbone, 3), piggyback(backbone, 4)
    assert a.get_layer("c1").layer.kernel is b.get_layer("c1").layer.kernel is backbone.get_layer("c1").kernel
    assert a.get_layer("c1").masks[0] is not b.get_layer("c1").masks[0]


@pytest.mark.parametrize("mask_type", ["binary", "ternary"])
def test_bake_equals_masked_model_and_has_no_masks(mask_type):
    backbone = tiny_backbone()
    model = piggyback(backbone, 3, mask_type=mask_type, mask_init="uniform", mask_scale=0.02)
    x = np.random.default_rng(0).normal(size=(4, 12, 12, 3)).astype("float32")
    plain = bake(model)
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(layer, MaskedWrapper) for layer in plain.layers)
    assert not any("mask" in w.path for w in plain.weights)


def test_unsupported_layers_are_listed_by_name():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="ok")(inputs)
    x = keras.layers.Conv2DTranspose(4, 3, name="up")(x)  # masked (MaskedLayer)
    x = keras.layers.Conv1D(2, 3, padding="causal", name="causal")(keras.layers.Reshape((-1, 4))(x))
    x = keras.layers.SimpleRNN(3, name="rnn")(x)
    backbone = keras.Model(inputs, x)
    with pytest.raises(ValueError, match=r"causal \(Conv1D\), rnn \(SimpleRNN\).*skip_unsupported=True"):
        piggyback(backbone, 2)
    model = piggyback(backbone, 2, skip_unsupported=True)
    assert [layer.name for layer in masked_layers(model)] == ["ok", "up"]


def test_classifier_backbone_is_refused_with_the_fix():
    backbone = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4)
    with pytest.raises(ValueError, match="include_top=False"):
        piggyback(backbone, 3)
    model = piggyback(backbone, 3, feature_layer=backbone.layers[-2].name)  # the pooling
    assert model.output.shape == (None, 3)
    with pytest.raises(ValueError, match="feature_layer 'nope' is not a layer"):
        piggyback(backbone, 3, feature_layer="nope")


def test_num_classes_validated():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        piggyback(tiny_backbone(), 1)


@pytest.mark.parametrize("name,module", [("ResNet50", "resnet50"), ("MobileNetV2", "mobilenet_v2"),
                                         ("DenseNet121", "densenet"), ("EfficientNetB0", "efficientnet")])
def test_load_backbone_takes_raw_pixels(name, module):
    from tf_piggyback.training.backbones import load_backbone

    backbone = load_backbone(name, weights="none", image_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    # the same network and weights, built as keras.applications builds it, fed preprocessed pixels
    plain = getattr(keras.applications, name)(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    plain.set_weights(backbone.get_weights())
    expected = plain(getattr(keras.applications, module).preprocess_input(x.copy()))
    np.testing.assert_allclose(backbone(x), expected, rtol=1e-4, atol=1e-4)
    model = piggyback(backbone, 3)
    np.testing.assert_allclose(features_of(model)(x), expected, rtol=1e-4, atol=1e-4)


def test_vgg_keeps_fc6_and_fc7_and_replaces_only_the_classifier():
    """Table 2 and Fig. 3 mask VGG-16's fc6 and fc7; classifier-only reads fc7's features."""
    from tf_piggyback.training.backbones import load_backbone

    import tf_piggyback as pb

    vgg = load_backbone("VGG16", "none", 32)
    assert vgg.output.shape[-1] == 4096 and vgg.layers[-1].name == "fc2"
    masked = [layer.name for layer in pb.masked_layers(pb.piggyback(vgg, 5))]
    assert masked[-2:] == ["fc1", "fc2"] and len(masked) == 15  # 13 convolutions, fc6, fc7
    assert pb.classifier_only(vgg, 5).get_layer("head").kernel.shape == (4096, 5)
    with pytest.raises(ValueError, match="imagenet weights takes 224 px images"):
        load_backbone("VGG16", "imagenet", 64)
    # a flat keras.applications backbone: any inner layer can feed the head
    resnet = load_backbone("ResNet50", "none", 32)
    assert pb.piggyback(resnet, 5, feature_layer="conv4_block6_out").output.shape[-1] == 5


def test_composite_layers_mask_every_kernel_they_own(tmp_path):
    """A user's `Layer` subclass holding `Dense` layers (one nested a level deeper) beside
    operations: every kernel it owns is masked without the library knowing its class; random
    masks reload from the task file in a fresh process exactly, bake exactly; the backbone
    is unchanged."""
    import subprocess
    import sys

    from conftest import REPO, composite_backbone
    from tf_piggyback import load_task, read_manifest, save_task
    from benchmarks.suite import paper_sparsities

    backbone = composite_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    model = piggyback(backbone, 3)
    kernels = sorted(w.path for w in backbone.weights if w.path.endswith("kernel"))
    assert len(kernels) == 7
    assert sorted(k.path for layer in masked_layers(model) for k in layer.kernels) == kernels
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(features_of(model)(x), backbone(x), rtol=1e-5, atol=1e-5)
    paper_sparsities(model)
    task = str(tmp_path / "task.npz")
    save_task(model, task)
    assert sorted(entry["name"] for entry in read_manifest(task)["layers"]) == kernels
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np; sys.path.insert(0, 'tests'); import tf_piggyback as pb; "
              "from conftest import composite_backbone; "
              f"m = pb.load_task({task!r}, composite_backbone()); "
              f"np.save({str(tmp_path / 'y.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})).numpy())")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model(x).numpy())
    np.testing.assert_array_equal(load_task(task, backbone)(x), model(x))
    np.testing.assert_allclose(bake(model)(x), model(x), rtol=1e-5, atol=1e-5)
    for value, weight in zip(before, backbone.weights):
        np.testing.assert_array_equal(value, weight.numpy())


def test_embedding_tables_are_masked_unless_asked_not_to(tmp_path):
    """A text backbone's `Embedding` table gets a mask like a kernel (reloaded exactly, baked
    exactly); `mask_embeddings=False` leaves it frozen and shared, and the task file says which."""
    from tf_piggyback import MaskedEmbedding, load_task, read_manifest, save_task
    from benchmarks.suite import paper_sparsities

    keras.utils.set_random_seed(5)
    tokens = keras.Input((12,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(50, 16, name="embed")(tokens)
    x = keras.layers.Dense(16, activation="gelu", name="fc")(x)
    backbone = keras.Model(tokens, keras.ops.mean(x, axis=1), name="text")
    ids = np.random.default_rng(0).integers(0, 50, (4, 12)).astype("int32")
    model = piggyback(backbone, 3)
    assert [type(layer).__name__ for layer in masked_layers(model)] == ["MaskedEmbedding", "MaskedDense"]
    np.testing.assert_allclose(features_of(model)(ids), backbone(ids), rtol=1e-5, atol=1e-5)
    paper_sparsities(model)
    save_task(model, str(tmp_path / "task.npz"))
    manifest = read_manifest(str(tmp_path / "task.npz"))
    assert [entry["name"] for entry in manifest["layers"]] == ["embed/embeddings", "fc/kernel"]
    assert manifest["options"]["mask_embeddings"] is True
    np.testing.assert_array_equal(load_task(str(tmp_path / "task.npz"), backbone)(ids), model(ids))
    np.testing.assert_allclose(bake(model)(ids), model(ids), rtol=1e-5, atol=1e-5)
    frozen = piggyback(backbone, 3, mask_embeddings=False)
    assert not any(isinstance(layer, MaskedEmbedding) for layer in masked_layers(frozen))
    assert frozen.get_layer("embed") is backbone.get_layer("embed") and not frozen.get_layer("embed").trainable
