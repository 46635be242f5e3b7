import numpy as np
import pytest

from tf_piggyback.datasets import load_dataset, load_digits_variant


def test_digits_variants():
    (xb, yb), (xbt, ybt), base_names = load_digits_variant("base")
    (xu, yu), (xut, yut), upper_names = load_digits_variant("upper")
    (xi, yi), (xit, yit), inverted_names = load_digits_variant("inverted")
    assert base_names == ["0", "1", "2", "3", "4"] and upper_names == ["5", "6", "7", "8", "9"]
    assert len(inverted_names) == 10
    for x, y, classes in [(xb, yb, 5), (xu, yu, 5), (xi, yi, 10), (xbt, ybt, 5), (xit, yit, 10)]:
        assert x.shape[1:] == (32, 32, 1) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 255 and set(np.unique(y)) == set(range(classes))
    # inverted = every digit with intensities flipped; the split is the same one.
    (xa, _), (xat, _), _ = load_digits_variant("all")
    np.testing.assert_allclose(xi, 255.0 - xa)
    assert len(xit) == len(xat) == len(xbt) + len(xut)
    # the test split is a quarter of every digit, and the same in every call
    assert abs(len(xbt) / (len(xb) + len(xbt)) - 0.25) < 0.01
    np.testing.assert_array_equal(load_digits_variant("upper")[1][0], xut)


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown digits variant 'lower'"):
        load_digits_variant("lower")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
