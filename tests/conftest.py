import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))  # the benchmarks (scripts/benchmarks), outside the package


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def tiny_backbone(name="tiny"):
    """A small functional backbone with every supported layer type and BatchNormalization.

    Seeded: every call gives the same weights, as reloading one backbone would.
    """
    keras.utils.set_random_seed(1234)
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.SeparableConv2D(8, 3, name="sep")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    model = keras.Model(inputs, x, name=name)
    # Non-trivial BatchNormalization statistics, so inference vs training mode differ.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, var = layer.moving_mean, layer.moving_variance
            mean.assign(keras.random.normal(mean.shape) * 0.1)
            var.assign(keras.random.uniform(var.shape, 0.5, 1.5))
    return model


def random_masks(model, seed, sparsity=0.3):
    """Sets `model`'s masks at random, as if trained: a fraction `sparsity` of each off."""
    import numpy as np

    from tf_piggyback.core.surgery import masked_layers

    rng = np.random.default_rng(seed)
    for layer in masked_layers(model):
        for mask in layer.masks:
            mask.assign(layer.mask_value(rng.random(mask.shape) >= sparsity))
    return model


def digits_task_files(root, classifier_classes=4, count=12):
    """Random-mask digits tasks of every kind a bank holds, saved under `root`: binary (3 classes),
    ternary (4), per-task BatchNormalization with changed statistics (5) and classifier-only
    (`classifier_classes`); returns `(paths by name, count images, each task's baked logits)`."""
    import numpy as np

    import tf_piggyback as pb
    from tf_piggyback.core.layers import MASK_VARIABLE_SCALE

    kinds = {"bin": dict(), "ter": dict(mask_type="ternary"), "bn": dict(train_bn=True)}
    rng = np.random.default_rng(0)
    backbone = pb.digits_backbone()
    paths = {}
    for classes, (name, options) in enumerate(kinds.items(), start=3):
        model = pb.piggyback(backbone, classes, **options)
        for layer in pb.masked_layers(model):
            for mask in layer.masks:
                mask.assign(rng.uniform(-0.01, 0.02, mask.shape).astype("float32") * MASK_VARIABLE_SCALE)
        for layer in model.layers:
            if options.get("train_bn") and "bn" in layer.name:
                layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape).astype("float32"))
        head = model.get_layer("head")
        head.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in head.get_weights()])
        paths[name] = str(root / name / "task.npz")
        pb.save_task(model, paths[name])
    classifier = pb.classifier_only(backbone, classifier_classes)
    classifier.get_layer("head").set_weights([rng.normal(0, 0.3, w.shape).astype("float32")
                                              for w in classifier.get_layer("head").get_weights()])
    paths["cls"] = str(root / "cls" / "task.npz")
    pb.save_task(classifier, paths["cls"])
    images = rng.uniform(0, 255, (count, 32, 32, 1)).astype("float32")
    expected = {name: pb.bake(pb.load_task(path, pb.digits_backbone()))(images).numpy() for name, path in paths.items()}
    return paths, images, expected


def tflite_ops(path):
    """Names of the operators in a `.tflite` file, read with TensorFlow's public model analyzer."""
    import contextlib
    import io
    import re

    import tensorflow as tf

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_path=path)
    return set(re.findall(r"Op#\d+ (\w+)\(", text.getvalue()))


@keras.saving.register_keras_serializable(package="tests")
class Block(keras.layers.Layer):
    """A user's own composite layer: a pre-norm residual MLP whose kernels live in sublayers,
    one of them nested in a sublayer of its own (`mlp`)."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.mlp = keras.Sequential([keras.layers.Dense(2 * width, activation="gelu", name="fc1"),
                                     keras.layers.Dense(width, name="fc2")], name="mlp")
        self.gate = keras.layers.Dense(width, activation="sigmoid", name="gate")

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.mlp.build(input_shape)
        self.gate.build(input_shape)

    def call(self, x):
        return x + self.mlp(self.norm(x)) * self.gate(x)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def composite_backbone():
    """A functional backbone built from `Block`s, seeded: the same weights in every process."""
    keras.utils.set_random_seed(4321)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    x = keras.layers.Reshape((64, 16))(x)
    x = Block(16, name="block1")(x)
    x = Block(16, name="block2")(x)
    x = keras.ops.mean(x, axis=1)
    return keras.Model(inputs, x, name="composite")
