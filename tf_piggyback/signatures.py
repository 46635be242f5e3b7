"""What every exported signature is (DESIGN 3.5): `image` in (float32 `[None, H, W, C]`, raw
0-255 pixels; the backbone's preprocessing is inside), `logits` and `probabilities` out."""

import tensorflow as tf


def image_spec(model):
    """The `image` input of a signature over `model` (a Keras model or an image shape `(H, W, C)`)."""
    shape = tuple(model) if isinstance(model, (tuple, list)) else tuple(model.inputs[0].shape[1:])
    return tf.TensorSpec([None, *shape], tf.float32, name="image")


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
