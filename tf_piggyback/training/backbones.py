"""Backbones: the embedded digits CNN and ViT (pretrained weights shipped with the package).

The digits backbone plays the role of the paper's ImageNet-trained VGG/ResNet at laptop scale:
four conv+BN blocks and a fully-connected layer, trained on digits 0-4 (`digits:base`). The
digits ViT is its transformer counterpart (patch embedding, two pre-norm blocks of
`MultiHeadAttention` and an `EinsumDense` MLP), trained the same way. Their weights are
shipped, so every process and machine sees the same backbones and fingerprints;
`pretrain_digits_backbone` regenerates them (`python -m tf_piggyback.training.backbones`).
"""

import os

import keras
import numpy as np

from tf_piggyback.data.datasets import DIGITS_IMAGE_SIZE, load_digits_variant
from tf_piggyback.data.text import is_preset, load_preset

# keras.applications module -> the preprocess_input mode its weights expect; families not listed
# (EfficientNet, ConvNeXt, MobileNetV3, RegNet) preprocess inside the model already.
PREPROCESSING = {
    "resnet": "caffe", "vgg16": "caffe", "vgg19": "caffe", "densenet": "torch", "resnet_v2": "tf",
    "mobilenet": "tf", "mobilenet_v2": "tf", "inception_v3": "tf", "inception_resnet_v2": "tf",
    "xception": "tf", "nasnet": "tf",
}


@keras.saving.register_keras_serializable(package="tf_piggyback")
class ImagePreprocessing(keras.layers.Layer):
    """`keras.applications` `preprocess_input` as a layer, so models take raw 0-255 RGB pixels.

    Args:
        mode: `"caffe"` (RGB->BGR, minus the ImageNet mean), `"tf"` (to [-1, 1]), `"torch"`
            (to [0, 1], then per-channel ImageNet standardization) or `"none"`.
    """

    MODES = ("caffe", "tf", "torch", "none")

    def __init__(self, mode="none", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}. Received: mode={mode!r}")
        self.mode = mode

    def call(self, images):
        if self.mode == "caffe":
            return images[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "torch":
            return (images / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
                [0.229, 0.224, 0.225], np.float32)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# keras.applications modules whose models have fully-connected layers before the classifier,
# and the last of them (VGG's fc7): the features a task's head reads.
FULLY_CONNECTED = {"vgg16": "fc2", "vgg19": "fc2"}

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")  # tf_piggyback/assets
DIGITS_WEIGHTS = os.path.join(ASSETS, "digits_backbone.weights.h5")
DIGITS_FEATURES = 128


def build_digits_backbone():
    """The digits backbone's architecture, untrained: raw 0-255 pixels in, 128 features out."""
    inputs = keras.Input((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for i, filters in enumerate((32, 32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if i < 4:
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(DIGITS_FEATURES, activation="relu", name="fc")(x)
    return keras.Model(inputs, x, name="digits")


@keras.saving.register_keras_serializable(package="tf_piggyback")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding per token position to `[batch, tokens, dim]` inputs (initialised
    with a fixed seed, so a random digits ViT is the same in every process)."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=tuple(input_shape[1:]),
                                          initializer=keras.initializers.RandomNormal(stddev=0.02, seed=0))

    def call(self, tokens):
        return tokens + self.embeddings

    def compute_output_shape(self, input_shape):
        return input_shape


DIGITS_VIT_WEIGHTS = os.path.join(ASSETS, "digits_vit.weights.h5")
VIT_PATCH, VIT_DIM, VIT_HEADS, VIT_BLOCKS = 4, 64, 4, 2
VIT_TOKENS = (DIGITS_IMAGE_SIZE // VIT_PATCH) ** 2


def build_digits_vit():
    """The digits ViT's architecture, untrained: raw 0-255 pixels in, 64 features out.

    4x4 patches (a strided convolution) plus position embeddings, two pre-norm transformer
    blocks (`MultiHeadAttention`, then an `EinsumDense` MLP of width 128 with GELU), a final
    LayerNormalization; the head averages the 64 tokens.
    """
    inputs = keras.Input((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(VIT_DIM, VIT_PATCH, strides=VIT_PATCH, name="patches")(x)
    x = keras.layers.Reshape((VIT_TOKENS, VIT_DIM), name="tokens")(x)
    x = PositionEmbedding(name="position")(x)
    for i in range(1, VIT_BLOCKS + 1):
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = keras.layers.MultiHeadAttention(VIT_HEADS, VIT_DIM // VIT_HEADS, name=f"block{i}_attention")(h, h)
        x = keras.layers.Add(name=f"block{i}_add1")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = keras.layers.EinsumDense("btd,df->btf", (VIT_TOKENS, 2 * VIT_DIM), bias_axes="f", activation="gelu",
                                     name=f"block{i}_mlp1")(h)
        h = keras.layers.EinsumDense("btf,fd->btd", (VIT_TOKENS, VIT_DIM), bias_axes="d", name=f"block{i}_mlp2")(h)
        x = keras.layers.Add(name=f"block{i}_add2")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    return keras.Model(inputs, x, name="digits_vit")


def _seeded(model):
    """`model` with seeded random kernels: the same in every process (Table 5's random backbone)."""
    for i, w in enumerate(model.weights):
        if w.path.endswith("kernel"):
            w.assign(keras.initializers.GlorotUniform(seed=i)(w.shape))
    return model


def digits_vit_backbone(weights="pretrained"):
    """The digits ViT, with the shipped pretrained weights or (`weights=None`) seeded random ones.

    Example:
    >>> backbone = digits_vit_backbone()
    >>> backbone.output_shape
    (None, 64, 64)
    """
    model = build_digits_vit()
    if weights == "pretrained":
        model.load_weights(DIGITS_VIT_WEIGHTS)
        return model
    if weights is None:
        return _seeded(model)
    raise ValueError(f"weights must be 'pretrained' or None. Received: weights={weights!r}")


def digits_backbone(weights="pretrained"):
    """The digits backbone, with the shipped pretrained weights or (`weights=None`) random ones.

    Example:
    >>> import tf_piggyback as pb
    >>> backbone = digits_backbone()
    >>> model = pb.piggyback(backbone, num_classes=5)
    >>> backbone.input_shape
    (None, 32, 32, 1)
    """
    model = build_digits_backbone()
    if weights == "pretrained":
        model.load_weights(DIGITS_WEIGHTS)
    elif weights is None:
        # Seeded, so the random backbone (Table 5) is the same in every process and task files
        # trained on it load anywhere.
        _seeded(model)
    else:
        raise ValueError(f"weights must be 'pretrained' or None. Received: weights={weights!r}")
    return model


def pretrain_digits_backbone(epochs=30, seed=0, log=print, build=build_digits_backbone):
    """Trains a fresh digits backbone (or `build()`'s) on `digits:base`; returns
    `(backbone, test accuracy)`."""
    keras.utils.set_random_seed(seed)
    backbone = build()
    pooled = [keras.layers.GlobalAveragePooling1D(name="base_pool")] if len(backbone.output_shape) == 3 else []
    model = keras.Sequential([backbone, *pooled, keras.layers.Dense(5, name="base_head")])
    (x, y), (xt, yt), _ = load_digits_variant("base")
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    accuracy = float(np.mean(np.argmax(model.predict(xt, verbose=0), -1) == yt))
    log(f"{backbone.name} backbone pretrained on digits:base for {epochs} epochs: test accuracy {accuracy:.4f}")
    return backbone, accuracy


def load_backbone(name, weights="imagenet", image_size=None):
    """A headless backbone from a name: `digits`, a `keras.applications` model, a `.keras` file or a
    keras-hub preset (`text.load_preset`: an image preset's converter inside, so it takes raw pixels).

    Every backbone takes raw 0-255 pixels: a `keras.applications` model gets its own
    `preprocess_input` in front, as an `ImagePreprocessing` layer, and global average pooling;
    VGG16/VGG19 keep their fully-connected fc6 and fc7 (`fc1`, `fc2` in Keras) and lose only
    the 1000-way classifier, as in the paper's Table 2.

    Args:
        name: `"digits"`, `"digits_vit"`, e.g. `"ResNet50"` (any `keras.applications` callable), a path
            ending in `.keras`, or a keras-hub preset (a `kaggle://` or `hf://` handle, or a folder
            `save_to_preset` wrote).
        weights: for `keras.applications`: `"imagenet"`, `"none"` or a weights file path;
            for `digits` and `digits_vit`: `"none"` gives the seeded random backbone of Table 5's
            experiment.
        image_size: for `keras.applications`: input height and width (default 224).

    Example:
    >>> backbone = load_backbone("MobileNetV2", weights="none", image_size=96)
    """
    if name in ("digits", "digits_vit"):  # --weights=none: random, as in Table 5
        make = digits_backbone if name == "digits" else digits_vit_backbone
        return make(None if weights in (None, "none") else "pretrained")
    if is_preset(name):
        return load_preset(name)[0]
    if name.endswith(".keras"):
        if not os.path.isfile(name):
            raise ValueError(f"backbone file {name!r} does not exist")
        return keras.models.load_model(name, safe_mode=True, compile=False)
    factory = getattr(keras.applications, name, None)
    if not callable(factory):
        raise ValueError(
            f"unknown backbone {name!r}; use 'digits', a keras.applications name such as "
            "'ResNet50' or 'MobileNetV2', a path to a .keras file, or a keras-hub preset"
        )
    size = image_size or 224
    weights = None if weights in (None, "none") else weights
    module = factory.__module__.rsplit(".", 1)[-1]
    mode = PREPROCESSING.get(module, "none")
    inputs = keras.Input((size, size, 3), name="image")
    # Built on the preprocessing layer's output (input_tensor), so the model is flat: any of
    # its layers can be named as a feature_layer.
    preprocessed = ImagePreprocessing(mode, name="preprocessing")(inputs)
    if module in FULLY_CONNECTED:
        # The paper masks VGG's fc6 and fc7 (Table 2, Fig. 3) and classifier-only reads fc7:
        # build the top and drop only the 1000-way classifier.
        if weights == "imagenet" and size != 224:
            raise ValueError(f"{name} with its fully-connected layers and imagenet weights takes 224 px images; "
                             f"pass --image_size=224. Received: image_size={size}")
        base = factory(weights=weights, include_top=True, input_tensor=preprocessed, input_shape=(size, size, 3))
        return keras.Model(inputs, base.get_layer(FULLY_CONNECTED[module]).output, name=base.name)
    base = factory(weights=weights, include_top=False, pooling="avg", input_tensor=preprocessed,
                   input_shape=(size, size, 3))  # input_shape: keras.applications checks its minimum size
    return keras.Model(inputs, base.output, name=base.name)

if __name__ == "__main__":
    for build, path in ((build_digits_backbone, DIGITS_WEIGHTS), (build_digits_vit, DIGITS_VIT_WEIGHTS)):
        trained, _ = pretrain_digits_backbone(build=build)
        trained.save_weights(path)
        print(f"wrote {path}")
