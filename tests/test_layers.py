import os

import keras
import numpy as np
import pytest

from tf_piggyback.core.layers import (
                                      MaskedConv,
                                      MaskedDense,
                                      MaskedDepthwiseConv2D,
                                      MaskedLayer,
                                      MaskedSeparableConv2D,
                                      wrapper_for,
                                      )
from tf_piggyback.core.layers import MASK_VARIABLE_SCALE
from tf_piggyback.training.trainer import precision_policy

CASES = [
    (lambda: keras.layers.Dense(7, activation="tanh"), (5, 6)),
    (lambda: keras.layers.Dense(4), (2, 3, 6)),
    (lambda: keras.layers.Conv1D(4, 3, strides=2, padding="same"), (2, 11, 3)),
    (lambda: keras.layers.Conv2D(6, 3, dilation_rate=2, activation="relu"), (2, 13, 13, 3)),
    (lambda: keras.layers.Conv2D(6, 3, groups=2, padding="same", use_bias=False), (2, 8, 8, 4)),
    (lambda: keras.layers.Conv3D(2, 2), (1, 5, 5, 5, 2)),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same"), (2, 9, 9, 3)),
    (lambda: keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, activation="relu"), (2, 9, 9, 3)),
]


@pytest.mark.parametrize("make,shape", CASES)
def test_all_ones_mask_equals_plain_layer(make, shape):
    plain = make()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    expected = plain(x).numpy()
    if plain.use_bias:
        plain.bias.assign(np.random.default_rng(1).normal(size=plain.bias.shape))
        expected = plain(x).numpy()
    wrapped = wrapper_for(plain)(plain)
    np.testing.assert_allclose(wrapped(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert wrapped.thresholded_masks()[0].min() == 1
    assert not plain.trainable and all("mask" in w.path for w in wrapped.trainable_weights)


def test_zero_mask_entries_remove_weights():
    dense = keras.layers.Dense(3, use_bias=False)
    wrapped = MaskedDense(dense)
    x = np.ones((1, 4), "float32")
    wrapped(x)
    mask = np.random.default_rng(0).random((4, 3)) > 0.5
    wrapped.masks[0].assign(np.where(mask, 1.0, 0.0))
    np.testing.assert_allclose(wrapped(x).numpy(), x @ (dense.kernel.numpy() * mask), rtol=1e-6)


@pytest.mark.parametrize("cls", [MaskedConv, MaskedDense, MaskedDepthwiseConv2D, MaskedSeparableConv2D])
def test_keras_round_trip(cls, tmp_path):
    layer = {
        MaskedConv: lambda: keras.layers.Conv2D(3, 3),
        MaskedDense: lambda: keras.layers.Dense(3),
        MaskedDepthwiseConv2D: lambda: keras.layers.DepthwiseConv2D(3),
        MaskedSeparableConv2D: lambda: keras.layers.SeparableConv2D(3, 3),
    }[cls]()
    inputs = keras.Input((8, 8, 2))
    wrapped = cls(layer, threshold=1e-3, mask_init="uniform", mask_scale=0.5, mask_type="ternary")
    model = keras.Model(inputs, wrapped(inputs))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype("float32")
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    again = loaded.layers[-1]
    assert type(again) is cls
    assert (again.threshold, again.mask_init, again.mask_scale, again.mask_type) == (1e-3, "uniform", 0.5, "ternary")
    assert not again.layer.trainable


def test_mask_inits():
    dense = keras.layers.Dense(50)
    dense.build((None, 40))
    constant = MaskedDense(dense, mask_scale=0.02)
    constant.build((None, 40))
    assert np.all(constant.masks[0].numpy() == np.float32(0.02 * MASK_VARIABLE_SCALE))  # held as m_r * scale
    uniform = MaskedDense(dense, mask_init="uniform", mask_scale=0.3)
    uniform.build((None, 40))
    values = uniform.masks[0].numpy()
    assert values.min() >= -3.0 and values.max() <= 3.0 and values.std() > 1.0
    weight_based = MaskedDense(dense, mask_init="weight_based")
    weight_based.build((None, 40))
    np.testing.assert_allclose(weight_based.masks[0].numpy(), np.mean(np.abs(dense.kernel.numpy())) * MASK_VARIABLE_SCALE,
                               rtol=1e-6)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1000\].*threshold=-1"):
        MaskedDense(keras.layers.Dense(2), threshold=-1)
    with pytest.raises(ValueError, match=r"mask_init must be one of constant, uniform, weight_based.*'ones'"):
        MaskedDense(keras.layers.Dense(2), mask_init="ones")
    with pytest.raises(ValueError, match=r"mask_type must be one of binary, ternary"):
        MaskedDense(keras.layers.Dense(2), mask_type="quaternary")
    with pytest.raises(ValueError, match=r"mask_scale must be a number > 0"):
        MaskedDense(keras.layers.Dense(2), mask_scale=0)
    with pytest.raises(ValueError, match=r"MaskedDense wraps Dense.*Conv2D"):
        MaskedDense(keras.layers.Conv2D(2, 3))
    assert wrapper_for(keras.layers.SimpleRNN(2)) is None
    assert wrapper_for(keras.layers.Conv1D(2, 3, padding="causal")) is None


def test_transposed_convolution_computes_with_the_masked_kernel():
    """`MaskedLayer` runs the layer's own op (here Conv2DTranspose, §6's upsampling) on `W ⊙ m`."""
    keras.utils.set_random_seed(0)
    layer = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu")
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype("float32")
    expected_all_ones = layer(x).numpy()
    wrapped = wrapper_for(layer)(layer)
    assert isinstance(wrapped, MaskedLayer)
    np.testing.assert_allclose(wrapped(x).numpy(), expected_all_ones, atol=1e-6)
    mask = np.random.default_rng(1).random(layer.kernel.shape) < 0.5
    wrapped.masks[0].assign(wrapped.mask_value(mask))
    plain = keras.layers.Conv2DTranspose.from_config(layer.get_config())
    plain.build(x.shape)
    plain.set_weights([layer.kernel.numpy() * mask, layer.bias.numpy()])
    np.testing.assert_allclose(wrapped(x).numpy(), plain(x).numpy(), atol=1e-6)
    assert np.array_equal(layer(x).numpy(), expected_all_ones)  # the wrapped layer itself is unchanged


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_thresholds_the_float32_mask(policy):
    # In bfloat16, 0.0499 and tau * MASK_VARIABLE_SCALE = 0.05 round to the same number:
    # thresholding an autocast m_r would keep a weight that the stored (float32) mask drops.
    with precision_policy(policy):
        dense = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones")
        wrapped = MaskedDense(dense)
        x = np.ones((1, 1), "float32")
        wrapped(x)
    wrapped.masks[0].assign([[0.0499, 0.0501]])
    outputs = wrapped(x)
    assert wrapped.compute_dtype == policy.split("_")[1] and wrapped.masks[0].dtype == "float32"
    np.testing.assert_array_equal(np.asarray(outputs, "float32"), [[0.0, 1.0]])
    np.testing.assert_array_equal(wrapped.thresholded_masks()[0], [[0, 1]])


def test_a_network_that_starts_dead_is_refused_or_warned(caplog):
    """§3 starts training from the backbone itself (every mask 1): a constant or uniform init
    below the threshold would start every mask at 0, so it is refused naming the flags; a
    weight-based init whose mean |W| is below it is warned about, naming the layer."""
    with pytest.raises(ValueError, match=r"mask_scale=0.01 is below threshold=0.05.*raise --mask_scale or lower --threshold"):
        MaskedDense(keras.layers.Dense(2), threshold=0.05)
    with pytest.raises(ValueError, match="would start at 0"):
        MaskedDense(keras.layers.Dense(2), mask_init="uniform", mask_scale=0.004)
    dense = keras.layers.Dense(4, name="small")
    dense.build((None, 3))
    dense.kernel.assign(np.full((3, 4), 1e-3, np.float32))
    wrapper = MaskedDense(dense, mask_init="weight_based")
    wrapper.build((None, 3))
    assert "layer small: mean |W| = 0.001 is below threshold=0.005" in caplog.text
    assert not wrapper.thresholded_masks()[0].any()


def test_lora_and_quantized_layers_are_refused():
    """The wrapper runs the layer's op itself; LoRA adapters or quantized kernels would be ignored."""
    lora = keras.layers.Dense(4, name="adapted")
    lora.build((None, 3))
    lora.enable_lora(2)
    with pytest.raises(ValueError, match="cannot mask layer 'adapted': it has LoRA enabled"):
        MaskedDense(lora)
    quantized = keras.layers.Dense(4, name="int8")
    quantized.build((None, 3))
    quantized.quantize("int8")
    with pytest.raises(ValueError, match="cannot mask layer 'int8': it has quantization_mode='int8'"):
        MaskedDense(quantized)
