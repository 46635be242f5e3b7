"""Deployment: task files -> SavedModels (TensorFlow Serving layout) and TFLite / LiteRT files.

Every exported signature takes `image` (float32 `[None, H, W, C]`, raw 0-255 pixels; the
backbone's preprocessing is inside) and returns `logits` and `probabilities` (DESIGN 3.5).
- One task: the mask is baked into ordinary layers (`bake`), so the graph is the plain backbone's.
- Several tasks: one shared copy of the backbone; each task keeps its masks packed 1 bit per
  parameter (uint8 variables, unpacked in-graph with integer floor-div/mod, which TFLite also
  has) and its head; one signature per task, `serving_default` being the first.
"""

import os
import re
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback import coding
from tf_piggyback.surgery import bake, bake_with_layers
from tf_piggyback.taskfile import load_task, write_atomic

QUANTIZATIONS = ("none", "float16", "int8")
REPRESENTATIVE_SAMPLES = 500


def parse_task(spec):
    """`NAME=PATH` or `PATH` -> `(signature name, path)`; see `task_name` for the default name."""
    name, sep, path = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return name, path
    return task_name(spec), spec


def task_name(path):
    """A signature name for a task file: its folder's name for `.../NAME/task.npz`, else its stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "task" else stem
    name = re.sub(r"[^A-Za-z0-9_]", "_", name) or "task"
    return name if not name[0].isdigit() else f"task_{name}"


def _outputs(logits):
    return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}


def _unpack_bits(packed, count):
    """uint8 bytes -> `count` float bits (MSB first, as np.packbits), with int32 floor-div/mod.

    TFLite has no BitwiseAnd, and the converter constant-folds a table lookup (gather) of
    constant bytes, which stores every task's full kernels (measured: 1.44 MB instead of
    0.63 MB for two digits tasks); floor-div/mod stays a run-time op.
    """
    as_int = tf.cast(packed, tf.int32)[:, None]
    bits = tf.math.floormod(tf.math.floordiv(as_int, tf.constant([128, 64, 32, 16, 8, 4, 2, 1])), 2)
    return tf.cast(tf.reshape(bits, [-1])[:count], tf.float32)


class _PackedTask(tf.Module):
    """One task of a multi-task model: its masks packed 1 bit per parameter, its own weights
    (head, per-task BatchNormalization), and a forward pass through the task's baked model
    (`stateless_call`) whose masked kernels are `W ⊙ m`, with `W` the shared backbone's.

    With `cache`, a task unpacks its masks once, on its first call, into variables holding its
    masked kernels; those are saved empty, so the SavedModel keeps 1 bit per parameter on disk,
    and every later call costs what a baked single-task model costs. Filling writes the same
    values whoever does it, and reads wait for the caller's own fill, so concurrent requests
    (TensorFlow Serving) are safe. The price is RAM: one float copy of the masked kernels per
    task that has been called. Without `cache` (TFLite, which freezes variables) each call unpacks.
    """

    def __init__(self, model, backbone_ids, cache):
        super().__init__()
        baked, pairs = bake_with_layers(model)
        # Kept out of tracking (tf.Module tracks attributes): the baked kernels must not be
        # saved; the backbone variables it reads are tracked by the parent module.
        self.__dict__["_model"] = baked
        kernels, shared = {}, {}
        for wrapper, plain in pairs:
            masks = {id(k): (m, wrapper.mask_type) for k, m in zip(wrapper.kernels, wrapper.thresholded_masks())}
            for weight, source in zip(plain.weights, wrapper.layer.weights):
                if id(source) in masks:
                    kernels[id(weight)] = (source, *masks[id(source)])
                else:
                    shared[id(weight)] = source
        self.packed, self.own, self.cache = [], [], []
        self.__dict__["_sources"] = []  # per baked variable: ("kernel", index, W, type) | ("own", index) | ("shared", var)
        for variable in baked.variables:
            if id(variable) in kernels:
                source, mask, mask_type = kernels[id(variable)]
                payload = coding.encode(mask, mask_type)[0] if mask_type == "ternary" else \
                    np.packbits(mask.astype(bool)).tobytes()
                self.packed.append(tf.Variable(np.frombuffer(payload, np.uint8), trainable=False))
                if cache:
                    self.cache.append(tf.Variable(tf.zeros([0], variable.dtype), shape=tf.TensorShape(None),
                                                  trainable=False))
                self._sources.append(("kernel", len(self.packed) - 1, source, mask_type))
            elif id(variable) in shared or id(variable) in backbone_ids:
                self._sources.append(("shared", shared.get(id(variable), variable)))
            else:
                self.own.append(tf.Variable(keras.ops.convert_to_numpy(variable), trainable=False))
                self._sources.append(("own", len(self.own) - 1))
        self.filled = tf.Variable(False, trainable=False) if cache else None

    def _masked_kernel(self, index, kernel, mask_type):
        size = int(np.prod(kernel.shape))
        if mask_type == "ternary":
            bits = tf.reshape(_unpack_bits(self.packed[index], 2 * size), [size, 2])
            mask = bits[:, 0] * 2 + bits[:, 1] - 1
        else:
            mask = _unpack_bits(self.packed[index], size)
        return kernel.value * tf.reshape(mask, kernel.shape)

    def _fill(self):
        writes = [self.cache[source[1]].assign(self._masked_kernel(*source[1:]), read_value=False)
                  for source in self._sources if source[0] == "kernel"]
        with tf.control_dependencies(writes):
            self.filled.assign(True, read_value=False)
        return tf.constant(True)

    def _value(self, source):
        if source[0] == "shared":
            return source[1].value
        if source[0] == "own":
            return self.own[source[1]]
        _, index, kernel, mask_type = source
        if self.filled is None:
            return self._masked_kernel(index, kernel, mask_type)
        return tf.reshape(self.cache[index].value(), kernel.shape)

    def __call__(self, image):
        if self.filled is not None:
            tf.cond(self.filled, lambda: tf.constant(False), self._fill)
        values = {id(v): self._value(source) for v, source in zip(self._model.variables, self._sources)}
        logits, _ = self._model.stateless_call(
            [values[id(v)] for v in self._model.trainable_variables],
            [values[id(v)] for v in self._model.non_trainable_variables],
            image, training=False)
        return logits


def _signature(forward, spec, name):
    def serve(image):
        return forward(image)

    serve.__name__ = name  # TFLite names each signature after its function
    return tf.function(serve, input_signature=[spec])


def build_serving_module(backbone, task_paths, cache=True):
    """A `tf.Module` and `{name: tf.function}` with one signature per task (and serving_default).

    The module tracks the raw `tf.Variable`s behind the Keras variables, never a Keras model or
    Keras variable: those save a SavedModel that TF2 loads but TF1-style loaders (TensorFlow
    Serving, `saved_model_cli run`) cannot restore ("Could not find variable ..."), and
    `keras.export.ExportArchive` avoids that only by saving every variable twice.
    With several tasks, `cache` makes each task unpack its masks once, on its first call (see
    `_PackedTask`); TFLite conversion passes `cache=False`.
    """
    if not task_paths:
        raise ValueError("give at least one --task")
    names, task_paths = zip(*[parse_task(p) for p in task_paths])
    if len(set(names)) != len(names):
        raise ValueError(f"task names must differ; got {list(names)}: name them with --task=NAME=PATH")
    spec = tf.TensorSpec([None, *backbone.inputs[0].shape[1:]], tf.float32, name="image")
    module = tf.Module()
    if len(task_paths) == 1:
        model = bake(load_task(task_paths[0], backbone))
        module.variables_ = [v.value for v in model.variables]
        forwards = [lambda image: model(image, training=False)]
    else:
        module.variables_ = [v.value for v in backbone.variables]
        backbone_ids = {id(v) for v in backbone.variables}
        module.tasks = [_PackedTask(load_task(p, backbone), backbone_ids, cache) for p in task_paths]
        forwards = [task.__call__ for task in module.tasks]
    signatures = {name: _signature(_with_outputs(forward), spec, name) for name, forward in zip(names, forwards)}
    module.signatures_ = dict(signatures)
    signatures["serving_default"] = signatures[names[0]]
    return module, signatures


def _with_outputs(forward):
    return lambda image: _outputs(forward(image))


def _restored(loaded, name):
    return lambda image: loaded.signatures[name](image=image)


def representative_images(spec, image_shape):
    """Up to `REPRESENTATIVE_SAMPLES` raw training images of a dataset spec, for int8 calibration."""
    from tf_piggyback.datasets import load_dataset, to_arrays

    return to_arrays(load_dataset(spec, image_shape=image_shape).train.take(REPRESENTATIVE_SAMPLES))[0]


def next_version(output_dir):
    """The next free integer version under a TF Serving model directory."""
    versions = [int(d) for d in os.listdir(output_dir) if d.isdigit()] if os.path.isdir(output_dir) else []
    return max(versions, default=0) + 1


def export_saved_model(backbone, task_paths, output_dir, version=None, overwrite=False):
    """Writes `output_dir/<version>/` atomically; returns its path.

    Args:
        backbone: the backbone the tasks were trained on (fingerprints are checked).
        task_paths: one task file (mask baked in) or several (shared backbone, packed masks),
            each `PATH` or `NAME=PATH` (the signature's name; default from the path, `task_name`).
        output_dir: the TF Serving model base path.
        version: integer version; default the next free one.
        overwrite: replace an existing version instead of refusing.
    """
    if version is None:
        version = next_version(output_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an integer >= 0. Received: version={version!r}")
    final = os.path.join(output_dir, str(version))
    if os.path.exists(final) and not overwrite:
        raise ValueError(f"{final} exists; pick another --version, omit it for the next free one, or pass --overwrite")
    module, signatures = build_serving_module(backbone, task_paths)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=output_dir)
    try:
        tf.saved_model.save(module, tmp, signatures=signatures)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_tflite(backbone, task_paths, output_path, quantize="none", representative=None):
    """Writes one `.tflite` file with one signature per task, atomically; returns its size.

    Built from the same module as `export_saved_model` (converted from its concrete functions,
    so the weights are embedded as constants). Check it with
    `ai_edge_litert.interpreter.Interpreter(...).get_signature_runner(name)(image=x)`.

    Args:
        backbone: the backbone the tasks were trained on.
        task_paths: one or more task files, each `PATH` or `NAME=PATH`.
        output_path: the `.tflite` file.
        quantize: `"none"` (float32), `"float16"` (float16 weights) or `"int8"` (full-integer
            post-training quantization of weights and activations; float input and output).
        representative: for int8, a NumPy array of raw images `[N, H, W, C]` (200 are used).
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}. Received: quantize={quantize!r}")
    shape = tuple(backbone.inputs[0].shape[1:])
    if quantize == "int8":
        if representative is None or len(representative) == 0:
            raise ValueError("int8 quantization needs a representative dataset (--representative=DATASET_SPEC)")
        representative = np.asarray(representative, np.float32)
        if tuple(representative.shape[1:]) != shape:
            raise ValueError(f"representative images have shape {tuple(representative.shape[1:])}; "
                             f"the model takes {shape}")
        if len(task_paths) > 1:
            # The masked kernels of a multi-task file are computed at run time, and TFLite's int8
            # convolutions need constant, symmetric filters.
            raise ValueError("int8 quantization takes one --task; export each task to its own .tflite")
    module, signatures = build_serving_module(backbone, task_paths, cache=False)
    names = [parse_task(p)[0] for p in task_paths]
    # Through a SavedModel: functions restored from one read plain tf.Variables, which the
    # converter freezes into the flatbuffer (Keras variables in memory stay READ_VARIABLE ops).
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        loaded = tf.saved_model.load(tmp)
        spec = tf.TensorSpec([None, *shape], tf.float32, name="image")
        functions = [_signature(_restored(loaded, name), spec, name).get_concrete_function() for name in names]
        converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, loaded)
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":

            def samples():
                for name in names:
                    for image in representative[:REPRESENTATIVE_SAMPLES]:
                        yield (name, {"image": image[None]}) if len(names) > 1 else {"image": image[None]}

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = samples
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        flatbuffer = converter.convert()
    write_atomic(output_path, lambda f: f.write(flatbuffer))
    return len(flatbuffer)
