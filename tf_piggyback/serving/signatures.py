"""What every exported signature is (BUILD.md, "Interfaces"): `image` in (float32 `[None, H, W, C]`, raw
0-255 pixels; the backbone's preprocessing is inside), `logits` and `probabilities` out. A
backbone that takes a dict (keras-hub's text backbones) takes its entries by name instead."""

import re

import tensorflow as tf


def image_spec(model):
    """The `image` input of a signature over `model` (a Keras model or an image shape `(H, W, C)`)."""
    shape = tuple(model) if isinstance(model, (tuple, list)) else tuple(model.inputs[0].shape[1:])
    return tf.TensorSpec([None, *shape], tf.float32, name="image")


def input_spec(model):
    """A signature's input over `model`: `image_spec(model)`, or for a model that takes a dict one
    named tensor per entry (keras-hub BERT: int32 `token_ids`, `segment_ids`, `padding_mask`)."""
    if isinstance(model.input, dict):
        return {name: tf.TensorSpec(tensor.shape, tensor.dtype, name=name) for name, tensor in model.input.items()}
    return image_spec(model)


def outputs(logits):
    """A signature's outputs for `logits`."""
    return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}


def signature(forward, spec, name):
    """`tf.function` of `forward` (image -> outputs) named `name` (TFLite names each signature
    after its function)."""
    def serve(image):
        return forward(image)

    serve.__name__ = name
    return tf.function(serve, input_signature=[spec])


def with_outputs(forward):
    """`forward` (image -> logits) as image -> `outputs`."""
    return lambda image: outputs(forward(image))


def save(module, path, signatures, name):
    """`tf.saved_model.save`, refusing in one line a model `name` that cannot be traced over
    inputs of unknown size (a layer looping in Python over a sequence's length: keras-hub 0.32's
    RWKV-7) instead of raising TensorFlow's page-long `TypeError`."""
    try:
        tf.saved_model.save(module, path, signatures=signatures)
    except TypeError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
        last = max((i for i, line in enumerate(lines) if line.startswith("TypeError")), default=len(lines) - 1)
        cause = " ".join(line for line in lines[last:last + 3] if line).removeprefix("TypeError: ")
        raise ValueError(f"{name} cannot be traced into a signature over inputs of unknown size ({cause}); its "
                         "tasks train and save, but do not export") from None
