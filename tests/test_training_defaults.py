"""The default schedules train networks without BatchNormalization (issue 33: VGG16 finetuned at the
paper's SGD 1e-3 died in its first epoch)."""

import numpy as np
import pytest

import tf_piggyback as pb
from tf_piggyback.core import methods
from tf_piggyback.training.experiment import RunConfig, run


def no_bn_backbone(path):
    """A small VGG-style network without BatchNormalization whose activations are as large as a
    trained VGG16's on caffe-preprocessed pixels (0-255, mean subtracted): He-scaled weights, which
    keep each layer's activation scale, on centred 0-255 inputs. Written as a `.keras` file."""
    import keras

    rng = np.random.default_rng(0)
    inputs = keras.Input((32, 32, 1), name="image")
    x = keras.layers.Rescaling(1.0, offset=-128.0, name="center")(inputs)
    for i, filters in enumerate((32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i in (1, 2):  # VGG's fc6 and fc7
        x = keras.layers.Dense(256, activation="relu", name=f"fc{i}")(x)
    model = keras.Model(inputs, x, name="vgg_no_bn")
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            fan_in = int(np.prod(layer.kernel.shape[:-1]))
            layer.kernel.assign(rng.normal(0, np.sqrt(2 / fan_in), layer.kernel.shape).astype("float32"))
    model.save(path)
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return no_bn_backbone(str(tmp_path_factory.mktemp("backbone") / "vgg_no_bn.keras"))


@pytest.mark.parametrize("method", methods.names())
def test_the_defaults_train_a_network_without_batchnorm(method, backbone, tmp_path):
    """Two epochs at the defaults: the loss is finite and falls, not to the ln 5 of a network whose
    ReLUs all died (the Adam methods, at 1e-4, are still far above it). At the paper's schedule
    (`warmup_epochs=0`) finetune's loss overflows to inf in its first epoch and PackNet's ReLUs
    die (its loss sits at ln 5 from the second epoch on)."""
    history = []
    config = RunConfig(backbone=backbone, dataset="digits:upper", train=pb.TrainConfig(method=method, epochs=2))
    run(config, str(tmp_path / "run"), log=history.append)
    losses = [float(line.split()[3]) for line in history if line.startswith("epoch")][:2]
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0], history
    # A dead network's loss falls too, from a first epoch's overflow to ln 5, and sits there.
    assert abs(losses[1] - np.log(5)) > 0.005 * np.log(5), history
