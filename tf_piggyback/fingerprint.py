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


def _layers(model):
    """The layers of `model` in order, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def _describe(layers, inputs, config, strip=lambda config: {k: v for k, v in config.items() if k not in _IGNORED}):
    text = [[type(layer).__name__, strip(config(layer))] for layer in layers]
    return json.dumps({"inputs": inputs, "layers": text}, sort_keys=True, default=str)


def _strip(value):
    """`value` without `_IGNORED` keys at any depth: a composite layer's config holds its sublayers'
    (keras-hub 0.32's MiT encoder: its MLP's trainable flag, which freezing the backbone changes)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _IGNORED}
    return [_strip(v) for v in value] if isinstance(value, (list, tuple)) else value


def architecture(model):
    """A canonical description of `model`: its input shapes and, layer by layer in order, each
    layer's type and what describes it: the config its class serializes (preprocessing included:
    `ImagePreprocessing`'s mode, `Rescaling`'s scale), with names, trainable flags and dtype
    policies left out at any depth; for a layer with none, its weights' names, shapes and dtypes (`_config`).
    Built only from what every Keras layer has, it never fails (BUILD.md, "Which backbones work")."""
    return _describe(_layers(model), [list(tensor.shape[1:]) for tensor in model.inputs], _config, _strip)


def _config(layer):
    """`layer.get_config()` where its class writes one. A class that leaves it to Keras has an
    automatic config only when every `__init__` argument was serializable, so the same layer
    built in code and loaded from a `.keras` file (given a `DTypePolicy` object) would differ
    (keras-hub 0.32's `RMSNormalization`; its `DeiTEncoder` never has one); such a layer, and
    one whose `get_config` fails (keras-hub 0.32 Swin's layers hold a class where a layer is
    expected), is described by its weights' names, shapes and dtypes instead."""
    if type(layer).get_config is not keras.layers.Layer.get_config:
        try:
            return layer.get_config()
        except Exception:  # a family's broken get_config: described by its weights, as below
            pass
    return {"weights": [[w.name, list(w.shape), str(w.dtype)] for w in layer.weights]}


def _digest(description, model):
    digest = hashlib.sha256(description.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def fingerprint(model):
    """Hex SHA-256 over `architecture(model)`, then every weight's dtype, shape and bytes, in the
    model's weight order: another input size, preprocessing, pooling or layer setting gives
    another fingerprint, as other weights do.
    """
    return _digest(architecture(model), model)


def _old_config(layer):
    """How task files written before BUILD.md's "Which backbones work" described a layer: its
    `get_config()`, or when that raised `NotImplementedError`, the layer's attributes named like
    its `__init__` arguments."""
    try:
        return layer.get_config()
    except NotImplementedError:
        parameters = inspect.signature(type(layer).__init__).parameters
        return {name: getattr(layer, name) for name in parameters if name != "self" and hasattr(layer, name)}


def old_fingerprint(model):
    """The fingerprint task files written before BUILD.md's "Which backbones work" record (it
    differs from `fingerprint` where a layer has no config of its class's own: keras-hub Gemma's
    `RMSNormalization`), or None where it cannot be computed (it crashed on keras-hub DeiT, Swin
    and Llama 3; no file holds one of theirs)."""
    try:
        return _digest(_describe(_layers(model), [list(t.shape[1:]) for t in model.inputs], _old_config), model)
    except Exception:  # the old description failed on this backbone, so no old file was made on it
        return None


def check_backbone(backbone, manifest, path, error=ValueError, actual=None):
    """Raises `error` (one line naming both sides) unless `backbone` is the one a file's
    `manifest` was made on: first its image size (`manifest["image_size"]`, when recorded),
    then its fingerprint (`manifest["backbone"]`; `actual`, when given, is the backbone's,
    computed once by a caller that checks many files against one backbone; a file written
    before the current form may hold `old_fingerprint`)."""
    size = list(backbone.inputs[0].shape[1:])
    trained = manifest.get("image_size")
    if trained is not None and list(trained) != size:
        raise error(f"{path!r} was trained on {'x'.join(map(str, trained))} images; the given backbone takes "
                    f"{'x'.join(map(str, size))}: build it at the task's size (--image_size={trained[0]})")
    expected = manifest["backbone"]
    actual = fingerprint(backbone) if actual is None else actual
    if actual != expected["fingerprint"] and old_fingerprint(backbone) != expected["fingerprint"]:
        raise error(f"{path!r} was trained on backbone {expected['name']!r} (fingerprint "
                    f"{expected['fingerprint'][:12]}), not on the given {backbone.name!r} (fingerprint "
                    f"{actual[:12]}); load it with the backbone, weights and preprocessing it was trained on")
