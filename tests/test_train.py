"""scripts/train.py as users run it: CLI, resume after kill -9, MirroredStrategy, multi-worker."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tf_piggyback as pb
from conftest import REPO

TRAIN = os.path.join(REPO, "scripts", "train.py")
BASE = ["--backbone=digits", "--dataset=digits:upper", "--head_lr=1e-3", "--verbose=0"]


def train_cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, **kwargs)


def test_train_cli_writes_task_metrics_config_and_logs(tmp_path):
    model_dir = str(tmp_path / "run")
    result = train_cli(*BASE, f"--model_dir={model_dir}", "--epochs=2")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("accuracy", "top1_error", "sparsity", "params", "task_bytes", "config"):
        assert key in metrics
    assert metrics["task_bytes"] == os.path.getsize(os.path.join(model_dir, "task.npz"))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    assert config["dataset"] == "digits:upper" and config["train"]["epochs"] == 2 and config["train"]["head_lr"] == 1e-3
    assert any(name.startswith("events") for name in os.listdir(os.path.join(model_dir, "logs")))
    # reload in a fresh process: same accuracy
    evaluate = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--backbone=digits",
         f"--task={model_dir}/task.npz", "--dataset=digits:upper"], capture_output=True, text=True, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] == metrics["accuracy"]
    # a second run with other settings in the same model_dir is refused, the first one kept
    before = open(os.path.join(model_dir, "task.npz"), "rb").read()
    again = train_cli(*BASE, f"--model_dir={model_dir}", "--epochs=2", "--threshold=0.01")
    assert again.returncode == 2 and "holds a run with other settings (threshold differ)" in again.stderr
    assert open(os.path.join(model_dir, "task.npz"), "rb").read() == before


def test_resume_after_kill_gives_the_same_task_file(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    args = [*BASE, "--epochs=5"]
    assert train_cli(*args, f"--model_dir={straight}").returncode == 0
    process = subprocess.Popen([sys.executable, TRAIN, *args, f"--model_dir={killed}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(killed, "checkpoints", "ckpt-2.index")):
        assert process.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(killed, "task.npz"))
    resumed = train_cli(*args, f"--model_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    with open(os.path.join(straight, "task.npz"), "rb") as a, open(os.path.join(killed, "task.npz"), "rb") as b:
        assert a.read() == b.read()


MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import tf_piggyback as pb
    from tf_piggyback.training.distribute import make_strategy
    from tf_piggyback.training.trainer import epoch_batches

    splits = pb.load_dataset("digits:upper")
    config = pb.TrainConfig(epochs=2, head_lr=1e-3, mask_lr=1e-3)
    masks = {}
    for name in ("default", "mirrored"):
        strategy = make_strategy(name)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = pb.piggyback(pb.digits_backbone(), 5)
        pb.train(model, epoch_batches(splits.train, 32), config, strategy=strategy, log=lambda line: None)
        masks[name] = [m for layer in pb.masked_layers(model) for m in layer.thresholded_masks()]
        print(name, strategy.num_replicas_in_sync, flush=True)
    try:  # XLA cannot run across replicas: refused up front
        pb.train(model, epoch_batches(splits.train, 32), pb.TrainConfig(jit_compile=True), strategy=strategy)
    except ValueError as error:
        print("refused:", error, flush=True)
    try:  # mixed_float16's overflow check would see one replica's gradients only: refused
        pb.train(model, epoch_batches(splits.train, 32), pb.TrainConfig(precision="mixed_float16"), strategy=strategy)
    except ValueError as error:
        print("refused:", error, flush=True)
    same = all(np.array_equal(a, b) for a, b in zip(masks["default"], masks["mirrored"]))
    flipped = int(sum(np.sum(a != b) for a, b in zip(masks["default"], masks["mirrored"])))
    zeros = int(sum(np.sum(a == 0) for a in masks["default"]))
    params = int(sum(a.size for a in masks["default"]))
    print(json.dumps({"same": same, "flipped": flipped, "zeros": zeros, "params": params}))
""")


def test_mirrored_on_two_cpus_learns_the_same_masks():
    """Two replicas sum their half-batch gradients in another order than one device sums the
    whole batch, so a real-valued mask sitting on the threshold can land on the other side: we
    allow at most 1 in 10,000 masks to differ (measured: 7 of 118,048 after 2 epochs)."""
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mirrored 2" in result.stdout
    assert "refused: jit_compile (XLA) needs a one-replica strategy; this one has 2 replicas" in result.stdout
    assert "refused: mixed_float16 needs a one-replica strategy; this one has 2 replicas" in result.stdout
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["zeros"] > 1000 and outcome["flipped"] <= outcome["params"] * 1e-4, outcome


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_on_localhost(tmp_path):
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    model_dir = str(tmp_path / "mw")
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, TRAIN, *BASE, "--epochs=2", "--strategy=multi_worker", f"--model_dir={model_dir}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CONFIG": tf_config}))
    outputs = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        assert process.returncode == 0, err[-3000:]
        outputs.append(out.strip().splitlines()[-1])
    # both workers report the same accuracy and sparsity; only the chief wrote the task
    assert outputs[0].split("->")[0].split("task bytes")[0] == outputs[1].split("->")[0].split("task bytes")[0]
    assert os.path.exists(os.path.join(model_dir, "task.npz"))
    with open(os.path.join(model_dir, "metrics.json")) as f:
        assert json.load(f)["accuracy"] > 0.2


@pytest.mark.slow  # half precision is emulated on most CPUs: 2.5 min for mixed_float16 (its fast path: below)
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_writes_an_ordinary_float32_task(tmp_path, precision):
    model_dir = str(tmp_path / precision)
    result = train_cli(*BASE, f"--model_dir={model_dir}", "--epochs=2", f"--precision={precision}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["accuracy"] > 0.4 and metrics["config"]["train"]["precision"] == precision
    # the task file is float32 (no policy inside) and gives the same predictions in float32 here
    evaluate = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--backbone=digits",
         f"--task={model_dir}/task.npz", "--dataset=digits:upper"], capture_output=True, text=True, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert abs(json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] - metrics["accuracy"]) <= 0.02


def test_mixed_float16_task_file_is_float32_and_predicts_as_trained(tmp_path):
    """The fast path of the CLI test above: a few mixed_float16 steps (as `experiment.run` trains,
    under the policy), then the task file holds float32 arrays and no policy, and a float32
    reload predicts what the mixed model predicts."""
    import keras

    import tf_piggyback as pb
    from tf_piggyback.training.trainer import epoch_batches, precision_policy

    splits = pb.load_dataset("digits:upper")
    keras.utils.set_random_seed(0)
    with precision_policy("mixed_float16"):
        model = pb.piggyback(pb.digits_backbone(), 5)
        history = pb.train(model, epoch_batches(splits.train.take(128), 32),
                           pb.TrainConfig(epochs=1, head_lr=1e-3, precision="mixed_float16"), log=lambda line: None)
    assert model.layers[-1].compute_dtype == "float16" and np.isfinite(history[-1]["loss"])
    path = str(tmp_path / "task.npz")
    pb.save_task(model, path)
    with np.load(path) as arrays:
        assert {arrays[key].dtype.name for key in arrays.files} <= {"uint8", "float32"}
    reloaded = pb.load_task(path, pb.digits_backbone())
    assert all(layer.compute_dtype == "float32" for layer in reloaded.layers)
    images = np.concatenate([x for x, _ in splits.test.batch(64).take(2)])
    mixed, plain = (np.asarray(m.predict(images, verbose=0), np.float32) for m in (model, reloaded))
    assert np.mean(mixed.argmax(-1) == plain.argmax(-1)) >= 0.95 and np.abs(mixed - plain).max() <= 0.05


def test_xla_train_step_learns_what_graph_mode_learns():
    import keras

    import tf_piggyback as pb
    from tf_piggyback.training.trainer import epoch_batches

    batches = epoch_batches(pb.load_dataset("digits:upper").train, 32)
    results = {}
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = pb.piggyback(pb.digits_backbone(), 5)
        history = pb.train(model, batches, pb.TrainConfig(epochs=2, head_lr=1e-3, jit_compile=jit_compile),
                           log=lambda line: None)
        results[jit_compile] = history[-1]["loss"], [m for layer in pb.masked_layers(model)
                                                     for m in layer.thresholded_masks()]
    assert abs(results[True][0] - results[False][0]) < 1e-3 * results[False][0]
    flipped = sum(int(np.sum(a != b)) for a, b in zip(results[True][1], results[False][1]))
    assert flipped <= 1e-4 * sum(m.size for m in results[False][1])


def test_loss_scaling_keeps_every_group_on_its_own_scale():
    import keras
    import tensorflow as tf

    import tf_piggyback as pb
    from tf_piggyback.training.trainer import make_optimizers, make_train_step, precision_policy

    images, labels = next(iter(pb.load_dataset("digits:upper").train.batch(32)))
    first_moments = {}
    for precision in ("float32", "mixed_float16"):
        with precision_policy(precision):
            model = pb.piggyback(pb.digits_backbone(), 5)
        if precision == "float32":
            start = [v.numpy() for v in model.trainable_variables]
        else:
            for v, value in zip(model.trainable_variables, start):
                v.assign(value)
        groups = make_optimizers(model, pb.TrainConfig(precision=precision, head_lr=1e-3), steps_per_epoch=10)
        for optimizer, variables in groups:
            optimizer.build(variables)
        if precision == "mixed_float16":
            assert all(isinstance(optimizer, keras.optimizers.LossScaleOptimizer) for optimizer, _ in groups)
            # Scales as dynamic loss scaling leaves them after some overflows (the initial 2**15
            # overflows float16 here, which skips the step), the head's drifted from the masks'.
            groups[0][0].dynamic_scale.assign(2.0 ** 10)
            groups[1][0].dynamic_scale.assign(2.0 ** 3)
        make_train_step(model, groups, tf.distribute.get_strategy())(images, labels)
        adams = [getattr(optimizer, "inner_optimizer", optimizer) for optimizer, _ in groups]
        # Adam's first moment after one step is 0.1 * the gradient it was given
        first_moments[precision] = [next(v for v in adam.variables if v.name.endswith("momentum")).numpy()
                                    for adam in adams]
    for mixed, plain in zip(first_moments["mixed_float16"], first_moments["float32"]):
        assert np.abs(mixed - plain).max() <= 0.05 * np.abs(plain).max()


@pytest.mark.parametrize("args,message", [
    (["--dataset=nope:x"], "unknown dataset 'nope:x'"),
    (["--backbone=NoSuchNet"], "unknown backbone 'NoSuchNet'"),
    (["--dataset=folder:/nonexistent"], "does not exist"),
    (["--threshold=-1"], "threshold must be a number in (0, 1000]"),
    (["--threshold=0.05"], "mask_scale=0.01 is below threshold=0.05"),
    (["--epochs=0"], "epochs must be an integer > 0"),
    (["--batch_size=0"], "batch_size must be an integer > 0"),
    (["--mask_lr=0"], "mask_lr must be > 0"),
    (["--backbone=ResNet50", "--weights=none", "--image_size=16"], "Input size must be at least 32x32"),
    (["--protocol=paper", "--augment"], "--protocol=paper takes its own random-sized crops and flips"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    flags = {a.split("=")[0]: a for a in [*BASE, "--epochs=1", f"--model_dir={tmp_path}/m", *args]}
    result = train_cli(*flags.values())
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "m", "task.npz"))
    assert not os.path.exists(os.path.join(tmp_path, "m", "config.json"))  # the model_dir stays free


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    import tensorflow as tf

    import tf_piggyback as pb
    from tf_piggyback.training.trainer import epoch_batches

    splits = pb.load_dataset("digits:upper")
    good = epoch_batches(splits.train, 32)

    def batches(epoch):  # the second epoch's images are NaN
        return good(epoch) if epoch == 0 else good(epoch).map(lambda x, y: (x * np.nan, y))

    # A backbone without ReLU or pooling: oneDNN's fused convolution+ReLU turns NaN into 0 and
    # its max pooling into -FLT_MAX (seen on AVX-512 CPUs), so NaN images need not reach the loss.
    import keras

    inputs = keras.Input((32, 32, 1))
    backbone = keras.Model(inputs, keras.layers.Dense(16)(keras.layers.Flatten()(inputs)), name="linear")
    model = pb.piggyback(backbone, 5)
    checkpoints = str(tmp_path / "ckpt")
    # at once: the first step of epoch 2, not at its end; the flags to lower named with their values
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 2, step 1: the training diverged; lower "
                                                 r"--mask_lr, --head_lr \(now 0.0001, 0.0001\).*the last finite "
                                                 r"checkpoint stays: .*ckpt-1"):
        pb.train(model, batches, pb.TrainConfig(epochs=3), checkpoint_dir=checkpoints, log=lambda line: None)
    assert tf.train.latest_checkpoint(checkpoints).endswith("ckpt-1")


def test_at_chance_is_a_dead_network_not_a_loss_falling_through_ln_c():
    from tf_piggyback.training.trainer import at_chance, chance_levels

    assert chance_levels([10, 10, 10, 10]) == pytest.approx((np.log(4), 0.25))
    assert at_chance(0.0850, 0.1013)  # the VGG16: one class answered
    assert at_chance(0.30, 0.1013, [2.3026, 2.3025], np.log(10))  # its loss sat at ln 10
    # a loss falling through ln 5 (the digits CNN finetuned with warm-up, digits:upper: 3.4683 in
    # epoch 1, 1.6074 in epoch 2), at an accuracy above chance
    assert not at_chance(0.62, 0.2027, [3.4683, 1.6074], np.log(5))


@pytest.mark.parametrize("kwargs,message", [
    (dict(epochs=0), "epochs must be an integer > 0"),
    (dict(batch_size=2.5), "batch_size must be an integer > 0"),
    (dict(head_lr=-1.0), "head_lr must be > 0"),
    (dict(warmup_epochs=-1), "warmup_epochs must be an integer >= 0"),
    (dict(method="sgd"), "method must be one of"),
    (dict(precision="float16"), "precision must be one of float32, mixed_float16, mixed_bfloat16"),
])
def test_train_config_refuses_bad_values_when_made(kwargs, message):
    import tf_piggyback as pb

    with pytest.raises(ValueError, match=message):
        pb.TrainConfig(**kwargs)


def test_feature_layer_and_skip_unsupported_flags(tmp_path):
    """README's troubleshooting names --feature_layer and --skip_unsupported: train.py takes
    them, the task file records them, and it reloads in a fresh process with the same accuracy."""
    model_dir = str(tmp_path / "run")
    result = train_cli(*BASE, f"--model_dir={model_dir}", "--epochs=1", "--feature_layer=relu3", "--skip_unsupported")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = pb.read_manifest(os.path.join(model_dir, "task.npz"))
    assert manifest["options"]["feature_layer"] == "relu3" and manifest["options"]["skip_unsupported"] is True
    assert [layer["name"] for layer in manifest["layers"]] == ["conv1/kernel", "conv2/kernel", "conv3/kernel"]
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    evaluate = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--backbone=digits",
         f"--task={model_dir}/task.npz", "--dataset=digits:upper"], capture_output=True, text=True, cwd=REPO)
    assert json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] == metrics["accuracy"]
    bad = train_cli(*BASE, f"--model_dir={tmp_path}/bad", "--epochs=1", "--feature_layer=nope")
    assert bad.returncode == 2 and "feature_layer 'nope' is not a layer of backbone 'digits'" in bad.stderr


def test_paper_protocol_from_the_cli_and_top5_in_metrics(tmp_path):
    """--protocol=paper trains on random-sized crops; evaluate.py reads the protocol from the task
    file and reproduces the run's top-1 and top-5 errors in a fresh process."""
    model_dir = str(tmp_path / "run")
    result = train_cli("--backbone=digits", "--dataset=digits:inverted", "--verbose=0", f"--model_dir={model_dir}",
                       "--epochs=1", "--protocol=paper")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert metrics["protocol"] == "paper" and 0 <= metrics["top5_error"] <= metrics["top1_error"]
    evaluate = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--backbone=digits",
         f"--task={model_dir}/task.npz", "--dataset=digits:inverted"], capture_output=True, text=True, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    printed = json.loads(evaluate.stdout.splitlines()[-1])
    assert printed["accuracy"] == metrics["accuracy"] and printed["top5_error"] == metrics["top5_error"]


@pytest.mark.parametrize("train_bn", [False, True])
def test_no_trainable_flag_a_user_can_touch_changes_the_backbone(train_bn):
    """Flip every `trainable` flag a user could reach (the task model, the backbone, each layer,
    each masked wrapper and the layer it wraps), train: the backbone's weights, BatchNormalization
    statistics included, stay bit-identical, and only what the task owns is optimized."""
    from tf_piggyback.core.surgery import freeze_backbone
    from tf_piggyback.training.trainer import epoch_batches, make_optimizers

    assert freeze_backbone(pb.piggyback(pb.digits_backbone(), 5, train_bn=train_bn)) == 0  # nothing to refreeze
    backbone = pb.digits_backbone()
    before = [w.numpy().copy() for w in backbone.weights]
    model = pb.piggyback(backbone, 5, train_bn=train_bn)
    model.trainable = True
    backbone.trainable = True
    for layer in [*model.layers, *backbone.layers]:
        layer.trainable = True
    for wrapper in pb.masked_layers(model):
        wrapper.trainable = True
        wrapper.layer.trainable = True
    splits = pb.load_dataset("digits:upper")
    pb.train(model, epoch_batches(splits.train.take(256), 32), pb.TrainConfig(epochs=1, head_lr=1e-2, mask_lr=1e-2),
             log=lambda line: None)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, backbone.weights))
    assert freeze_backbone(model) == 0
    trained = {w.path for _, group in make_optimizers(model, pb.TrainConfig(), 10) for w in group}
    owned = {"head/kernel", "head/bias"} | ({f"bn{i}/{n}" for i in range(1, 5) for n in ("gamma", "beta")}
                                            if train_bn else set())
    assert trained == owned | {m.path for layer in pb.masked_layers(model) for m in layer.masks}


def ops_backbone():
    """A functional model written as people write one: `x + y`, `keras.ops` calls and
    `keras.activations.gelu` between layers (Keras operations, not layers, in the graph)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 1), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(x)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(x)
    x = keras.activations.gelu(a + b)
    x = keras.ops.multiply(x, keras.ops.sigmoid(keras.layers.Dense(8, name="gate")(x)))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.ops.mean(x, axis=(1, 2))
    return keras.Model(inputs, keras.layers.Dense(16, name="fc")(x), name="ops")


def test_a_functional_model_with_operations_from_the_cli(tmp_path):
    """A `.keras` backbone with operations between its layers: every kernel masked, trained from
    the CLI, reloaded in a fresh process with the same accuracy, baked exactly."""
    backbone_path = str(tmp_path / "ops.keras")
    ops_backbone().save(backbone_path)
    model_dir = str(tmp_path / "run")
    result = train_cli(f"--backbone={backbone_path}", "--dataset=digits:upper", "--head_lr=1e-3", "--verbose=0",
                       f"--model_dir={model_dir}", "--epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    task = os.path.join(model_dir, "task.npz")
    assert [layer["name"] for layer in pb.read_manifest(task)["layers"]] == [
        "a/kernel", "b/kernel", "gate/kernel", "dw/kernel", "fc/kernel"]
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    evaluate = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), f"--backbone={backbone_path}",
         f"--task={task}", "--dataset=digits:upper"], capture_output=True, text=True, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert json.loads(evaluate.stdout.splitlines()[-1])["accuracy"] == metrics["accuracy"]
    model = pb.load_task(task, pb.load_backbone(backbone_path))
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(pb.bake(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_diverging_run_stops_or_is_marked_never_a_clean_result(tmp_path):
    """Issue 33: finetuning at a learning rate far too high. Where the loss becomes NaN the run
    stops at that step with one line naming the flag to lower, and writes no result; where it stays
    finite (the digits CNN's ReLUs die and it answers one class) the run is written with warnings,
    the console's last line says so, and every report table marks it: never a clean row."""
    import keras

    from tf_piggyback.training.report import AT_CHANCE, build_report

    inputs = keras.Input((32, 32, 1), name="image")  # no ReLU to die: the weights grow to inf
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    keras.Model(inputs, keras.layers.Dense(16, name="fc")(keras.layers.Flatten()(x)), name="linear").save(
        str(tmp_path / "linear.keras"))
    diverged = str(tmp_path / "diverged")
    result = train_cli(f"--backbone={tmp_path}/linear.keras", "--dataset=digits:upper", "--method=finetune",
                       "--finetune_lr=1000", "--epochs=2", "--verbose=0", f"--model_dir={diverged}")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last.startswith("error: loss became nan in epoch 1, step ") and \
        "the training diverged; lower --finetune_lr (now 1000)" in last, last
    assert not {"metrics.json", "model.keras"} & set(os.listdir(diverged))

    # At 1000 the digits CNN's weights overflow in epoch 1 (refused, as above); at 30 they stay finite.
    at_chance = str(tmp_path / "at_chance")  # no --verbose: stdout is a pipe, so one line per epoch
    result = train_cli("--backbone=digits", "--dataset=digits:upper", "--method=finetune", "--finetune_lr=30",
                       "--epochs=2", f"--model_dir={at_chance}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("warning: "), result.stderr[-2000:]
    # Which marks a dead run gets depends on the CPU's arithmetic (its epoch-2 training accuracy
    # landed 1.8 points above the majority class on one machine, below it on another): its last
    # epoch at chance, its test accuracy at chance, or both; each names the flag.
    words = [line.split()[0] for line in result.stdout.splitlines()]
    assert words[:2] == ["epoch", "epoch"] and words[-1] == "accuracy" and set(words[2:-1]) <= {"warning:"}, words
    assert "\r" not in result.stdout and "━" not in result.stdout  # no progress bar redraws
    warnings = json.load(open(os.path.join(at_chance, "metrics.json")))["warnings"]
    assert warnings and all("check --finetune_lr (now 30)" in warning for warning in warnings), warnings
    assert all(w.startswith(("epoch 2 trained at chance level", "test accuracy")) for w in warnings), warnings
    report = build_report([at_chance], str(tmp_path / "report"))
    rows = [line for line in report.splitlines() if line.startswith("| upper |")]
    assert len(rows) == 2 and all(AT_CHANCE in row for row in rows), report  # Table 2 layout and the runs
    assert "at chance level" in (tmp_path / "report" / "report.csv").read_text().splitlines()[1]


def test_a_progress_bar_on_a_terminal_one_line_per_epoch_elsewhere(monkeypatch):
    """verbose="auto" (train.py's default): Keras' progress bar redraws itself with "\\r" even into
    a file or a pipe; it is drawn only when stdout is a terminal."""
    import io

    from tf_piggyback.training.trainer import epoch_batches

    class Stdout(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    examples = pb.load_dataset("digits:upper").train.take(64)
    for tty in (True, False):
        stdout, lines = Stdout(tty), []
        monkeypatch.setattr(sys, "stdout", stdout)
        model = pb.piggyback(pb.digits_backbone(), 5)
        pb.train(model, epoch_batches(examples, 32), pb.TrainConfig(epochs=2, head_lr=1e-3), log=lines.append,
                 verbose="auto")
        monkeypatch.undo()
        assert [line.split()[:2] for line in lines if line.startswith("epoch")] == [["epoch", "1/2"], ["epoch", "2/2"]]
        assert ("━" in stdout.getvalue()) == tty, stdout.getvalue()


def test_a_checkpoint_from_before_the_mask_scale_resumes_with_the_same_masks(tmp_path):
    """Checkpoints written before masks were held as m_r x MASK_VARIABLE_SCALE hold m_r itself
    (and no `mask_variable_scale`); a resume rescales them instead of reading every mask as off."""
    import keras
    import tensorflow as tf

    from tf_piggyback.core.layers import MASK_VARIABLE_SCALE
    from tf_piggyback.training.trainer import epoch_batches, make_optimizers

    batches, config = epoch_batches(pb.load_dataset("digits:upper").train, 32), pb.TrainConfig(epochs=2, mask_lr=1e-3)
    backbone = pb.digits_backbone()
    keras.utils.set_random_seed(0)
    straight = pb.piggyback(backbone, 5)
    pb.train(straight, batches, config, log=lambda line: None)
    expected = [m for layer in pb.masked_layers(straight) for m in layer.thresholded_masks()]

    # The first epoch's checkpoint as the old trainer wrote it: the same objects, m_r unscaled, no scale entry.
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    keras.utils.set_random_seed(0)
    model = pb.piggyback(backbone, 5)
    pb.train(model, batches, pb.TrainConfig(epochs=1, mask_lr=1e-3), checkpoint_dir=new, log=lambda line: None)
    groups = make_optimizers(model, config, 21)
    for optimizer, variables in groups:
        optimizer.build(variables)
    epoch = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=model, epoch=epoch, **{f"optimizer{i}": o for i, (o, _) in enumerate(groups)})
    checkpoint.restore(tf.train.latest_checkpoint(new)).expect_partial()
    for mask in (m for layer in pb.masked_layers(model) for m in layer.masks):
        mask.assign(mask / MASK_VARIABLE_SCALE)
    tf.train.CheckpointManager(checkpoint, old, max_to_keep=2).save(checkpoint_number=1)

    resumed, lines = pb.piggyback(pb.digits_backbone(), 5), []
    pb.train(resumed, batches, config, checkpoint_dir=old, log=lines.append)
    assert lines[0].startswith("resumed from") and len(lines) == 2  # one more epoch
    masks = [m for layer in pb.masked_layers(resumed) for m in layer.thresholded_masks()]
    assert sum(int(np.sum(m == 0)) for m in expected) > 1000
    params = sum(m.size for m in expected)
    assert sum(int(np.sum(a != b)) for a, b in zip(expected, masks)) <= params * 1e-4


def test_non_finite_weights_never_reach_a_checkpoint_or_a_task_file(tmp_path):
    """Issue 39, 5: the last step of an epoch can write NaN or inf weights that no loss has seen
    (here the head at an Adam rate of 1e39: inf in float32); they were checkpointed, and on the
    last epoch written to the task file, and a resume restored them as the "last finite" state."""
    import tensorflow as tf

    from tf_piggyback.training.trainer import epoch_batches

    one_batch = pb.load_dataset("digits:upper").train.take(32)
    model = pb.piggyback(pb.digits_backbone(), 5)
    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match=r"^weights became NaN or inf in epoch 1's last step \(head/kernel.*"
                                                 r"the training diverged; lower --mask_lr, --head_lr \(now 0.0001, 1e\+39\)"):
        pb.train(model, epoch_batches(one_batch, 32), pb.TrainConfig(epochs=1, head_lr=1e39),
                 checkpoint_dir=checkpoints, log=lambda line: None)
    assert tf.train.latest_checkpoint(checkpoints) is None
    with pytest.raises(ValueError, match=r"^cannot save the task: 2 of its weights hold NaN or inf \(head/kernel, "
                                         r"head/bias\); the training diverged"):
        pb.save_task(model, str(tmp_path / "task.npz"))
    assert not (tmp_path / "task.npz").exists()


def test_chance_marks_describe_the_result_the_tables_show():
    """Issue 39, 6: on data 97% of one class, 97.8% was marked "at chance" (majority + 1 point);
    an epoch at chance that the run recovered from marked it in every table; a 5-epoch finetune
    spent all 5 epochs in its 5-epoch warm-up."""
    from tf_piggyback.core.methods.base import momentum_sgd, warmup_epochs
    from tf_piggyback.training.experiment import run_warnings
    from tf_piggyback.training.trainer import at_chance

    assert not at_chance(0.978, 0.97) and at_chance(0.9702, 0.97)
    assert at_chance(0.2044, 0.2044) and at_chance(0.207, 0.2) and not at_chance(0.2206, 0.2027)
    scores = {"accuracy": 0.93, "chance_accuracy": 0.2}
    recovered = [{"epoch": 1}, {"epoch": 2, "warning": "epoch 2 trained at chance level: ..."}, {"epoch": 3}]
    assert run_warnings(recovered, scores, pb.TrainConfig()) == []
    stuck = recovered[:2]
    assert run_warnings(stuck, scores, pb.TrainConfig())[0].endswith("(1 of 2 epochs at chance)")

    assert [warmup_epochs(pb.TrainConfig(method="finetune", epochs=e)) for e in (1, 5, 10, 30, 60)] == [1, 1, 2, 5, 5]
    assert warmup_epochs(pb.TrainConfig(method="finetune", epochs=5, warmup_epochs=0)) == 0
    model = pb.finetune(pb.digits_backbone(), 5)
    [(optimizer, _)] = momentum_sgd(model, pb.TrainConfig(method="finetune", epochs=5), steps_per_epoch=21)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3 / 21)  # step 0 of a 1-epoch warm-up
    optimizer.iterations.assign(21)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)  # warm from the second epoch on
