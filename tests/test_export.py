"""export/: SavedModels (one task baked, several packed) and TFLite files, checked as users load them."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import tf_piggyback as pb
from tf_piggyback.data.datasets import to_arrays
from conftest import REPO, tflite_ops
from tf_piggyback.devices.tflite import export_tflite, representative_images
from tf_piggyback.serving.saved_model import build_serving_module, export_saved_model, next_version

SUBPROCESS_LOAD = """
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
out = {k: v.numpy() for k, v in model.signatures[sys.argv[3]](image=tf.constant(x)).items()}
np.savez(sys.argv[4], **out)
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two piggyback tasks on the digits backbone and their test images. `upper` is trained as in
    the demo (30 epochs), since int8 agreement is only meaningful for a converged model."""
    root = tmp_path_factory.mktemp("tasks")
    paths, data = [], {}
    for variant in ("upper", "inverted"):
        splits = pb.load_dataset(f"digits:{variant}")
        model = pb.piggyback(pb.digits_backbone(), len(splits.class_names))
        config = pb.TrainConfig(epochs=30, head_lr=1e-3) if variant == "upper" else \
            pb.TrainConfig(epochs=8, head_lr=1e-3, mask_lr=1e-3)
        pb.train(model, pb.training.trainer.epoch_batches(splits.train, 32), config, log=lambda line: None)
        path = str(root / variant / "task.npz")
        pb.save_task(model, path)
        paths.append(path)
        data[variant] = to_arrays(splits.test)[0]
    return paths, data


def keras_logits(path, x):
    return pb.load_task(path, pb.digits_backbone())(x).numpy()


def load_in_fresh_process(model_dir, signature, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", SUBPROCESS_LOAD, model_dir, str(tmp_path / "x.npy"), signature,
                    str(tmp_path / "out.npz")], check=True, capture_output=True)
    return dict(np.load(tmp_path / "out.npz"))


def test_single_task_saved_model_is_baked_and_matches_keras(tasks, tmp_path):
    paths, data = tasks
    path = export_saved_model(pb.digits_backbone(), paths[:1], str(tmp_path / "upper"))
    assert path.endswith(os.path.join("upper", "1"))
    x = data["upper"][:64]
    for signature in ("serving_default", "upper"):
        out = load_in_fresh_process(path, signature, x, tmp_path)
        np.testing.assert_allclose(out["logits"], keras_logits(paths[0], x), atol=1e-5)
        np.testing.assert_allclose(out["probabilities"], tf.nn.softmax(out["logits"]).numpy(), atol=1e-6)
    # no mask or binarizer ops: the graph is the plain backbone's
    loaded = tf.saved_model.load(path)
    graph = loaded.signatures["serving_default"].graph.as_graph_def()
    ops = {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "Conv2D" in ops
    assert not ops & {"GreaterEqual", "FloorMod", "FloorDiv", "Less", "Cast"}, ops
    variables = {v.name for v in loaded.signatures["serving_default"].variables}
    assert variables and not any("mask" in name for name in variables)


def test_multi_task_saved_model_matches_each_task(tasks, tmp_path):
    paths, data = tasks
    path = export_saved_model(pb.digits_backbone(), paths, str(tmp_path / "multi"), version=7)
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "upper", "inverted", "tasks", "tasks_by_name"}
    for path_, name in zip(paths, ("upper", "inverted")):
        x = data[name][:64]
        out = loaded.signatures[name](image=tf.constant(x))
        np.testing.assert_allclose(out["logits"].numpy(), keras_logits(path_, x), atol=1e-5)
    np.testing.assert_array_equal(loaded.signatures["serving_default"](image=tf.constant(x[:4]))["logits"],
                                  loaded.signatures["upper"](image=tf.constant(x[:4]))["logits"])
    # TF1-style loading, as TensorFlow Serving does it
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    image = json.dumps(x[:1].tolist())
    for signature in ("serving_default", "inverted"):
        run = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", signature,
                              "--input_exprs", f"image={image}"], capture_output=True, text=True)
        assert run.returncode == 0 and "Result for output key logits" in run.stdout, run.stderr[-2000:]
    # the backbone once, each task's masks packed: far below two baked copies
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    single = export_saved_model(pb.digits_backbone(), paths[:1], str(tmp_path / "single"))
    single_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(single) for f in fs)
    assert size < 1.5 * single_size, (size, single_size)


def test_multi_task_export_traces_the_backbone_once(tasks, tmp_path):
    """`tf.saved_model.save` traces in its own context: a module traced for calls before it
    would trace the backbone (`compute`) twice, which is most of an export's time."""
    module, signatures, _ = build_serving_module(pb.digits_backbone(), tasks[0])
    assert module.graph.compute.experimental_get_tracing_count() == 0
    tf.saved_model.save(module, str(tmp_path / "saved"), signatures=signatures)
    assert module.graph.compute.experimental_get_tracing_count() == 1


def test_multi_task_saved_model_under_concurrent_requests(tasks, tmp_path):
    """Tasks unpack their masks into working slots when called; requests for both tasks racing
    on a fresh load (as TF Serving sends them) still get their own task's outputs."""
    from concurrent.futures import ThreadPoolExecutor

    paths, data = tasks
    path = export_saved_model(pb.digits_backbone(), paths, str(tmp_path / "multi"))
    loaded = tf.saved_model.load(path)
    names = ("upper", "inverted")
    expected = {name: keras_logits(p, data[name][:16]) for p, name in zip(paths, names)}

    def request(i):
        name = names[i % 2]
        return name, loaded.signatures[name](image=tf.constant(data[name][:16]))["logits"].numpy()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(request, range(32)))
    for name, logits in results:
        np.testing.assert_allclose(logits, expected[name], atol=1e-5)
    # the working slots are saved holding only their id: the export stays 1 bit per parameter
    assert [v.numpy().tolist() for v in tf.saved_model.load(path).graph.working.slots] == [[-1.0]] * 2


def test_versions_and_overwrite(tasks, tmp_path):
    paths, _ = tasks
    out = str(tmp_path / "m")
    assert next_version(out) == 1
    first = export_saved_model(pb.digits_backbone(), paths[:1], out)
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    with pytest.raises(ValueError, match="exists; pick another --version"):
        export_saved_model(pb.digits_backbone(), paths[:1], out, version=1)
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp
    assert export_saved_model(pb.digits_backbone(), paths[:1], out).endswith("2")
    assert sorted(os.listdir(out)) == ["1", "2"]


def test_overwrite_says_what_tensorflow_serving_will_do(tasks, tmp_path, caplog):
    """Issue 39: `--overwrite` of a version that may be served says that TF Serving will not reload
    it and that a loaded multi-task version's cold tasks fail; it still overwrites."""
    paths, _ = tasks
    out = str(tmp_path / "m")
    first = export_saved_model(pb.digits_backbone(), paths[:2], out)
    with caplog.at_level("WARNING"):
        assert export_saved_model(pb.digits_backbone(), paths[:2], out, version=1, overwrite=True) == first
    assert f"overwriting {first} in place: TensorFlow Serving never reloads a version number it has loaded" \
        in caplog.text and "export the next version instead (omit --version)" in caplog.text


def test_killed_export_leaves_no_partial_version(tasks, tmp_path):
    paths, _ = tasks
    out = tmp_path / "killed"
    command = [sys.executable, os.path.join(REPO, "export", "saved_model.py"), "--backbone=digits",
               f"--task={paths[0]}", f"--task={paths[1]}", f"--output={out}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out.exists() and any(name.startswith(".") for name in os.listdir(out))):
        assert process.poll() is None and time.time() < deadline, "export finished before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "1").exists()
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "1" / "saved_model.pb").exists()


def test_an_export_killed_at_random_points_leaves_whole_versions_or_none(tasks, tmp_path):
    """Issue 39: a kill at any point of an export (tracing, writing, linking, fsyncing, renaming):
    every numbered version under the base path loads and answers as its tasks do, or is absent.
    Version 1 is whole first, so the killed exports also link its files."""
    paths, data = tasks
    out = tmp_path / "killed"
    specs = [f"upper={paths[0]}", f"inverted={paths[1]}", f"again={paths[0]}"]
    command = [sys.executable, os.path.join(REPO, "export", "saved_model.py"), "--backbone=digits",
               *[f"--task={spec}" for spec in specs], f"--output={out}"]
    started = time.time()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    whole = time.time() - started
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.3, 1.0, 4) * whole:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    x = data["upper"][:8]
    expected = keras_logits(paths[0], x)
    versions = sorted(int(name) for name in os.listdir(out) if name.isdigit())
    assert versions[0] == 1
    for version in versions:
        loaded = tf.saved_model.load(str(out / str(version)))
        np.testing.assert_allclose(loaded.signatures["again"](image=tf.constant(x))["logits"], expected, atol=1e-5)


def test_tflite_float_float16_and_multi_signature(tasks, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    paths, data = tasks
    backbone = pb.digits_backbone()
    x = data["upper"][:64]
    reference = keras_logits(paths[0], x)
    for quantize, check in (("none", lambda a, b: np.abs(a - b).max() <= 1e-4),
                            ("float16", lambda a, b: np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.98)):
        file = str(tmp_path / f"upper_{quantize}.tflite")
        export_tflite(backbone, paths[:1], file, quantize)
        interpreter = Interpreter(model_path=file)
        out = interpreter.get_signature_runner("serving_default")(image=x)
        assert check(out["logits"], reference), quantize
        ops = tflite_ops(file)
        assert "CONV_2D" in ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    multi = str(tmp_path / "multi.tflite")
    size = export_tflite(backbone, paths, multi)
    interpreter = Interpreter(model_path=multi)
    assert set(interpreter.get_signature_list()) == {"upper", "inverted"}
    for path_, name in zip(paths, ("upper", "inverted")):
        x = data[name][:64]
        out = interpreter.get_signature_runner(name)(image=x)
        assert np.abs(out["logits"] - keras_logits(path_, x)).max() <= 1e-4
    # one copy of the backbone weights, and each task's masks at 1 bit per parameter (+10%), its
    # head and its signature's graph (~20 KB here; nothing next to ResNet-50's 2.9 MB of masks)
    single = os.path.getsize(str(tmp_path / "upper_none.tflite"))
    bits = sum(pb.read_manifest(p)["params"] for p in paths)
    assert size <= single + 1.1 * bits / 8 + 20_000 * len(paths), (size, single, bits / 8)


def test_tflite_int8_agrees_on_the_test_set(tasks, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    paths, data = tasks
    representative = representative_images("digits:upper", (32, 32, 1))
    file = str(tmp_path / "upper_int8.tflite")
    size = export_tflite(pb.digits_backbone(), paths[:1], file, "int8", representative)
    float32 = export_tflite(pb.digits_backbone(), paths[:1], str(tmp_path / "upper.tflite"))
    # the size it returns is the file's, and int8 weights take about a quarter of float32's
    assert size == os.path.getsize(file) and size < 0.35 * float32, (size, float32)
    x = data["upper"]
    out = Interpreter(model_path=file).get_signature_runner("serving_default")(image=x)
    agreement = np.mean(out["logits"].argmax(-1) == keras_logits(paths[0], x).argmax(-1))
    assert agreement >= 0.98, agreement


def test_export_bad_input(tasks, tmp_path):
    paths, _ = tasks
    backbone = pb.digits_backbone()
    with pytest.raises(ValueError, match="quantize must be one of none, float16, int8"):
        export_tflite(backbone, paths[:1], str(tmp_path / "x.tflite"), "int4")
    with pytest.raises(ValueError, match=r"representative images have shape \(8, 8, 1\)"):
        export_tflite(backbone, paths[:1], str(tmp_path / "x.tflite"), "int8", np.zeros((4, 8, 8, 1)))
    with pytest.raises(ValueError, match="int8 quantization takes one --task"):
        export_tflite(backbone, paths, str(tmp_path / "x.tflite"), "int8", np.zeros((4, 32, 32, 1)))
    assert not os.path.exists(tmp_path / "x.tflite")
    other = pb.digits_backbone(weights=None)
    with pytest.raises(pb.TaskFileError, match="load it with the backbone, weights and preprocessing it was trained on"):
        export_saved_model(other, paths[:1], str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "1")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "export", "tflite.py"), "--backbone=digits", f"--task={paths[0]}",
         f"--output={tmp_path}/y.tflite", "--quantize=int4"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "--quantize=int4: value should be one of <none|float16|int8>" in result.stderr


def test_serving_config(tasks, tmp_path):
    paths, _ = tasks
    models = tmp_path / "models"
    export_saved_model(pb.digits_backbone(), paths[:1], str(models / "upper"))
    export_saved_model(pb.digits_backbone(), paths, str(models / "multi"))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "export", "serving_config.py"), f"--models={models}",
         f"--output={models}/models.config"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    config = (models / "models.config").read_text()
    assert config.count("config {") == 2 and f'base_path: "{models}/upper"' in config
    body = json.loads((models / "request.json").read_text())
    assert np.array(body["instances"][0]["image"]).shape == (32, 32, 1)


def test_a_model_that_cannot_be_traced_is_refused_in_one_line(tmp_path):
    """A layer that loops in Python over a size known only when called (keras-hub 0.32's RWKV-7)
    cannot be traced over inputs of unknown size: the export says so in one line, naming the
    model, instead of TensorFlow's page-long `TypeError` (the sweep's RWKV-7 row is `slow`)."""
    from tf_piggyback.serving.signatures import save

    def loop(tokens):
        for _ in range(tf.shape(tokens)[1]):
            tokens = tokens + 1
        return {"logits": tokens}

    serve = tf.function(loop, input_signature=[tf.TensorSpec([None, None], tf.float32)], autograph=False)
    with pytest.raises(ValueError, match=r"^Looper cannot be traced into a signature over inputs of unknown size "
                                         r"\(.*SymbolicTensor.*\); its tasks train and save, but do not export$"):
        save(tf.Module(), str(tmp_path / "m"), {"serving_default": serve}, "Looper")
