"""Task files -> one TFLite / LiteRT file (BUILD.md, "Interfaces"), every signature as `signatures` says.

- One task: the mask baked into ordinary layers (`bake`), float32, float16 or full int8.
- Several tasks: one copy of the backbone weights and each task's masks packed 32 to an int32
  word (`coding.pack_words`); a task's graph unpacks them with floor-div/mod (TFLite has no
  BitwiseAnd) on every call (`_PackedTask`). A file any LiteRT runner serves as it is, a task per
  signature; an app that can switch tasks in its code runs them at a single task's speed from the
  phone form instead (`tf_piggyback.devices.phone`, BUILD.md "Many tasks in one phone file").
"""

import contextlib
import re
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python.convert_phase import ConverterError

from tf_piggyback.core.coding import pack_words, unpack_words
from tf_piggyback.core.files import write_atomic
from tf_piggyback.core.surgery import bake, bake_with_layers
from tf_piggyback.core.taskfile import load_task, named_tasks
from tf_piggyback.serving.signatures import input_spec, save, signature, with_outputs

QUANTIZATIONS = ("none", "float16", "int8")
REPRESENTATIVE_SAMPLES = 500


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
                self.packed.append(tf.Variable(pack_words(mask, mask_type), trainable=False))
                self._sources.append(("kernel", len(self.packed) - 1, source, mask_type))
            elif id(variable) in shared or id(variable) in backbone_ids:
                self._sources.append(("shared", shared.get(id(variable), variable)))
            else:
                self.own.append(tf.Variable(keras.ops.convert_to_numpy(variable), trainable=False))
                self._sources.append(("own", len(self.own) - 1))

    def _masked_kernel(self, index, kernel, mask_type):
        size = int(np.prod(kernel.shape))
        if mask_type == "ternary":
            bits = tf.reshape(unpack_words(self.packed[index], 2 * size), [size, 2])
            mask = bits[:, 0] * 2 + bits[:, 1] - 1
        else:
            mask = unpack_words(self.packed[index], size)
        return kernel.value * tf.reshape(mask, kernel.shape)

    def _value(self, source):
        if source[0] == "shared":
            return source[1].value
        if source[0] == "own":
            return self.own[source[1]]
        return self._masked_kernel(*source[1:])

    def __call__(self, image):
        """The task's logits."""
        values = {id(v): self._value(source) for v, source in zip(self._model.variables, self._sources)}
        logits, _ = self._model.stateless_call(
            [values[id(v)] for v in self._model.trainable_variables],
            [values[id(v)] for v in self._model.non_trainable_variables],
            image, training=False)
        return logits


def _tflite_module(backbone, task_paths):
    """The module and per-task signatures a TFLite file is converted from: one task baked,
    several as `_PackedTask`s over one copy of the backbone."""
    names, paths = named_tasks(task_paths)
    spec = input_spec(backbone)
    module = tf.Module()
    if len(paths) == 1:
        model = bake(load_task(paths[0], backbone))
        module.variables_ = [v.value for v in model.variables]
        forwards = [lambda image: model(image, training=False)]
    else:
        module.variables_ = [v.value for v in backbone.variables]
        backbone_ids = {id(v) for v in backbone.variables}
        module.tasks = [_PackedTask(load_task(p, backbone), backbone_ids) for p in paths]
        forwards = [task.__call__ for task in module.tasks]
    return module, {name: signature(with_outputs(f), spec, name) for name, f in zip(names, forwards)}


def representative_images(spec, image_shape):
    """Up to `REPRESENTATIVE_SAMPLES` raw training images of a dataset spec, for int8 calibration."""
    from tf_piggyback.data.datasets import load_dataset, to_arrays

    return to_arrays(load_dataset(spec, image_shape=image_shape).train.take(REPRESENTATIVE_SAMPLES))[0]


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
        representative: for int8, a NumPy array of raw images `[N, H, W, C]` (the first
            `REPRESENTATIVE_SAMPLES` are used).

    Several tasks' calls each unpack their masks (42x a single task's file at 96 px, BUILD.md);
    where the app can switch tasks in its code, `phone.export_phone` runs them at its speed.
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
    module, signatures = _tflite_module(backbone, task_paths)
    flatbuffer = _convert(backbone, module, signatures, quantize, representative)
    write_atomic(output_path, lambda f: f.write(flatbuffer))
    return len(flatbuffer)


def model_flatbuffer(model, quantize="none", representative=None):
    """The TFLite flatbuffer (bytes) of a plain Keras model (`bake`d), its `serving_default`
    signature over `image`, converted as `export_tflite` converts one task."""
    module = tf.Module()
    module.variables_ = [v.value for v in model.variables]
    forward = signature(with_outputs(lambda image: model(image, training=False)), input_spec(model), "serving_default")
    return _convert(model, module, {"serving_default": forward}, quantize,
                    None if representative is None else np.asarray(representative, np.float32))


def int8_quantizer(model, representative):
    """`(template, quantize)` for full-int8 conversions of models that differ from `model` only in
    constants (another task's masked filters and head: `phoneint8.int8_conversions`).

    `template` is the float flatbuffer the TFLite converter hands its int8 step, calibrated on
    the first representative image as that step calibrates (every tensor the calibrator
    observes carries a minimum and a maximum). `quantize(calibrated)` runs the converter's int8
    step on a flatbuffer of that graph whose constants and ranges the caller has written (the
    calibration is that flatbuffer as it is), with the settings the converter chose for
    `model`: each model is quantized as its own conversion would quantize it from those ranges,
    while the conversion itself (the SavedModel and the float graph) runs once, and `model`'s
    own int8 step not at all. This reaches into private parts of the converter
    (`_optimize_tflite_model`, `add_intermediate_tensors` and `Calibrator`, TensorFlow 2.21); a
    version without them refuses here with NotImplementedError.
    """
    from tensorflow.lite.python import lite

    step = getattr(lite.TFLiteConverterBase, "_optimize_tflite_model", None)
    calibration = getattr(lite, "_calibrator", None)
    if step is None or not all(hasattr(calibration, name) for name in ("Calibrator", "add_intermediate_tensors")):
        raise NotImplementedError("this TensorFlow's converter has no _optimize_tflite_model step or Calibrator")
    calibrator, captured = calibration.Calibrator, {}

    def spy_step(converter, float_model, *args, **kwargs):
        captured.update(converter=converter, float_model=float_model, args=args, kwargs=kwargs)
        return float_model  # the int8 step runs in `quantize`, for each model given it

    images = np.asarray(representative, np.float32)[:1]
    lite.TFLiteConverterBase._optimize_tflite_model = spy_step
    try:
        model_flatbuffer(model, "int8", images)
    finally:
        lite.TFLiteConverterBase._optimize_tflite_model = step
    with _calibration_warnings_ignored():  # what the int8 step calibrates first (`_quantize`)
        template = calibrator(calibration.add_intermediate_tensors(captured["float_model"])).calibrate(
            lambda: iter([{"image": images}]))

    def quantize(calibrated):
        class Calibrated:  # the calibration is the given flatbuffer's ranges
            def __init__(self, *args, **kwargs):
                pass

            def calibrate(self, dataset_gen):
                return calibrated

        lite._calibrator.Calibrator = Calibrated
        try:
            return step(captured["converter"], captured["float_model"], *captured["args"], **captured["kwargs"])
        finally:
            lite._calibrator.Calibrator = calibrator

    return template, quantize


@contextlib.contextmanager
def _calibration_warnings_ignored():
    """int8 calibration runs TensorFlow's own deprecated tf.lite.Interpreter: nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated")
        yield


def _convert(backbone, module, signatures, quantize, representative):
    if len(signatures) == 1:  # a file of one signature names it serving_default, whatever its task
        signatures = {"serving_default": next(iter(signatures.values()))}
    names = list(signatures)
    # Through a SavedModel: its functions read plain tf.Variables, which the converter freezes
    # into the flatbuffer (Keras variables in memory stay READ_VARIABLE ops). Converted from the
    # folder: from functions restored from it, the converter saved a second SavedModel first
    # (ResNet-50 at 64 px: 6 of a conversion's 22 s, on a loaded machine).
    with tempfile.TemporaryDirectory() as tmp:
        save(module, tmp, signatures, type(backbone).__name__)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=names)
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
        with _calibration_warnings_ignored():
            try:
                flatbuffer = converter.convert()
            except ConverterError as error:
                raise ValueError(_converter_refusal(backbone, error)) from None
    return flatbuffer


def _converter_refusal(backbone, error):
    """The one line a user gets where the TFLite converter refuses a model: the TensorFlow ops it
    has no builtin kernel for (keras-hub's Gemma slices a boolean attention mask with a new axis,
    which TFLite's STRIDED_SLICE does not take)."""
    ops = sorted(set(re.findall(r"TF Select ops: ([^\n]+)", str(error))))
    if not ops:
        return f"the TFLite converter failed on {backbone.name!r}: {str(error).strip().splitlines()[-1]}"
    return (f"the TFLite converter cannot convert {backbone.name!r}: it has no builtin TFLite kernel for the "
            f"TensorFlow ops {', '.join(ops)}; export a SavedModel (export/saved_model.py) for this backbone")
