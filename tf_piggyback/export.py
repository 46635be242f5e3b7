"""Deployment: task files -> SavedModels (TensorFlow Serving layout) and TFLite / LiteRT files.

Every exported signature takes `image` (float32 `[None, H, W, C]`, raw 0-255 pixels; the
backbone's preprocessing is inside) and returns `logits` and `probabilities` (DESIGN 3.5).
- One task: the mask is baked into ordinary layers (`bake`), so the graph is the plain backbone's.
- Several tasks in a SavedModel: a `TaskBank` (one traced backbone; each task is data: masks
  packed 1 bit per parameter and its head; a bounded set of unpacked working copies), one
  signature per task, `serving_default` being the first, and `tasks` / `tasks_by_name` for
  requests that mix tasks.
- Several tasks in a TFLite file: one copy of the backbone weights; each task's graph unpacks
  its masks on every call with integer floor-div/mod (TFLite has no BitwiseAnd, and freezes
  variables, so there is no working copy to keep).
"""

import json
import os
import re
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback import coding
from tf_piggyback.surgery import bake, bake_with_layers
from tf_piggyback.taskbank import DEFAULT_SLOTS, TaskBank
from tf_piggyback.taskfile import load_task, write_atomic

QUANTIZATIONS = ("none", "float16", "int8")
LISTING = "tf_piggyback_tasks.json"  # in a SavedModel's assets/: what `export/list_tasks.py` prints
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


# Bit k (MSB first) of an int32 word w is floor(floor(w / D_k) mod M_k / S_k). Bit 31, the sign
# bit, reads off floor(w / 2^30), which is -2, -1, 0 or 1; 2^31 does not fit in an int32.
_WORD_DIVISORS = [2 ** 30] + [2 ** k for k in range(30, -1, -1)]
_WORD_MODULI = [4] + [2] * 31
_WORD_SHIFTS = [2] + [1] * 31


def _pack_words(mask, mask_type):
    """`coding.mask_bits` as int32 words, 32 bits each, MSB first: what a multi-task `.tflite`
    stores per kernel."""
    bits = coding.mask_bits(mask, mask_type)
    return np.packbits(np.pad(bits, (0, -bits.size % 32))).view(">i4").astype(np.int32)


def _unpack_words(words, count):
    """int32 words -> `count` float bits, MSB first, with floor-div/mod only (TFLite builtins).

    The words are int32 already: a uint8 payload needed a cast to int32, which the TFLite
    converter constant-folds, storing every task's masks 4 times over (measured: 10 ResNet-50
    tasks gave a 213 MB file where one task's is 94 MB). TFLite has no BitwiseAnd, and the
    converter also folds a table lookup (gather) of constant bytes into full kernels.
    """
    bits = tf.math.floordiv(tf.math.floormod(tf.math.floordiv(words[:, None], _WORD_DIVISORS), _WORD_MODULI),
                            _WORD_SHIFTS)
    return tf.cast(tf.reshape(bits, [-1])[:count], tf.float32)


class _PackedTask(tf.Module):
    """One task of a multi-task TFLite file: its masks packed 1 bit per parameter, its own
    weights (head, per-task BatchNormalization), and a forward pass through the task's baked
    model (`stateless_call`) whose masked kernels are `W ⊙ m`, unpacked on every call (TFLite
    freezes variables, so there is no cache to fill), with `W` the shared backbone's.
    SavedModels use `TaskBank` instead: one traced backbone for every task.
    """

    def __init__(self, model, backbone_ids):
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
        self.packed, self.own = [], []
        self.__dict__["_sources"] = []  # per baked variable: ("kernel", index, W, type) | ("own", index) | ("shared", var)
        for variable in baked.variables:
            if id(variable) in kernels:
                source, mask, mask_type = kernels[id(variable)]
                self.packed.append(tf.Variable(_pack_words(mask, mask_type), trainable=False))
                self._sources.append(("kernel", len(self.packed) - 1, source, mask_type))
            elif id(variable) in shared or id(variable) in backbone_ids:
                self._sources.append(("shared", shared.get(id(variable), variable)))
            else:
                self.own.append(tf.Variable(keras.ops.convert_to_numpy(variable), trainable=False))
                self._sources.append(("own", len(self.own) - 1))

    def _masked_kernel(self, index, kernel, mask_type):
        size = int(np.prod(kernel.shape))
        if mask_type == "ternary":
            bits = tf.reshape(_unpack_words(self.packed[index], 2 * size), [size, 2])
            mask = bits[:, 0] * 2 + bits[:, 1] - 1
        else:
            mask = _unpack_words(self.packed[index], size)
        return kernel.value * tf.reshape(mask, kernel.shape)

    def _value(self, source):
        if source[0] == "shared":
            return source[1].value
        if source[0] == "own":
            return self.own[source[1]]
        return self._masked_kernel(*source[1:])

    def __call__(self, image, kernels=None):
        """The task's logits; `kernels`, if given, maps each of its masked kernel's sources
        (`W`, a backbone variable) to `W ⊙ m` held elsewhere (`_SwitchingTasks`)."""
        values = {id(v): self._value(source) if source[0] != "kernel" or kernels is None else kernels[id(source[2])]
                  for v, source in zip(self._model.variables, self._sources)}
        logits, _ = self._model.stateless_call(
            [values[id(v)] for v in self._model.trainable_variables],
            [values[id(v)] for v in self._model.non_trainable_variables],
            image, training=False)
        return logits


class _SwitchingTasks(tf.Module):
    """Several `_PackedTask`s with one working copy of the active task's masked kernels, held
    in resource variables, which LiteRT keeps across calls and shares between the signatures of
    one interpreter: a task's call unpacks its masks only when another task was active.

    The variables start as the backbone's kernels (the converter stores equal buffers once, so
    the file does not grow by a copy) and `active` as -1 (none: the first call unpacks).
    """

    def __init__(self, backbone, tasks):
        super().__init__()
        self.variables_ = [v.value for v in backbone.variables]
        self.tasks = tasks
        masked = {id(source[2]) for task in tasks for source in task._sources if source[0] == "kernel"}
        kernels = [v for v in backbone.variables if id(v) in masked]
        self.__dict__["_slot"] = {id(v): i for i, v in enumerate(kernels)}
        self.working = [tf.Variable(keras.ops.convert_to_numpy(v), trainable=False) for v in kernels]
        self.active = tf.Variable(-1, trainable=False)

    def logits(self, index, image):
        task = self.tasks[index]
        sources = [source for source in task._sources if source[0] == "kernel"]

        def switch():
            writes = [self.working[self._slot[id(source[2])]].assign(task._masked_kernel(*source[1:]))
                      for source in sources]
            with tf.control_dependencies(writes):
                return tf.identity(self.active.assign(index))

        switched = tf.cond(tf.not_equal(self.active, index), switch, lambda: tf.identity(self.active))
        with tf.control_dependencies([switched]):
            kernels = {id(source[2]): self.working[self._slot[id(source[2])]].read_value() for source in sources}
        return task(image, kernels)


def _signature(forward, spec, name):
    def serve(image):
        return forward(image)

    serve.__name__ = name  # TFLite names each signature after its function
    return tf.function(serve, input_signature=[spec])


def _task_paths(task_paths):
    if not task_paths:
        raise ValueError("give at least one --task")
    names, paths = zip(*[parse_task(p) for p in task_paths])
    if len(set(names)) != len(names):
        raise ValueError(f"task names must differ; got {list(names)}: name them with --task=NAME=PATH")
    return names, paths


def build_serving_module(backbone, task_paths, slots=DEFAULT_SLOTS, per_task_signatures=True):
    """A `tf.Module` and `{name: tf.function}`: the signatures of a SavedModel (DESIGN 3.5).

    One task: its baked model (`bake`), signature `serving_default` and the task's name.
    Several: a `TaskBank` module (one traced backbone, packed masks, `slots` unpacked working
    copies) with one signature per task, `serving_default` (the first), `tasks` and
    `tasks_by_name` (a task per example); with `per_task_signatures=False` only the last
    three (see `TaskBank.serving_signatures` for what each signature costs). The third value is the tasks' listing
    (`TaskBank.listing`), which exports store as `assets/{LISTING}`.

    The module tracks the raw `tf.Variable`s behind the Keras variables, never a Keras model or
    Keras variable: those save a SavedModel that TF2 loads but TF1-style loaders (TensorFlow
    Serving, `saved_model_cli run`) cannot restore ("Could not find variable ..."), and
    `keras.export.ExportArchive` avoids that only by saving every variable twice.
    """
    names, paths = _task_paths(task_paths)
    bank = TaskBank(backbone, slots=slots)
    for name, path in zip(names, paths):
        bank.add(path, name)
    if len(paths) > 1:
        return bank.module, bank.serving_signatures(per_task_signatures), bank.listing()
    spec = tf.TensorSpec([None, *backbone.inputs[0].shape[1:]], tf.float32, name="image")
    model = bake(load_task(paths[0], backbone))
    module = tf.Module()
    module.variables_ = [v.value for v in model.variables]
    signature = _signature(_with_outputs(lambda image: model(image, training=False)), spec, names[0])
    return module, {names[0]: signature, "serving_default": signature}, bank.listing()


def _tflite_module(backbone, task_paths, switching=False):
    """The module and per-task signatures a TFLite file is converted from: one task baked,
    several as `_PackedTask`s over one copy of the backbone (`switching`: `_SwitchingTasks`)."""
    names, paths = _task_paths(task_paths)
    spec = tf.TensorSpec([None, *backbone.inputs[0].shape[1:]], tf.float32, name="image")
    module = tf.Module()
    if len(paths) == 1:
        model = bake(load_task(paths[0], backbone))
        module.variables_ = [v.value for v in model.variables]
        forwards = [lambda image: model(image, training=False)]
    else:
        module.variables_ = [v.value for v in backbone.variables]
        backbone_ids = {id(v) for v in backbone.variables}
        tasks = [_PackedTask(load_task(p, backbone), backbone_ids) for p in paths]
        if switching:
            module = _SwitchingTasks(backbone, tasks)
            forwards = [lambda image, i=i: module.logits(i, image) for i in range(len(tasks))]
        else:
            module.tasks = tasks
            forwards = [task.__call__ for task in module.tasks]
    return module, {name: _signature(_with_outputs(f), spec, name) for name, f in zip(names, forwards)}


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


def export_saved_model(backbone, task_paths, output_dir, version=None, overwrite=False, slots=DEFAULT_SLOTS,
                       per_task_signatures=True):
    """Writes `output_dir/<version>/` atomically; returns its path.

    Args:
        backbone: the backbone the tasks were trained on (fingerprints are checked).
        task_paths: one task file (mask baked in) or several (shared backbone, packed masks),
            each `PATH` or `NAME=PATH` (the signature's name; default from the path, `task_name`).
        output_dir: the TF Serving model base path.
        version: integer version; default the next free one.
        overwrite: replace an existing version instead of refusing.
        slots: with several tasks, how many tasks' masked kernels are kept unpacked at once
            (each a float copy of the masked kernels); others are unpacked when called.
        per_task_signatures: with several tasks, one signature per task besides
            `serving_default`, `tasks` and `tasks_by_name`; off, the model loads as fast as a
            single task's whatever the number of tasks (`TaskBank.serving_signatures`).
    """
    if version is None:
        version = next_version(output_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an integer >= 0. Received: version={version!r}")
    final = os.path.join(output_dir, str(version))
    if os.path.exists(final) and not overwrite:
        raise ValueError(f"{final} exists; pick another --version, omit it for the next free one, or pass --overwrite")
    module, signatures, listing = build_serving_module(backbone, task_paths, slots, per_task_signatures)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=output_dir)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            listing_path = os.path.join(scratch, LISTING)
            with open(listing_path, "w") as f:
                json.dump(listing, f, indent=1)
            module.listing = tf.saved_model.Asset(listing_path)  # copied to assets/
            tf.saved_model.save(module, tmp, signatures=signatures)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_tflite(backbone, task_paths, output_path, quantize="none", representative=None, switching=False):
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
        switching: with several tasks, keep the active task's masked kernels in resource
            variables (`_SwitchingTasks`): a call unpacks its task's masks only when another
            task was called last, instead of on every call. Measured (ResNet-50, 96 px, 3 tasks,
            XNNPACK): warm calls 105 ms against 813 ms, a switching call as slow as a call was
            before; it holds one more float copy of the kernels in memory. BUILD.md compares them.
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
    switching = switching and len(task_paths) > 1
    if switching and quantize != "none":
        raise ValueError("switching keeps float32 working copies of the kernels; export it with quantize=none")
    module, signatures = _tflite_module(backbone, task_paths, switching)
    names = list(signatures)
    # Through a SavedModel: functions restored from one read plain tf.Variables, which the
    # converter freezes into the flatbuffer (Keras variables in memory stay READ_VARIABLE ops).
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        if switching:  # its variables stay variables: straight from the SavedModel, as ondevice does
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=names)
            converter.experimental_enable_resource_variables = True
        else:
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
        with warnings.catch_warnings():
            # int8 calibration runs TensorFlow's own deprecated tf.lite.Interpreter: nothing to act on
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated")
            flatbuffer = converter.convert()
    write_atomic(output_path, lambda f: f.write(flatbuffer))
    return len(flatbuffer)


def list_tasks(path):
    """What a multi-task (or single-task) export holds: a SavedModel folder's listing (names,
    classes, sparsity, source task files' SHA-256; `TaskBank.listing`), or for a `.tflite`
    file its signatures and their class counts, read with the LiteRT interpreter."""
    if os.path.isdir(path):
        listing = os.path.join(path, "assets", LISTING)
        if not os.path.isfile(listing):
            raise ValueError(f"{path} holds no {LISTING}: not a SavedModel written by export/saved_model.py")
        with open(listing) as f:
            return json.load(f)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass a SavedModel version folder or a .tflite file")
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=path)
    except ValueError as e:
        raise ValueError(f"{path} is not a TFLite file ({e})") from None
    tasks = []
    for name, io in interpreter.get_signature_list().items():
        runner = interpreter.get_signature_runner(name)
        tasks.append({"name": name, "num_classes": int(runner.get_output_details()["logits"]["shape"][-1])})
    return {"format": "tflite", "tasks": tasks}
