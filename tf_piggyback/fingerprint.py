"""A SHA-256 fingerprint of a backbone, so a task is never applied to the wrong one."""

import hashlib
import inspect
import json

import keras
import numpy as np

# Config keys that do not change what a layer computes: names (Keras numbers unnamed layers by
# creation order), the trainable flag (surgery freezes layers) and the dtype policy (a
# mixed-precision run's task is an ordinary float32 task).
_IGNORED = ("name", "trainable", "dtype")


def architecture(model):
    """A canonical description of `model`: its input shapes and, layer by layer in order, each
    layer's type and config (preprocessing included: `ImagePreprocessing`'s mode, `Rescaling`'s
    scale), with names, trainable flags and dtype policies left out."""
    layers = []

    def visit(layer):
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)
            return
        config = {k: v for k, v in _config(layer).items() if k not in _IGNORED}
        layers.append([type(layer).__name__, config])

    for layer in model.layers:
        visit(layer)
    inputs = [list(tensor.shape[1:]) for tensor in model.inputs]
    return json.dumps({"inputs": inputs, "layers": layers}, sort_keys=True, default=str)


def _config(layer):
    """`layer.get_config()`; for a layer whose class leaves `get_config` to Keras, which records
    the `__init__` arguments only when they were all serializable (keras-hub 0.32's
    `RMSNormalization` loaded from a `.keras` file is given a `DTypePolicy` object), those
    arguments read back from the layer's attributes of the same names: what the recorded config
    held, so a backbone built in code and the same one loaded from a file agree."""
    try:
        return layer.get_config()
    except NotImplementedError:
        parameters = inspect.signature(type(layer).__init__).parameters
        return {name: getattr(layer, name) for name in parameters if name != "self" and hasattr(layer, name)}


def fingerprint(model):
    """Hex SHA-256 over `architecture(model)`, then every weight's dtype, shape and bytes, in the
    model's weight order: another input size, preprocessing, pooling or layer setting gives
    another fingerprint, as other weights do.
    """
    digest = hashlib.sha256(architecture(model).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def check_backbone(backbone, manifest, path, error=ValueError, actual=None):
    """Raises `error` (one line naming both sides) unless `backbone` is the one a file's
    `manifest` was made on: first its image size (`manifest["image_size"]`, when recorded),
    then its fingerprint (`manifest["backbone"]`; `actual`, when given, is the backbone's,
    computed once by a caller that checks many files against one backbone)."""
    size = list(backbone.inputs[0].shape[1:])
    trained = manifest.get("image_size")
    if trained is not None and list(trained) != size:
        raise error(f"{path!r} was trained on {'x'.join(map(str, trained))} images; the given backbone takes "
                    f"{'x'.join(map(str, size))}: build it at the task's size (--image_size={trained[0]})")
    expected = manifest["backbone"]
    actual = fingerprint(backbone) if actual is None else actual
    if actual != expected["fingerprint"]:
        raise error(f"{path!r} was trained on backbone {expected['name']!r} (fingerprint "
                    f"{expected['fingerprint'][:12]}), not on the given {backbone.name!r} (fingerprint "
                    f"{actual[:12]}); load it with the backbone, weights and preprocessing it was trained on")
