"""Masked wrappers: a frozen, shared Keras layer whose kernels are multiplied by a learned mask.

Reference: Mallya et al., "Piggyback", ECCV 2018, §3 and Fig. 1: `y = (W ⊙ m) x`, with `W`
fixed and only the real-valued mask `m_r` trained through the thresholding of Eq. 4.
"""

import inspect
import logging

import keras
import numpy as np
from keras import ops

from tf_piggyback.core.binarizers import (
                                          DEFAULT_THRESHOLD,
                                          real_from_mask,
                                          threshold_mask,
                                          threshold_mask_numpy,
                                          validate_mask_type,
                                          validate_threshold,
                                          )

MASK_INITS = ("constant", "uniform", "weight_based")
DEFAULT_MASK_SCALE = 1e-2
# A mask variable holds `m_r` times this (BUILD.md, "Keras' front door"). Adam and its kin move a
# variable by about their learning rate per step, whatever the gradient's scale, so Keras' default
# rate (1e-3) moves `m_r` at the paper's mask rate (1e-4, §4): `compile("adam")` + `fit` trains a
# task as the paper does (the same update in exact arithmetic; the cut sits at `tau` times this).
MASK_VARIABLE_SCALE = 10.0


class MaskedWrapper(keras.layers.Wrapper):
    """Base class: wraps `layer`, freezes it and learns one mask per kernel.

    The wrapped layer's weights stay the layer's own variables (so several task models
    share one backbone); the wrapper adds a trainable `m_r` of each kernel's shape,
    made in `build` and held as `m_r * MASK_VARIABLE_SCALE` (so Keras' optimizers at their
    default rates move it at the paper's; `variable_threshold` is where it is cut, and
    `mask_value` gives the value that stores a thresholded mask). Subclasses say which
    kernels are masked and how the op is run.

    Args:
        layer: the Keras layer to wrap; it is set to `trainable=False`.
        threshold: `tau` of Eq. 4, > 0. Default 5e-3 as in §3.
        mask_init: `"constant"` (every `m_r` = `mask_scale`, §3 approach 2, the paper's
            choice), `"uniform"` (U(-mask_scale, mask_scale)) or `"weight_based"`
            (every `m_r` = mean |W| of the layer, §3 approach 1; the mask then starts
            all-ones only where that mean is >= `threshold`).
        mask_scale: the constant for `"constant"`, the range for `"uniform"`. Default 1e-2.
        mask_type: `"binary"` ({0, 1}, Eq. 4) or `"ternary"` ({-1, 0, 1}, end of §3).

    Reference: §3, Eq. 4-7.
    """

    wrapped_types = ()
    kernel_names = ("kernel",)

    def __init__(
        self,
        layer,
        threshold=DEFAULT_THRESHOLD,
        mask_init="constant",
        mask_scale=DEFAULT_MASK_SCALE,
        mask_type="binary",
        **kwargs,
    ):
        if not isinstance(layer, self.wrapped_types):
            raise ValueError(
                f"{type(self).__name__} wraps {', '.join(t.__name__ for t in self.wrapped_types)}. "
                f"Received: layer={layer.name!r} of type {type(layer).__name__}"
            )
        # The wrapper computes the layer's op itself (kernel ⊙ mask, bias, activation), so a LoRA
        # adapter or a quantized kernel would be silently ignored.
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            mode = "LoRA enabled" if getattr(layer, "lora_enabled", False) else \
                f"quantization_mode={layer.quantization_mode!r}"
            raise ValueError(f"cannot mask layer {layer.name!r}: it has {mode}; mask the float backbone "
                             "(before enable_lora() or quantize())")
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)  # mixed precision follows the backbone
        super().__init__(layer, **kwargs)
        self.threshold = validate_threshold(threshold)
        if mask_init not in MASK_INITS:
            raise ValueError(
                f"mask_init must be one of {', '.join(MASK_INITS)}. Received: mask_init={mask_init!r}"
            )
        self.mask_init = mask_init
        if isinstance(mask_scale, bool) or not isinstance(mask_scale, (int, float)) or not mask_scale > 0:
            raise ValueError(f"mask_scale must be a number > 0. Received: mask_scale={mask_scale!r}")
        self.mask_scale = float(mask_scale)
        self.mask_type = validate_mask_type(mask_type)
        if mask_init != "weight_based" and self.mask_scale < self.threshold:
            # §3 starts from the backbone itself: every mask 1. Below tau every m_r thresholds to 0.
            raise ValueError(
                f"mask_scale={self.mask_scale:g} is below threshold={self.threshold:g}: with mask_init="
                f"{mask_init!r} every mask would start at 0 (a dead network); raise --mask_scale or lower "
                "--threshold")
        self.layer.trainable = False

    def build(self, input_shape=None):
        super().build(input_shape)
        self.masks = []
        for kernel_name, kernel in zip(self.kernel_names, self.kernels):
            mask_name = self._mask_name(kernel_name)
            self.masks.append(
                self.add_weight(
                    name=mask_name,
                    shape=tuple(kernel.shape),
                    initializer=self._mask_initializer(kernel),
                    trainable=True,
                    # m_r is thresholded in float32 under mixed precision too, so training
                    # sees exactly the mask that is stored (a bfloat16 m_r near tau could round
                    # to the other side).
                    autocast=False,
                )
            )
        self.built = True

    def _mask_name(self, kernel_name):
        return "mask" if len(self.kernel_names) == 1 else f"{kernel_name}_mask"

    def _mask_initializer(self, kernel):
        scale = self.mask_scale * MASK_VARIABLE_SCALE
        if self.mask_init == "constant":
            return keras.initializers.Constant(scale)
        if self.mask_init == "uniform":
            return keras.initializers.RandomUniform(-scale, scale)
        mean = float(np.mean(np.abs(ops.convert_to_numpy(kernel))))
        if mean < self.threshold:
            logging.warning("layer %s: mean |W| = %.3g is below threshold=%g, so mask_init='weight_based' starts "
                            "its mask at all 0 (§3 starts from all 1); lower --threshold or use "
                            "--mask_init=constant", self.name, mean, self.threshold)
        return keras.initializers.Constant(mean * MASK_VARIABLE_SCALE)

    @property
    def variable_threshold(self):
        """Where a mask variable is cut: `threshold` (tau of Eq. 4) times `MASK_VARIABLE_SCALE`."""
        return self.threshold * MASK_VARIABLE_SCALE

    def mask_value(self, mask):
        """The float32 value of a mask variable that thresholds to `mask` ({0, 1} or {-1, 0, 1}),
        as a task file's masks are loaded (`binarizers.real_from_mask`)."""
        return real_from_mask(mask, self.variable_threshold)

    @property
    def kernels(self):
        """The wrapped layer's frozen kernels, in the order of `masks`."""
        return [getattr(self.layer, name) for name in self.kernel_names]

    def masked_kernels(self):
        """`W ⊙ m` for each kernel in the compute dtype, differentiable in `m_r` (straight-through)."""
        kernels = [ops.convert_to_tensor(kernel) for kernel in self.kernels]  # autocast under mixed precision
        return [
            kernel * ops.cast(threshold_mask(mask, self.variable_threshold, self.mask_type), kernel.dtype)
            for kernel, mask in zip(kernels, self.masks)
        ]

    def thresholded_masks(self):
        """The current masks as int8 NumPy arrays with values in {0, 1} (or {-1, 0, 1})."""
        return [
            threshold_mask_numpy(ops.convert_to_numpy(m), self.variable_threshold, self.mask_type)
            for m in self.masks
        ]

    def call(self, inputs):
        outputs = self.apply_kernels(inputs, *self.masked_kernels())
        if self.layer.use_bias:
            outputs = _add_bias(outputs, self.layer.bias, getattr(self.layer, "data_format", None))
        if self.layer.activation is not None:
            outputs = self.layer.activation(outputs)
        return outputs

    def apply_kernels(self, inputs, *kernels):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "threshold": self.threshold,
            "mask_init": self.mask_init,
            "mask_scale": self.mask_scale,
            "mask_type": self.mask_type,
        }


def _add_bias(outputs, bias, data_format):
    if data_format == "channels_first":
        bias = ops.reshape(bias, (1, -1) + (1,) * (len(outputs.shape) - 2))
    return outputs + bias


def _conv_args(layer):
    return dict(
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
    )


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedDense(MaskedWrapper):
    """A `keras.layers.Dense` with a learned mask on its kernel. See `MaskedWrapper`."""

    wrapped_types = (keras.layers.Dense,)

    def apply_kernels(self, inputs, kernel):
        return ops.matmul(inputs, kernel)


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedConv(MaskedWrapper):
    """A `Conv1D` / `Conv2D` / `Conv3D` (any groups) with a learned mask. See `MaskedWrapper`."""

    wrapped_types = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)

    def __init__(self, layer, **kwargs):
        if getattr(layer, "padding", None) == "causal":
            raise ValueError(
                f"Causal padding is not supported for masking. Received: layer={layer.name!r}"
            )
        super().__init__(layer, **kwargs)

    def apply_kernels(self, inputs, kernel):
        return ops.conv(inputs, kernel, **_conv_args(self.layer))


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedDepthwiseConv2D(MaskedWrapper):
    """A `keras.layers.DepthwiseConv2D` with a learned mask. See `MaskedWrapper`."""

    wrapped_types = (keras.layers.DepthwiseConv2D,)

    def apply_kernels(self, inputs, kernel):
        return ops.depthwise_conv(inputs, kernel, **_conv_args(self.layer))


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedSeparableConv2D(MaskedWrapper):
    """A `keras.layers.SeparableConv2D`, both kernels masked. See `MaskedWrapper`."""

    wrapped_types = (keras.layers.SeparableConv2D,)
    kernel_names = ("depthwise_kernel", "pointwise_kernel")

    def apply_kernels(self, inputs, depthwise_kernel, pointwise_kernel):
        return ops.separable_conv(inputs, depthwise_kernel, pointwise_kernel, **_conv_args(self.layer))


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedLayer(MaskedWrapper):
    """`EinsumDense`, `MultiHeadAttention` (its query, key, value and output projections) and
    transposed convolutions, every kernel masked. See `MaskedWrapper`.

    The layer runs its own `call` (attention masks, dropout, causal masking included) inside a
    `keras.StatelessScope` that gives each of its kernels the value `W ⊙ m` and its other
    weights their current values; nothing of the op is re-implemented. Updates the layer makes
    (a dropout's seed state) are applied after the call.

    Reference: §3 (any `y = (W ⊙ m) x`); for transformers, Zhao et al., EMNLP 2020 (masking BERT).
    """

    wrapped_types = (keras.layers.EinsumDense, keras.layers.MultiHeadAttention, keras.layers.Conv1DTranspose,
                     keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)

    @property
    def kernel_names(self):
        """Each kernel's path inside the layer, e.g. `query/kernel` in `MultiHeadAttention`."""
        return [w.path.split("/", 1)[-1] for w in self._kernel_weights()]

    @property
    def kernels(self):
        return self._kernel_weights()

    def _kernel_weights(self):
        return [w for w in self.layer.weights if is_kernel(w)]

    def _mask_name(self, kernel_name):
        return "mask" if len(self.kernels) == 1 else kernel_name.replace("/", "_") + "_mask"

    def build(self, input_shape=None):
        super().build(input_shape)
        self._takes_training = "training" in inspect.signature(self.layer.call).parameters

    def call(self, *args, training=None, **kwargs):
        products = {id(k): m for k, m in zip(self.kernels, self.masked_kernels())}
        values = {id(v): products.get(id(v), v.value) for v in self.layer.variables}
        if self._takes_training:
            kwargs["training"] = training
        with keras.StatelessScope([(v, values[id(v)]) for v in self.layer.variables],
                                  initialize_variables=False) as scope:
            outputs = self.layer(*args, **kwargs)
        for v in self.layer.variables:
            if scope.get_current_value(v) is not values[id(v)]:
                v.assign(scope.get_current_value(v))
        return outputs

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedEmbedding(MaskedLayer):
    """An `Embedding` table masked like a kernel (`piggyback(mask_embeddings=True)`, the default):
    each row a token's weights, 1 bit per entry. The layer's own `call` runs with `W ⊙ m`.

    Reference: §3; for language backbones, Zhao et al., EMNLP 2020 (masks over BERT's weights).
    """

    wrapped_types = (keras.layers.Embedding,)

    def _kernel_weights(self):
        return [self.layer.embeddings]


@keras.saving.register_keras_serializable(package="tf_piggyback")
class MaskedComposite(MaskedLayer):
    """A layer of any class that holds its kernels in sublayers, at any depth (a user's `Layer`
    subclass with `Dense` layers inside, a transformer block): every `kernel` it owns is masked
    and its own `call` runs as `MaskedLayer` runs one, so the library need not know its class.
    Each mask is named after its kernel's path inside the layer (`mlp/fc1/kernel`), and task
    files name masks by the kernel's full path.

    Reference: §3 (any `y = (W ⊙ m) x`).
    """

    wrapped_types = (keras.layers.Layer,)


def is_kernel(weight):
    """Whether `weight` is a layer's `kernel` (not a `recurrent_kernel` or a LoRA adapter)."""
    return weight.path.rsplit("/", 1)[-1] == "kernel"


def is_composite(layer):
    """Whether `layer` holds kernels in sublayers and no recurrent ones (whose recurrent kernels
    a mask over `kernel` weights would miss)."""
    sublayers = layer._flatten_layers(include_self=False)
    return (not isinstance(layer, (keras.Model, keras.layers.RNN))
            and any(is_kernel(w) for sub in sublayers for w in sub.weights)
            and not any(w.path.rsplit("/", 1)[-1] == "recurrent_kernel" for w in layer.weights))


# Most specific class first: SeparableConv2D and DepthwiseConv2D are not Conv2D subclasses in
# Keras 3, but user subclasses of any of these are matched by isinstance.
WRAPPERS = (MaskedSeparableConv2D, MaskedDepthwiseConv2D, MaskedConv, MaskedDense, MaskedLayer, MaskedEmbedding)


def wrapper_for(layer):
    """The masked wrapper class for `layer`, or None when its type is not supported."""
    for cls in WRAPPERS:
        if isinstance(layer, cls.wrapped_types) and getattr(layer, "padding", None) != "causal":
            return cls
    if isinstance(layer, keras.layers.Layer) and is_composite(layer):
        return MaskedComposite
    return None
