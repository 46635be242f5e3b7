"""Learning a task on the device (§7): a LiteRT model that trains masks and a head over frozen weights.

`build_ondevice_module` returns a `tf.Module` with the signatures an app calls:
- `train(image, label) -> loss`: one optimizer step (Adam or SGD) on the real-valued masks and the
  head, through the straight-through gradient of Eq. 4-7, with a static batch;
- `infer(image) -> logits, probabilities`;
- `export_task() -> mask_0, mask_1, ..., head_0, head_1, ...`: the thresholded masks packed 8 per
  byte (`np.packbits` order) and the head's weights, which `task_from_export` turns into a task file;
- `reset() -> ok`: masks and head back to their initial values.

The backbone's weights enter the graph as constants, so the `.tflite` keeps them read-only; only
masks, head and optimizer slots are variables. The file converts with TFLite builtins only (no
Flex ops, so the stock runtime on Android and iOS runs it): the loss is written with `log_softmax`
and `one_hot`, and the three gradients TFLite has no builtin for are given here with builtins —
ReLU's (`ReluGrad`), max pooling's (`MaxPoolGrad`) and a convolution's with respect to its kernel
(`Conv2DBackpropFilter`, as one matrix product per kernel tap). The SavedModel is written with
`SaveOptions(experimental_custom_gradients=True)` so those gradients reach the converter.
"""

import contextlib
import json
import os
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.core import coding
from tf_piggyback.core.binarizers import threshold_mask
from tf_piggyback.core.files import write_atomic
from tf_piggyback.core.fingerprint import check_backbone
from tf_piggyback.core.layers import MASK_VARIABLE_SCALE
from tf_piggyback.core.methods.piggyback import piggyback
from tf_piggyback.core.surgery import masked_layers, task_weights
from tf_piggyback.core.taskfile import save_task
from tf_piggyback.serving.signatures import image_spec

OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-7


@tf.custom_gradient
def _relu(x):
    def grad(dy):
        return dy * tf.cast(x > 0, dy.dtype)

    return tf.maximum(x, 0.0), grad


def _max_pool(inputs, ksize, strides, padding, data_format=None, name=None):
    """`tf.nn.max_pool` for 2-D, non-overlapping windows, with a gradient made of builtins."""
    size = ksize if isinstance(ksize, int) else ksize[0]
    stride = strides if isinstance(strides, int) else strides[0]
    n, h, w, c = inputs.shape
    if len(inputs.shape) != 4 or size != stride or padding != "VALID" or h % size or w % size:
        raise ValueError("on-device training supports 2-D max pooling with pool size == strides, 'valid' "
                         f"padding and input sizes divisible by it. Received: pool {ksize}, strides {strides}, "
                         f"padding {padding}, input {inputs.shape}")

    @tf.custom_gradient
    def pool(x):
        y = tf.nn.max_pool2d(x, size, size, "VALID")

        def grad(dy):
            # Like MaxPoolGrad: each window's gradient goes to its first maximum (row-major).
            windows = tf.reshape(x, [-1, h // size, size, w // size, size, c])
            top = tf.reshape(y, [-1, h // size, w // size, c])
            taken = tf.zeros_like(top, dtype=tf.bool)
            rows = []
            for a in range(size):
                row = []
                for b in range(size):
                    first = tf.logical_and(tf.equal(windows[:, :, a, :, b, :], top), tf.logical_not(taken))
                    taken = tf.logical_or(taken, first)
                    row.append(tf.cast(first, dy.dtype) * dy)
                rows.append(tf.stack(row, axis=3))  # [n, h/size, w/size, size(b), c]
            return tf.reshape(tf.stack(rows, axis=2), tf.shape(x))  # [n, h/size, size(a), w/size, size(b), c]

        return y, grad

    return pool(inputs)


def _convolution(inputs, kernel, strides=None, padding="VALID", data_format=None, dilations=None, name=None):
    """`tf.nn.convolution` for 2-D convolutions, with a kernel gradient made of builtins."""
    kh, kw, ci, co = kernel.shape
    stride = 1 if strides is None else (strides if isinstance(strides, int) else strides[0])
    dilation = 1 if dilations is None else (dilations if isinstance(dilations, int) else dilations[0])
    if len(inputs.shape) != 4 or dilation != 1 or data_format not in (None, "NHWC") or inputs.shape[-1] != ci or (
            not isinstance(strides, int) and strides is not None and len(set(strides)) != 1):
        raise ValueError("on-device training supports channels-last 2-D convolutions without groups or dilation "
                         f"and with equal strides. Received: input {inputs.shape}, kernel {kernel.shape}, "
                         f"strides {strides}, dilations {dilations}, data_format {data_format}")
    n, h, w, _ = inputs.shape
    out_h, out_w = -(-h // stride) if padding == "SAME" else (h - kh) // stride + 1, \
        -(-w // stride) if padding == "SAME" else (w - kw) // stride + 1
    pad_h = max((out_h - 1) * stride + kh - h, 0) if padding == "SAME" else 0
    pad_w = max((out_w - 1) * stride + kw - w, 0) if padding == "SAME" else 0

    @tf.custom_gradient
    def conv(x, k):
        y = tf.nn.conv2d(x, k, stride, padding)

        def grad(dy):
            dx = tf.nn.conv2d_transpose(dy, k, tf.shape(x), stride, padding)
            padded = tf.pad(x, [[0, 0], [pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
            flat_dy = tf.reshape(dy, [-1, co])
            taps = []
            for i in range(kh):
                for j in range(kw):
                    patch = padded[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride, :]
                    taps.append(tf.matmul(tf.reshape(patch, [-1, ci]), flat_dy, transpose_a=True))
            return dx, tf.reshape(tf.stack(taps), [kh, kw, ci, co])

        return y, grad

    return conv(inputs, kernel)


@contextlib.contextmanager
def builtin_gradients():
    """While tracing, Keras' ReLU, max pooling and convolutions use the versions above."""
    with mock.patch.object(tf.nn, "relu", _relu), mock.patch.object(tf.nn, "max_pool", _max_pool), \
            mock.patch.object(tf.nn, "convolution", _convolution):
        yield


class OnDeviceTask(tf.Module):
    """The trainable module: see the module docstring. Built by `build_ondevice_module`."""

    def __init__(self, model, batch_size, optimizer="adam", mask_lr=1e-4, head_lr=1e-3):
        super().__init__()
        self.__dict__["_model"] = model  # untracked: its backbone values are fed as constants
        masks = [m for layer in masked_layers(model) for m in layer.masks]
        own = task_weights(model)
        self.__dict__["_trainable_keras"] = masks + own
        self.num_masks = len(masks)
        self.weights_ = [tf.Variable(keras.ops.convert_to_numpy(v), name=v.path.replace("/", "_"))
                         for v in masks + own]
        self.__dict__["_initial"] = [keras.ops.convert_to_numpy(v) for v in masks + own]
        self.slots_ = [tf.Variable(tf.zeros_like(v)) for v in self.weights_ for _ in range(2 if optimizer == "adam" else 1)]
        self.step_ = tf.Variable(0.0)
        self.__dict__["_constants"] = {id(v): tf.constant(keras.ops.convert_to_numpy(v)) for v in model.variables}
        self.optimizer = optimizer
        # The masks are held as m_r * MASK_VARIABLE_SCALE (layers.MaskedWrapper): their rate is scaled with them.
        self.learning_rates = [float(mask_lr) * MASK_VARIABLE_SCALE] * len(masks) + [float(head_lr)] * len(own)
        self.threshold = masked_layers(model)[0].variable_threshold if masks else 0.0
        self.num_classes = int(model.outputs[0].shape[-1])
        shape = list(model.inputs[0].shape[1:])
        self.train = tf.function(self._train, input_signature=[
            tf.TensorSpec([batch_size, *shape], tf.float32, name="image"), tf.TensorSpec([batch_size], tf.int32, name="label")])
        self.infer = tf.function(self._infer, input_signature=[image_spec(shape)])
        self.export_task = tf.function(self._export_task, input_signature=[])
        self.reset = tf.function(self._reset, input_signature=[])

    def _forward(self, image, trainable_values):
        values = dict(self._constants)
        for v, value in zip(self._trainable_keras, trainable_values):
            values[id(v)] = value
        with builtin_gradients():
            logits, _ = self._model.stateless_call([values[id(v)] for v in self._model.trainable_variables],
                                                   [values[id(v)] for v in self._model.non_trainable_variables],
                                                   image, training=False)
        return logits

    def _train(self, image, label):
        with tf.GradientTape() as tape:
            current = [tf.identity(v) for v in self.weights_]
            tape.watch(current)
            logits = self._forward(image, current)
            loss = -tf.reduce_mean(tf.reduce_sum(tf.one_hot(label, self.num_classes) * tf.nn.log_softmax(logits), -1))
        grads = tape.gradient(loss, current)
        step = self.step_.assign_add(1.0)
        for i, (v, g) in enumerate(zip(self.weights_, grads)):
            if self.optimizer == "sgd":
                velocity = self.slots_[i].assign(0.9 * self.slots_[i] + g)
                v.assign_sub(self.learning_rates[i] * velocity)
            else:  # as keras.optimizers.Adam
                b1, b2 = ADAM_BETAS
                m = self.slots_[2 * i].assign(b1 * self.slots_[2 * i] + (1 - b1) * g)
                s = self.slots_[2 * i + 1].assign(b2 * self.slots_[2 * i + 1] + (1 - b2) * g * g)
                rate = self.learning_rates[i] * tf.sqrt(1 - tf.pow(b2, step)) / (1 - tf.pow(b1, step))
                v.assign_sub(rate * m / (tf.sqrt(s) + ADAM_EPSILON))
        return {"loss": loss}

    def _infer(self, image):
        logits = self._forward(image, [v.read_value() for v in self.weights_])
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def _export_task(self):
        outputs = {}
        for i, v in enumerate(self.weights_[:self.num_masks]):
            bits = tf.reshape(tf.cast(threshold_mask(v, self.threshold, "binary"), tf.int32), [-1])
            padding = -int(np.prod(v.shape)) % 8
            bits = tf.reshape(tf.pad(bits, [[0, padding]]), [-1, 8])
            outputs[f"mask_{i}"] = tf.cast(tf.reduce_sum(bits * tf.constant([128, 64, 32, 16, 8, 4, 2, 1]), axis=1), tf.uint8)
        for i, v in enumerate(self.weights_[self.num_masks:]):
            outputs[f"head_{i}"] = v.read_value()
        return outputs

    def _reset(self):
        for v, initial in zip(self.weights_, self._initial):
            # a constant-initialised mask is stored as one number, not a second copy
            v.assign(tf.fill(v.shape, initial.flat[0]) if np.all(initial == initial.flat[0]) else tf.constant(initial))
        for slot in self.slots_:
            slot.assign(tf.zeros_like(slot))
        self.step_.assign(0.0)
        return {"ok": tf.constant(True)}


def build_ondevice_module(backbone, num_classes, batch_size, optimizer="adam", mask_lr=1e-4, head_lr=1e-3,
                          **options):
    """An `OnDeviceTask` over `piggyback(backbone, num_classes, **options)`; returns it and that model.

    Args:
        backbone: the deployed backbone (its weights become constants of the `.tflite`).
        num_classes: classes of the task to learn on the device.
        batch_size: the `train` signature's static batch size.
        optimizer: `"adam"` (§4) or `"sgd"` (momentum 0.9).
        mask_lr, head_lr: learning rates of the masks and of the head (constant).
        **options: `piggyback` options (threshold, mask_init, mask_scale, mask_from); binary masks, no
            train_bn.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}. Received: optimizer={optimizer!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be an integer > 0. Received: batch_size={batch_size!r}")
    for name, value in (("mask_lr", mask_lr), ("head_lr", head_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0. Received: {name}={value!r}")
    if options.get("mask_type", "binary") != "binary" or options.get("train_bn"):
        raise ValueError("on-device training learns binary masks and a head; mask_type must be 'binary' and "
                         "train_bn False")
    model = piggyback(backbone, num_classes, **options)
    return OnDeviceTask(model, batch_size, optimizer, mask_lr, head_lr), model


MODEL_FILE, CONFIG_FILE = "model.tflite", "ondevice.json"


def export_ondevice(backbone, num_classes, batch_size, output_dir, **kwargs):
    """Writes `output_dir/model.tflite` (builtins only) and `output_dir/ondevice.json` (what the
    app and `task_from_export` need: backbone fingerprint, classes, batch size, options); returns
    the `.tflite` size in bytes. Keyword arguments are `build_ondevice_module`'s."""
    module, model = build_ondevice_module(backbone, num_classes, batch_size, **kwargs)
    signatures = {name: getattr(module, name).get_concrete_function()
                  for name in ("train", "infer", "export_task", "reset")}
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures,
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=True))
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        flatbuffer = converter.convert()
    spec = model.task_spec
    config = {"backbone": spec.backbone,
              "num_classes": int(num_classes), "batch_size": batch_size, "image_size": list(model.inputs[0].shape[1:]),
              "options": {k: spec.options[k] for k in ("threshold", "mask_init", "mask_scale", "train_bn", "mask_from")},
              "optimizer": module.optimizer, "mask_lr": module.learning_rates[0],
              "head_lr": module.learning_rates[-1]}
    write_atomic(os.path.join(output_dir, MODEL_FILE), lambda f: f.write(flatbuffer))
    write_atomic(os.path.join(output_dir, CONFIG_FILE), lambda f: f.write(json.dumps(config, indent=2).encode()))
    return len(flatbuffer)


class LiteRTTrainer:
    """Drives an exported `model.tflite` with the LiteRT interpreter, as an app would, and checks
    every batch first, so a mistake is a clear `ValueError` rather than a crash in the runtime."""

    def __init__(self, model_dir):
        from ai_edge_litert.interpreter import Interpreter

        path = os.path.join(model_dir, MODEL_FILE)
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
            raise ValueError(f"{model_dir} holds no {MODEL_FILE} and {CONFIG_FILE}; write them with export/ondevice.py")
        with open(os.path.join(model_dir, CONFIG_FILE)) as f:
            self.config = json.load(f)
        self.path = path
        self.interpreter = Interpreter(model_path=path)
        self._train = self.interpreter.get_signature_runner("train")
        self._infer = self.interpreter.get_signature_runner("infer")
        self._export = self.interpreter.get_signature_runner("export_task")

    def _check(self, images, labels=None):
        images = np.asarray(images, np.float32)
        shape = tuple(self.config["image_size"])
        if images.ndim != 4 or images.shape[1:] != shape:
            raise ValueError(f"images have shape {images.shape[1:] if images.ndim == 4 else images.shape}; "
                             f"this model takes batches of {shape} images")
        if labels is None:
            return images, None
        labels = np.asarray(labels)
        if len(images) != self.config["batch_size"] or labels.shape != (len(images),):
            raise ValueError(f"a train batch has {len(images)} images and labels of shape {labels.shape}; "
                             f"this model trains on exactly {self.config['batch_size']} (export it with another "
                             "--batch_size, or drop the last partial batch)")
        if labels.min() < 0 or labels.max() >= self.config["num_classes"]:
            raise ValueError(f"labels must be in [0, {self.config['num_classes']}); got {labels.min()}..{labels.max()}")
        return images, labels.astype(np.int32)

    def train_step(self, images, labels):
        """One optimizer step; returns the batch's mean loss."""
        images, labels = self._check(images, labels)
        return float(self._train(image=images, label=labels)["loss"])

    def train_epoch(self, images, labels, rng):
        """One pass over NumPy `images`, `labels` in `rng`'s order, in full batches (a last partial
        batch is left out); returns the mean loss."""
        batch, order = self.config["batch_size"], rng.permutation(len(images))
        return float(np.mean([self.train_step(images[order[i:i + batch]], labels[order[i:i + batch]])
                              for i in range(0, len(images) - batch + 1, batch)]))

    def logits(self, images):
        return self._infer(image=self._check(images)[0])["logits"]

    def accuracy(self, images, labels):
        """Top-1 accuracy of `infer` on NumPy `images`, `labels`."""
        return float(np.mean(self.logits(images).argmax(-1) == labels))

    def save_task(self, backbone, path, *, class_names=None, metrics=None):
        """Writes what the device learned as an ordinary task file; returns its manifest."""
        check_backbone(backbone, self.config, self.path)
        return task_from_export(backbone, self._export(), self.config["num_classes"], path, class_names=class_names,
                                metrics=metrics, **self.config["options"])


def task_from_export(backbone, outputs, num_classes, path, *, class_names=None, metrics=None, **options):
    """Writes the task file (BUILD.md, "Task file format") of what `export_task()` returned; returns its manifest."""
    model = piggyback(backbone, num_classes, **options)
    masks = [(layer, m) for layer in masked_layers(model) for m in layer.masks]
    own = task_weights(model)
    returned = sum(key.startswith("mask_") for key in outputs)
    if returned != len(masks):
        raise ValueError(f"export_task returned {returned} masks; "
                         f"the backbone has {len(masks)} masked kernels: another backbone?")
    for i, (layer, mask) in enumerate(masks):
        bits = coding.unpack(outputs[f"mask_{i}"], int(np.prod(mask.shape)), "binary")
        mask.assign(layer.mask_value(bits.reshape(mask.shape)))
    for i, w in enumerate(own):
        w.assign(np.asarray(outputs[f"head_{i}"]))
    return save_task(model, path, class_names=class_names, metrics=metrics)
