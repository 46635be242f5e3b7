"""Keras' front door: `compile` + `fit` train a task as the paper does (BUILD.md, "Keras' front
door"), the CLI, `pb.train` and `fit` run the same step, and Keras' callbacks work."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from conftest import REPO
from tf_piggyback.training.evaluation import sparsity_by_kernel
from tf_piggyback.training.experiment import RunConfig, input_pipeline
from tf_piggyback.training.trainer import epoch_batches

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BUILD = {"piggyback": lambda b, c: pb.piggyback(b, c), "classifier": lambda b, c: pb.classifier_only(b, c),
         "finetune": lambda b, c: pb.finetune(b, c), "lora": lambda b, c: pb.lora(b, c, rank=4)}


@pytest.fixture(scope="module")
def upper():
    return pb.load_digits_variant("upper")


def masks_of(model):
    return [m for layer in pb.masked_layers(model) for m in layer.thresholded_masks()]


def fit_and_train(method, optimizer, data, epochs, seed=0, backbone=pb.digits_backbone):
    """Held-out accuracy of `compile(optimizer)` + `fit` and of `pb.train` with its defaults (the
    paper's), on the same images, epochs and batch size, over `backbone()`."""
    (x, y), (xt, yt), names = data
    accuracies = {}
    for door in ("fit", "train"):
        keras.utils.set_random_seed(seed)
        model = BUILD[method](backbone(), len(names))
        if door == "fit":
            model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
            model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
        else:
            examples = tf.data.Dataset.from_tensor_slices((x, y))
            pb.train(model, epoch_batches(examples, 32, seed=seed),
                     pb.TrainConfig(method=method, epochs=epochs, seed=seed), log=lambda line: None)
        accuracies[door] = pb.evaluate(model, xt, yt)
    return accuracies


def test_compile_adam_and_fit_train_masks_as_the_paper_does(upper):
    """The issue's first try: `compile("adam")` (Keras' default rate, 1e-3) + `fit` ended at chance
    after 5 epochs (0.14-0.20) and at 0.48 after 15, its masks flipped within a few steps. The mask
    variables hold m_r x 10, so the same call moves m_r at the paper's 1e-4."""
    accuracies = fit_and_train("piggyback", "adam", upper, epochs=15)
    assert accuracies["fit"] >= accuracies["train"] - 0.03, accuracies
    assert accuracies["fit"] >= 0.85, accuracies  # measured: 0.96 (pb.train's paper defaults: 0.89)


@pytest.mark.slow  # 4 methods x 2 doors x 15 epochs, and 2 more optimizers: ~2 min
@pytest.mark.parametrize("method,optimizer", [
    ("classifier", "adam"), ("finetune", "adam"), ("lora", "adam"),
    ("piggyback", "adamw"),
    ("piggyback", lambda: keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, 15 * 21))),
], ids=["classifier", "finetune", "lora", "piggyback-adamw", "piggyback-cosine"])
def test_every_method_fits_with_keras_optimizers(upper, method, optimizer):
    optimizer = optimizer() if callable(optimizer) else optimizer
    accuracies = fit_and_train(method, optimizer, upper, epochs=15)
    assert accuracies["fit"] >= accuracies["train"] - 0.03, accuracies


@pytest.mark.slow  # a keras.applications model at 32 px, random weights (Table 5): ~1 min
def test_a_keras_applications_model_fits_as_pb_train_trains_it(upper):
    (x, y), (xt, yt), names = upper
    backbone = keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", alpha=0.35,
                                              input_shape=(32, 32, 3))
    rgb = ((np.repeat(x, 3, axis=-1), y), (np.repeat(xt, 3, axis=-1), yt), names)
    accuracies = fit_and_train("piggyback", "adam", rgb, epochs=10, backbone=lambda: backbone)
    assert accuracies["fit"] >= accuracies["train"] - 0.03, accuracies


def test_the_cli_pb_train_and_fit_learn_the_same_masks(tmp_path):
    """One step, three doors: `scripts/train.py`, `pb.train` and `fit` with Adam at the same rates
    (masks x10 as stored, head as given) on the same batches give the same masks. (`fit("adam")`
    trains the head at Keras' 1e-3; the CLI's default is the paper's 1e-4: `--head_lr=1e-3` matches.)"""
    model_dir = tmp_path / "cli"
    cli = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"), "--backbone=digits",
                          "--dataset=digits:upper", "--epochs=1", "--mask_lr=1e-3", "--head_lr=1e-2", "--verbose=0",
                          f"--model_dir={model_dir}"], capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 0, cli.stderr[-2000:]
    doors = {"cli": masks_of(pb.load_task(str(model_dir / "task.npz"), pb.digits_backbone()))}
    config = RunConfig(backbone="digits", dataset="digits:upper", train=pb.TrainConfig(epochs=1, mask_lr=1e-3,
                                                                                       head_lr=1e-2))
    batches = input_pipeline(config, (32, 32, 1))[1](0)  # the CLI's first epoch
    for door in ("train", "fit"):
        backbone = pb.digits_backbone()
        keras.utils.set_random_seed(0)  # after the backbone is made, as experiment.run seeds
        model = pb.piggyback(backbone, 5)
        if door == "train":
            pb.train(model, batches, config.train, log=lambda line: None)
        else:
            model.compile(keras.optimizers.Adam(1e-2), LOSS)
            model.fit(batches, epochs=1, verbose=0)
        doors[door] = masks_of(model)
    params = sum(m.size for m in doors["cli"])
    zeros = sum(int(np.sum(m == 0)) for m in doors["cli"])
    assert zeros > 1000, zeros  # masks did move: the comparison is not vacuous
    for door in ("train", "fit"):
        flipped = sum(int(np.sum(a != b)) for a, b in zip(doors["cli"], doors[door]))
        assert flipped <= params * 1e-4, (door, flipped, zeros, params)


def test_fit_logs_sparsity_for_tensorboard_and_stops_early(upper, tmp_path):
    (x, y), _, _ = upper
    keras.utils.set_random_seed(0)
    model = pb.piggyback(pb.digits_backbone(), 5)
    model.compile("adam", LOSS, metrics=["accuracy"])
    logs = str(tmp_path / "logs")
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0, callbacks=[
        pb.MaskSparsity(log_dir=logs), pb.TrainingMonitor(labels=y), keras.callbacks.TensorBoard(logs),
        keras.callbacks.EarlyStopping(monitor="mask_sparsity", mode="max", patience=0, min_delta=0.5)])
    assert len(history.history["mask_sparsity"]) == 2  # no epoch raised it by 0.5: stopped after the second
    assert history.history["mask_sparsity"][-1] == pytest.approx(sparsity_by_kernel(model)["overall"])
    assert history.history["at_chance"][0] == 0.0  # the first epoch is never judged
    tags = set()
    for folder, _, files in os.walk(logs):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
                tags |= {value.tag for value in event.summary.value}
    assert {"epoch_mask_sparsity", "sparsity/overall", "sparsity/conv1/kernel"} <= tags, tags


def test_fit_warns_at_chance_and_stops_on_a_diverged_loss(upper):
    (x, y), _, _ = upper
    model = pb.piggyback(pb.digits_backbone(), 5)
    for layer in pb.masked_layers(model):  # a dead network: every weight masked off, constant outputs
        for mask in layer.masks:
            mask.assign(layer.mask_value(np.zeros(mask.shape)))
    model.compile(keras.optimizers.Adam(1e-9), LOSS, metrics=["accuracy"])
    warnings = []
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[pb.TrainingMonitor(labels=y, log=warnings.append)])
    assert history.history["at_chance"] == [0.0, 1.0]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 2 trained at chance level") and "1e-09" in warnings[0]

    model = pb.classifier_only(pb.digits_backbone(), 5)
    model.compile(keras.optimizers.SGD(1e38), LOSS)
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) in batch \d+: .*learning rate \(now 1e\+38\)"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[pb.TrainingMonitor()])


INTERRUPTED = textwrap.dedent("""
    import sys
    import keras
    import tf_piggyback as pb
    (x, y), _, _ = pb.load_digits_variant("upper")
    backup, out, crash_after = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == crash_after:
                raise SystemExit(3)  # after BackupAndRestore saved this epoch, as a kill would find it

    keras.utils.set_random_seed(0)
    model = pb.piggyback(pb.digits_backbone(), 5)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=4, batch_size=32, shuffle=False, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), Crash()])
    print("epochs run:", len(history.history["loss"]))
    pb.save_task(model, out)
""")


def test_a_killed_fit_with_backup_and_restore_resumes_to_the_same_task_file(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-c", INTERRUPTED, *map(str, args)], capture_output=True, text=True,
                              cwd=REPO)

    straight = run(tmp_path / "b1", tmp_path / "straight.npz", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = run(tmp_path / "b2", tmp_path / "resumed.npz", 2)
    assert crashed.returncode == 3 and not (tmp_path / "resumed.npz").exists()
    resumed = run(tmp_path / "b2", tmp_path / "resumed.npz", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epochs run: 2" in resumed.stdout  # epochs 3 and 4 only
    assert (tmp_path / "straight.npz").read_bytes() == (tmp_path / "resumed.npz").read_bytes()


MIRRORED = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import tf_piggyback as pb
    (x, y), (xt, yt), _ = pb.load_digits_variant("upper")
    x, y = x[:640], y[:640]  # whole batches: a short last batch splits 16/15, and each replica averages its own
    masks, accuracy = {}, {}
    for name, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", tf.distribute.MirroredStrategy())):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = pb.piggyback(pb.digits_backbone(), 5)
            model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
        masks[name] = [m for layer in pb.masked_layers(model) for m in layer.thresholded_masks()]
        accuracy[name] = pb.evaluate(model, xt, yt)
    flipped = int(sum(np.sum(a != b) for a, b in zip(masks["default"], masks["mirrored"])))
    zeros = int(sum(np.sum(a == 0) for a in masks["default"]))
    params = int(sum(a.size for a in masks["default"]))
    print(json.dumps({"flipped": flipped, "zeros": zeros, "params": params, "accuracy": accuracy,
                      "replicas": strategy.num_replicas_in_sync}))
""")


def test_fit_under_mirrored_strategy_on_two_cpus_learns_the_same_masks():
    """As `pb.train`'s mirrored test: two replicas sum gradients in another order, so a mask on the
    threshold may land on the other side (at most 1 in 10,000)."""
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["replicas"] == 2 and outcome["zeros"] > 1000, outcome
    assert outcome["flipped"] <= outcome["params"] * 1e-4, outcome


def test_packnet_refuses_a_fit_that_does_not_mask_gradients(upper):
    (x, y), _, _ = upper
    pack = pb.PackNet(pb.digits_backbone())

    def keras_fit(model, phase):
        model.compile("adam", LOSS)
        model.fit(x[:64], y[:64], epochs=1, verbose=0)

    with pytest.raises(ValueError, match=r"^PackNet's fit changed .* weights that earlier tasks or the backbone own: "
                                         r"Keras' model.fit cannot mask gradients; train with tf_piggyback.train"):
        pack.add_task(keras_fit, num_classes=5)


def test_a_model_checkpoint_restores_into_a_task_model_and_saves_the_same_task_file(upper, tmp_path):
    """`ModelCheckpoint` works as Keras made it; a `.keras` file reads back as a plain Keras model
    (no task spec), so a task is saved from the task model that its weights are loaded into."""
    (x, y), (xt, yt), _ = upper
    model = pb.piggyback(pb.digits_backbone(), 5)
    model.compile("adam", LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=2, verbose=0, validation_data=(xt, yt), callbacks=[
        keras.callbacks.ModelCheckpoint(str(tmp_path / "last.weights.h5"), save_weights_only=True),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "last.keras"))])
    pb.save_task(model, str(tmp_path / "trained.npz"))
    again = pb.piggyback(pb.digits_backbone(), 5)
    again.load_weights(str(tmp_path / "last.weights.h5"))
    pb.save_task(again, str(tmp_path / "restored.npz"))
    assert (tmp_path / "trained.npz").read_bytes() == (tmp_path / "restored.npz").read_bytes()
    reloaded = keras.models.load_model(str(tmp_path / "last.keras"))
    np.testing.assert_allclose(reloaded.predict(xt[:8], verbose=0), model.predict(xt[:8], verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match=r"read back from a \.keras file is not: make the task model again"):
        pb.save_task(reloaded, str(tmp_path / "refused.npz"))
