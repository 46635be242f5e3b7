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


def architecture(model, loose=False):
    """A canonical description of `model`: its input shapes and, layer by layer in order, each
    layer's type and what describes it: the config Keras serializes for it (preprocessing included:
    `ImagePreprocessing`'s mode, `Rescaling`'s scale; a custom layer's constructor arguments, which
    Keras records when its class writes no `get_config`), with names, trainable flags and dtype
    policies left out at any depth; for a layer with none, its weights' names, shapes and dtypes
    (`_config`). `loose`: layers without a `get_config` of their class's own are described by their
    weights alone (`_loose_config`: the form task files before issue 39 record). Built only from
    what every Keras layer has, it never fails (BUILD.md, "Which backbones work")."""
    config = _loose_config if loose else _config
    return _describe(_layers(model), [list(tensor.shape[1:]) for tensor in model.inputs], config, _strip)


def _weights(layer):
    return {"weights": [[w.name, list(w.shape), str(w.dtype)] for w in layer.weights]}


def _own_config(layer):
    """`layer.get_config()` where its class writes one (None where it does not, or where it fails:
    keras-hub 0.32 Swin's layers hold a class where a layer is expected)."""
    if type(layer).get_config is not keras.layers.Layer.get_config:
        try:
            return layer.get_config()
        except Exception:  # a family's broken get_config: described by its weights
            pass
    return None


def _automatic_config(layer):
    """The config Keras records for a class that writes no `get_config`: its constructor
    arguments, when all were strings, numbers, booleans or None (a `Scale(2.0)`'s factor); None
    where Keras recorded none (it raises NotImplementedError)."""
    if type(layer).get_config is not keras.layers.Layer.get_config:
        return None
    try:
        return layer.get_config()
    except Exception:  # NotImplementedError: none recorded (or a family's broken one): no config
        return None


def _config(layer):
    """What describes `layer` (`architecture`): its class's config, or Keras' automatic one, or
    its weights' names, shapes and dtypes."""
    config = _own_config(layer)
    config = _automatic_config(layer) if config is None else config
    return _weights(layer) if config is None else config


def _loose_config(layer):
    """`_config` without Keras' automatic config: a class that leaves it to Keras has one only
    when every `__init__` argument was a plain value, so the same layer loaded from a `.keras`
    file (given a `DTypePolicy` object) has none (keras-hub 0.32's `RMSNormalization` in Gemma,
    T5's, Whisper's and XLNet's layers)."""
    config = _own_config(layer)
    return _weights(layer) if config is None else config


def lacks_config(model):
    """Whether a layer of `model` has no config at all (`_config` describes it by its weights):
    then it may be a layer whose automatic config a `.keras` file lost, and a task file's
    `loose_fingerprint` is what can be checked."""
    return any(_own_config(layer) is None and _automatic_config(layer) is None for layer in _layers(model))


def _digest(description, model):
    digest = hashlib.sha256(description.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def fingerprint(model, loose=False):
    """Hex SHA-256 over `architecture(model, loose)`, then every weight's dtype, shape and bytes,
    in the model's weight order: another input size, preprocessing, pooling or layer setting
    (a custom layer's constructor arguments included) gives another fingerprint, as other weights do.
    """
    return _digest(architecture(model, loose), model)


def backbone_entry(model):
    """What a task file records of its backbone (`manifest["backbone"]`): its name and
    fingerprint, and, where the loose form differs (a layer described by Keras' automatic
    config), `loose_fingerprint`, which `check_backbone` accepts for a backbone read back from a
    `.keras` file that lost that config."""
    strict = architecture(model)
    loose = architecture(model, loose=True)
    entry = {"name": model.name, "fingerprint": _digest(strict, model)}
    return entry if loose == strict else {**entry, "loose_fingerprint": _digest(loose, model)}


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
    computed once by a caller that checks many files against one backbone).

    A file written before the current form holds the loose fingerprint (before issue 39) or
    `old_fingerprint`; a backbone with a layer that has no config at all (read back from a
    `.keras` file that lost Keras' automatic config) is checked by the file's `loose_fingerprint`."""
    size = list(backbone.inputs[0].shape[1:])
    trained = manifest.get("image_size")
    if trained is not None and list(trained) != size:
        raise error(f"{path!r} was trained on {'x'.join(map(str, trained))} images; the given backbone takes "
                    f"{'x'.join(map(str, size))}: build it at the task's size (--image_size={trained[0]})")
    expected = manifest["backbone"]
    actual = fingerprint(backbone) if actual is None else actual
    if actual == expected["fingerprint"]:
        return
    loose = expected.get("loose_fingerprint")
    if loose is not None:  # the file's backbone had automatic configs: only a backbone lacking one may match loosely
        if lacks_config(backbone) and fingerprint(backbone, loose=True) == loose:
            return
    elif expected["fingerprint"] in (fingerprint(backbone, loose=True), old_fingerprint(backbone)):
        return
    raise error(f"{path!r} was trained on backbone {expected['name']!r} (fingerprint "
                f"{expected['fingerprint'][:12]}), not on the given {backbone.name!r} (fingerprint "
                f"{actual[:12]}); load it with the backbone, weights and preprocessing it was trained on")
