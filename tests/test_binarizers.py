import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_piggyback.core.binarizers import binarize, ternarize, threshold_mask, threshold_mask_numpy, validate_threshold
from tf_piggyback.core.layers import MaskedDense


def test_binarize_forward_matches_eq4():
    m_r = tf.constant([-1.0, 0.0, 0.004, 0.005, 0.006, 1.0])
    assert binarize(m_r, tf.constant(5e-3)).numpy().tolist() == [0, 0, 0, 1, 1, 1]


def test_ternarize_forward_uses_two_cutoffs():
    m_r = tf.constant([-1.0, -1e-6, 0.0, 0.004, 0.005, 1.0])
    assert ternarize(m_r, tf.constant(5e-3)).numpy().tolist() == [-1, -1, 0, 0, 1, 1]


@pytest.mark.parametrize("mask_type", ["binary", "ternary"])
def test_backward_is_straight_through(mask_type):
    m_r = tf.Variable([-0.3, 0.001, 0.02])
    upstream = tf.constant([2.0, -3.0, 5.0])
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(threshold_mask(tf.convert_to_tensor(m_r), 5e-3, mask_type) * upstream)
    np.testing.assert_array_equal(tape.gradient(out, m_r).numpy(), upstream.numpy())


def test_numpy_twin_agrees():
    m_r = np.array([-1.0, -1e-6, 0.0, 0.004, 0.005, 1.0], np.float32)
    for mask_type in ("binary", "ternary"):
        expected = threshold_mask(m_r, 5e-3, mask_type).numpy()
        np.testing.assert_array_equal(threshold_mask_numpy(m_r, 5e-3, mask_type), expected)


def test_dense_mask_gradient_is_eq7_by_hand():
    """dL/dm_r = (dy · xᵀ) ⊙ W (Eq. 7), here in Keras' (in, out) kernel layout: (xᵀ · dy) ⊙ W."""
    dense = keras.layers.Dense(2, use_bias=False)
    dense.build((None, 3))
    w = np.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]], np.float32)
    dense.kernel.assign(w)
    layer = MaskedDense(dense)
    layer.build((None, 3))
    layer.masks[0].assign(layer.mask_value(np.array([[1, 0], [1, 1], [0, 1]])))
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    dy = np.array([[0.5, -1.0]], np.float32)
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y * dy)
    grad = tape.gradient(loss, layer.masks[0]).numpy()
    by_hand = np.array([[1 * 0.5, 1 * -1.0], [2 * 0.5, 2 * -1.0], [3 * 0.5, 3 * -1.0]]) * w
    np.testing.assert_allclose(grad, by_hand, rtol=1e-6)
    # The forward pass uses W ⊙ m with m = [[1, 0], [1, 1], [0, 1]].
    np.testing.assert_allclose(y.numpy(), x @ (w * np.array([[1, 0], [1, 1], [0, 1]])), rtol=1e-6)
    assert [w.path for w in layer.trainable_weights] == [layer.masks[0].path]


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), 1e4, "0.1", None, True])
def test_threshold_must_be_a_number_in_the_valid_range(bad):
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1000\]"):
        validate_threshold(bad)
