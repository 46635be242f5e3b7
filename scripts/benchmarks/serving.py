"""The serving benchmark (`scripts/bench.py --preset=serving`): N tasks in one SavedModel.

Builds `max(tasks)` random piggyback tasks over one backbone (per-layer sparsity rising with
depth, as `bench.paper_sparsities`), exports a baked single-task SavedModel and one multi-task
SavedModel per N, then measures each in its own fresh process, round after round in turn (so
the sides of every ratio share the machine's state): load time, resident memory after loading
and after calling every task once, the first (cold) call of a task not in a working slot, and
warm calls, at batch 1 and 8, through the `tasks` signature; then the first call of every
per-task signature and the memory after it. Ratios are against the baked single-task model.
Export times: N tasks from their files, and as the next version beside N-1 of them.
"""

import dataclasses
import os
import shutil
import time

import numpy as np

from benchmarks import run_child
from benchmarks.suite import bytes_read, memory_bytes


@dataclasses.dataclass
class ServingConfig:
    model: str = "ResNet50"
    image_size: int = 128
    tasks: tuple = (1, 10, 100)
    slots: int = 2
    # Also export the largest N without per-task signatures (only serving_default, tasks,
    # tasks_by_name): what load time and memory are when tasks are served through `tasks`.
    shared_only: bool = True
    # Multi-task TFLite: this many tasks in one .tflite against one task's (0: skipped).
    tflite_tasks: int = 10
    # The phone file's precisions (`phone_rows`), each against the first task's own file of it.
    phone_quantize: tuple = ("none",)
    # phone: time int8 phone exports calibrated on this many images instead (`int8_export_rows`)
    int8_export_images: int = 0
    # Concurrent clients (threads) per run of `concurrency_child`, each sending this many requests.
    clients: tuple = (1, 4, 16)
    concurrent_requests: int = 16
    repeats: int = 3
    calls: int = 7
    # `filter_child`: channels of its convolutions (ResNet-50's widest stage) and their input side.
    filter_channels: int = 2048
    filter_side: int = 4
    workdir: str = os.path.join("runs", "bench_serving")


def random_tasks(backbone, count, folder, num_classes=10, log=print):
    """`count` task files of random piggyback masks over `backbone`, in `folder/tNNN/task.npz`
    (reused when already there and made for this backbone: the same seeds give the same files)."""
    from benchmarks.suite import paper_sparsities
    from tf_piggyback import piggyback
    from tf_piggyback.core.fingerprint import fingerprint
    from tf_piggyback.core.surgery import head_name
    from tf_piggyback.core.taskfile import read_manifest, save_task

    paths = [os.path.join(folder, f"t{i:03d}", "task.npz") for i in range(count)]
    current = fingerprint(backbone)
    missing = [i for i, p in enumerate(paths)
               if not os.path.exists(p) or read_manifest(p)["backbone"]["fingerprint"] != current]
    if missing:
        model = piggyback(backbone, num_classes)
        head = model.get_layer(head_name(model))
        start = time.perf_counter()
        for i in missing:
            paper_sparsities(model, seed=i)
            rng = np.random.default_rng(i)
            head.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in head.get_weights()])
            save_task(model, paths[i])
        log(f"built {len(missing)} random tasks in {time.perf_counter() - start:.0f} s")
    return paths


def serving_child(path, tasks, batch_sizes, calls, image_shape, per_task=True):
    """Measured in a fresh process: load seconds, RSS, cold and warm call seconds per batch size.

    A multi-task model is called through its `tasks` signature (one function for every task);
    then each per-task signature is called once (`signature_first_call_s`: TensorFlow
    instantiates every signature's graph on its first call) and RSS is read again.
    """
    import tensorflow as tf

    start = time.perf_counter()
    loaded = tf.saved_model.load(path)
    result = {"load_s": time.perf_counter() - start, "rss_loaded": memory_bytes()}
    rng = np.random.default_rng(0)
    images = {b: tf.constant(rng.uniform(0, 255, (b, *image_shape)).astype("float32")) for b in batch_sizes}
    multi = len(tasks) > 1

    def call(index, batch):
        begin = time.perf_counter()
        if multi:
            task = tf.fill([batch], index)
            loaded.signatures["tasks"](image=images[batch], task=task)["logits"].numpy()
        else:
            loaded.signatures["serving_default"](image=images[batch])["logits"].numpy()
        return time.perf_counter() - begin

    result["first_call_s"] = call(0, batch_sizes[0])
    for batch in batch_sizes:
        call(0, batch)
        reading = -bytes_read() + bytes_read()  # what reading the counter itself reads
        before = bytes_read()
        result[f"warm_b{batch}_s"] = float(np.median([call(0, batch) for _ in range(calls)]))
        # What the warm calls read from files (a task's own weights live in its slot: 0 expected).
        result[f"warm_b{batch}_read_bytes"] = float(bytes_read() - before - reading)
        if len(tasks) > 2:
            # Tasks called in turn, never twice in a row, more of them than slots: each call is cold.
            others = [1 + (i % (len(tasks) - 1)) for i in range(calls)]
            result[f"cold_b{batch}_s"] = float(np.median([call(index, batch) for index in others]))
    for index in range(len(tasks)):
        call(index, batch_sizes[0])
    result["rss_all_called"] = memory_bytes()
    if multi and per_task:
        firsts = []
        for name in tasks:
            begin = time.perf_counter()
            loaded.signatures[name](image=images[batch_sizes[0]])["logits"].numpy()
            firsts.append(time.perf_counter() - begin)
        result["signature_first_call_s"] = float(np.median(firsts))
        result["rss_all_signatures"] = memory_bytes()
    return result


def warm_child(models, batch_sizes, calls, image_shape):
    """Warm calls of every model in one process, interleaved call by call, so the ratios see
    the same machine state: `{model: {batch: median seconds}}`. A multi-task model is called
    through `tasks` with one task (its working slot stays filled)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    loaded = {name: tf.saved_model.load(path) for name, path in models.items()}
    result = {name: {} for name in models}
    for batch in batch_sizes:
        image = tf.constant(rng.uniform(0, 255, (batch, *image_shape)).astype("float32"))
        task = tf.zeros([batch], tf.int32)
        fns = {name: (lambda m=m: m.signatures["serving_default"](image=image)) if name == "baked" else
               (lambda m=m: m.signatures["tasks"](image=image, task=task)) for name, m in loaded.items()}
        samples = {name: [] for name in fns}
        for round_ in range(calls + 2):
            for name, fn in fns.items():
                begin = time.perf_counter()
                fn()["logits"].numpy()
                if round_ >= 2:  # after warm-up
                    samples[name].append(time.perf_counter() - begin)
        for name in fns:
            result[name][str(batch)] = float(np.median(samples[name]))
    return result


def concurrency_child(path, tasks, clients, requests, image_shape):
    """`clients` threads calling a freshly loaded SavedModel, `requests` calls each at batch 1, a
    random task per call (the baked model: its one task): requests per second, p50 and p99
    latency, the share of calls that filled a slot (`refills`), and peak RSS."""
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, *image_shape)).astype("float32"))
    multi = len(tasks) > 1
    if multi:
        serve = loaded.signatures["tasks"]
        call = lambda task: serve(image=image, task=tf.constant([task], tf.int32))["logits"].numpy()  # noqa: E731
    else:
        serve = loaded.signatures["serving_default"]
        call = lambda task: serve(image=image)["logits"].numpy()  # noqa: E731
    call(0)
    before = int(loaded.refills.numpy()) if multi else 0
    order = np.random.default_rng(1).integers(0, len(tasks), clients * requests)

    def timed(task):
        begin = time.perf_counter()
        call(int(task))
        return time.perf_counter() - begin

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(timed, order))
    elapsed = time.perf_counter() - start
    fills = int(loaded.refills.numpy()) - before if multi else 0
    return {"requests_per_s": len(order) / elapsed, "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "fill_rate": fills / len(order),
            "peak_rss": memory_bytes("VmHWM")}


def concurrency_rows(models, config, image_shape):
    """`concurrency_child` for each model and each of `config.clients`, one fresh process each."""
    rows = []
    for name, (path, n, _) in models.items():
        for clients in config.clients:
            result = _child("concurrency_child", path=path, tasks=[f"t{i:03d}" for i in range(n)], clients=clients,
                            requests=config.concurrent_requests, image_shape=image_shape)
            rows.append({"format": "concurrency", "model": name, "tasks": n, "clients": clients, **result})
    return rows


def tflite_child(path, names, image_shape, calls):
    """A `.tflite` in LiteRT, in a fresh process: load seconds (interpreter made, tensors
    allocated), each signature's first call, warm calls of the first, and RSS."""
    from ai_edge_litert.interpreter import Interpreter

    image = np.random.default_rng(0).uniform(0, 255, (1, *image_shape)).astype("float32")
    start = time.perf_counter()
    interpreter = Interpreter(model_path=path)
    runners = {name: interpreter.get_signature_runner(name) for name in names}
    result = {"load_s": time.perf_counter() - start}
    firsts = []
    for runner in runners.values():
        begin = time.perf_counter()
        runner(image=image)
        firsts.append(time.perf_counter() - begin)
    first = runners[names[0]]
    warm = []
    for _ in range(calls):
        begin = time.perf_counter()
        first(image=image)
        warm.append(time.perf_counter() - begin)
    result.update(first_call_s=float(np.median(firsts)), warm_b1_s=float(np.median(warm)))
    if len(names) > 1:  # each call another task's than the last
        switches = []
        for i in range(calls):
            begin = time.perf_counter()
            runners[names[1 + i % (len(names) - 1)]](image=image)
            switches.append(time.perf_counter() - begin)
        result["switch_call_b1_s"] = float(np.median(switches))
    return {**result, "rss": memory_bytes()}


def tflite_rows(backbone, paths, config, log=print):
    """One task's `.tflite` against `config.tflite_tasks` tasks' in one file (unpacked per call),
    and what else a phone app with that many tasks could ship: one task's file in
    int8 and in float16, the tasks' file in float16. Bytes (a multi-task file against one task's
    file + N * n/8 * 1.1), load and first-call seconds in LiteRT, warm calls, RSS: medians of
    `config.repeats` fresh processes each, in turn."""
    from tf_piggyback.devices.tflite import export_tflite

    n = config.tflite_tasks
    image_shape = list(backbone.inputs[0].shape[1:])
    representative = np.random.default_rng(0).uniform(0, 255, (200, *image_shape)).astype(np.float32)
    files = {}
    for count, quantize in ((1, "none"), (n, "none"), (1, "int8"), (1, "float16"), (n, "float16")):
        suffix = "" if quantize == "none" else f"_{quantize}"
        file = os.path.join(config.workdir, "tflite", f"tasks{count}{suffix}.tflite")
        if not os.path.exists(file):
            start = time.perf_counter()
            export_tflite(backbone, [f"t{i:03d}={p}" for i, p in enumerate(paths[:count])], file,
                          quantize=quantize, representative=representative if quantize == "int8" else None)
            log(f"exported {count} task(s) to TFLite ({quantize}) in {time.perf_counter() - start:.0f} s")
        files[count, quantize] = file
    names = {1: ["serving_default"], n: [f"t{i:03d}" for i in range(n)]}
    samples = {key: [] for key in files}
    for _ in range(config.repeats):
        for key, file in files.items():
            samples[key].append(_child("tflite_child", path=file, names=names[key[0]], image_shape=image_shape,
                                       calls=config.calls))
    rows = []
    for (count, quantize), file in files.items():
        row = {"tasks": count, "quantize": quantize, "bytes": os.path.getsize(file)}
        for key in samples[count, quantize][0]:
            row[key] = float(np.median([s[key] for s in samples[count, quantize]]))
        rows.append(row)
    return rows


def phone_child(path, single, names, image_shape, calls):
    """The phone form (`tf_piggyback.devices.phone`) in a fresh process, as an app runs it: RSS with the
    file opened and one task called; the call that switches to another task (interpreter rebuilt
    from patched bytes, first call) and its `switch` alone; warm calls of one task against the
    task's own single-task file's in the same process, call by call in turn (their ratio)."""
    from ai_edge_litert.interpreter import Interpreter

    from tf_piggyback.devices.phone import PhoneTasks

    image = np.random.default_rng(0).uniform(0, 255, (1, *image_shape)).astype("float32")
    tasks = PhoneTasks(path)
    start = time.perf_counter()
    tasks.task(names[0])(image=image)
    result = {"load_first_call_s": time.perf_counter() - start, "rss": memory_bytes()}
    switches, rebuilds = [], []
    for i in range(calls):
        name = names[1 + i % (len(names) - 1)] if i % 2 == 0 else names[0]
        begin = time.perf_counter()
        tasks.switch(name)
        rebuilds.append(time.perf_counter() - begin)
        tasks.task(name)(image=image)
        switches.append(time.perf_counter() - begin)
    result.update(switch_call_b1_s=float(np.median(switches)), switch_s=float(np.median(rebuilds)),
                  rss_after_switches=memory_bytes())
    phone, own = tasks.task(names[0]), Interpreter(model_path=single).get_signature_runner("serving_default")
    samples = {"phone": [], "single": []}
    for round_ in range(3 * calls + 2):
        for key, run in (("phone", phone), ("single", own)):
            begin = time.perf_counter()
            run(image=image)
            if round_ >= 2:
                samples[key].append(time.perf_counter() - begin)
    result.update(warm_b1_s=float(np.median(samples["phone"])), single_warm_b1_s=float(np.median(samples["single"])))
    return result


def phone_rows(backbone, paths, config, log=print):
    """The phone file of `config.tflite_tasks` tasks in each of `config.phone_quantize` against
    the first task's own file of that precision (int8: both calibrated on the same 200 random
    images, as `tflite_rows`): bytes (bound: that file + N * n/8 * 1.1 + the heads), RSS (bound:
    that file's process + one copy of the bytes), the call that switches, warm calls (ratio
    measured in one process). Medians of `config.repeats` fresh processes each, in turn with
    `tflite_child` on the single file."""
    return [row for quantize in config.phone_quantize for row in _phone_row(backbone, paths, config, quantize, log)]


def _phone_row(backbone, paths, config, quantize, log):
    from tf_piggyback.devices.phone import export_phone
    from tf_piggyback.devices.tflite import export_tflite

    n = config.tflite_tasks
    folder = os.path.join(config.workdir, "tflite")
    suffix = "" if quantize == "none" else f"_{quantize}"
    single, phone = os.path.join(folder, f"tasks1{suffix}.tflite"), os.path.join(folder, f"phone{n}{suffix}.tflite")
    tasks = [f"t{i:03d}={p}" for i, p in enumerate(paths[:n])]
    image_shape = list(backbone.inputs[0].shape[1:])
    representative = None
    if quantize == "int8":
        representative = np.random.default_rng(0).uniform(0, 255, (200, *image_shape)).astype(np.float32)
    if not os.path.exists(single):
        export_tflite(backbone, tasks[:1], single, quantize, representative)
    if not os.path.exists(phone):
        start = time.perf_counter()
        export_phone(backbone, tasks, phone, quantize, representative)
        log(f"exported {n} tasks to a phone file ({quantize}) in {time.perf_counter() - start:.0f} s")
    samples, singles = [], []
    for _ in range(config.repeats):
        singles.append(_child("tflite_child", path=single, names=["serving_default"], image_shape=image_shape,
                              calls=config.calls))
        samples.append(_child("phone_child", path=phone, single=single, names=[t.split("=")[0] for t in tasks],
                              image_shape=image_shape, calls=config.calls))
    row = {"format": "phone", "tasks": n, "quantize": quantize, "bytes": os.path.getsize(phone),
           "single_bytes": os.path.getsize(single),
           **{key: float(np.median([s[key] for s in samples])) for key in samples[0]},
           "single_rss": float(np.median([s["rss"] for s in singles])),
           "warm_ratio": float(np.median([s["warm_b1_s"] / s["single_warm_b1_s"] for s in samples])),
           "rounds": samples}
    row["rss_bound"] = row["single_rss"] + row["bytes"]
    return [row]


def run_phone(config, log=print):
    """The phone rows alone (`scripts/bench.py --preset=phone`) over `config.tflite_tasks` random
    tasks; returns `(rows, table)`."""
    from tf_piggyback.core.taskfile import read_manifest
    from tf_piggyback.training.backbones import load_backbone

    backbone = load_backbone(config.model, "none", config.image_size)
    paths = random_tasks(backbone, config.tflite_tasks, os.path.join(config.workdir, "tasks"), log=log)
    if config.int8_export_images:
        rows = int8_export_rows(backbone, paths, config, config.int8_export_images, log=log)
        return rows, f"{config.model} at {config.image_size} px, {config.tflite_tasks} random tasks." + \
            int8_export_table(rows)
    rows = phone_rows(backbone, paths, config, log=log)
    return rows, (f"{config.model} at {config.image_size} px, {config.tflite_tasks} random tasks; medians of "
                  f"{config.repeats} fresh processes.\n" + phone_file_table(rows, read_manifest(paths[0])["params"] / 8))


def int8_export_rows(backbone, paths, config, images, log=print):
    """An int8 phone file of `config.tflite_tasks` tasks calibrated on `images` random images,
    exported as `export_phone` does (the converter once, each task's constants written into its
    float graph and quantized: `phoneint8.int8_conversions`) and the old way (each task converted
    whole), in turn, `config.repeats` times each (issue 41). Seconds per export, and their ratio."""
    from tf_piggyback.devices import phone

    n = config.tflite_tasks
    tasks = [f"t{i:03d}={p}" for i, p in enumerate(paths[:n])]
    representative = np.random.default_rng(0).uniform(
        0, 255, (images, *backbone.inputs[0].shape[1:])).astype(np.float32)
    fast = phone.int8_conversions

    def whole(base, masks, heads, baked, rep, cached=None):  # no head given: every task converted whole
        return fast(base, masks, [None] * len(masks), baked, rep, cached)

    seconds = {"one conversion": [], "each task converted": []}
    folder = os.path.join(config.workdir, "tflite")
    os.makedirs(folder, exist_ok=True)
    for _ in range(config.repeats):
        for key, conversions in (("one conversion", fast), ("each task converted", whole)):
            phone.int8_conversions = conversions
            try:
                start = time.perf_counter()
                phone.export_phone(backbone, tasks, os.path.join(folder, "int8_export.tflite"), "int8", representative)
                seconds[key].append(time.perf_counter() - start)
            finally:
                phone.int8_conversions = fast
            log(f"int8 phone export of {n} tasks, {images} images, {key}: {seconds[key][-1]:.1f} s")
    return [{"format": "int8_export", "tasks": n, "images": images, "image_size": config.image_size,
             "seconds": {k: float(np.median(v)) for k, v in seconds.items()}, "rounds": seconds,
             "ratio": float(np.median(np.array(seconds["one conversion"]) / np.array(seconds["each task converted"])))}]


def int8_export_table(rows):
    """Markdown of `int8_export_rows`."""
    text = ("\nint8 phone export (median seconds; ratio of the medians of each round):\n\n| tasks | images | one "
            "conversion | each task converted | ratio | per task |\n|---|---|---|---|---|---|\n")
    for r in rows:
        new, old = r["seconds"]["one conversion"], r["seconds"]["each task converted"]
        text += (f"| {r['tasks']} | {r['images']} | {new:.1f} s | {old:.1f} s | {r['ratio']:.2f} | "
                 f"{new / r['tasks']:.1f} s (was {old / r['tasks']:.1f} s) |\n")
    return text


def phone_file_table(rows, packed_bytes):
    """Markdown of `phone_rows`."""
    text = ("\nThe phone file (`export/tflite.py --phone`) against the first task's own file of its precision; "
            "warm calls measured in one process in turn; a switching call rebuilds the interpreter from patched "
            "bytes:\n\n| tasks | precision | bytes (bound) | RSS, one task called (bound) | warm call (single "
            "file's) (ratio) | call that switches (of it: rebuild) |\n|---|---|---|---|---|---|\n")
    for r in rows:
        bound = r["single_bytes"] + r["tasks"] * packed_bytes * 1.1
        precision = {"none": "float32"}.get(r["quantize"], r["quantize"])
        text += (f"| {r['tasks']} | {precision} | {r['bytes'] / 1e6:,.1f} MB ({bound / 1e6:,.1f} MB + heads) | "
                 f"{r['rss'] / 1e6:,.0f} MB ({r['rss_bound'] / 1e6:,.0f} MB) | {r['warm_b1_s'] * 1000:,.1f} ms "
                 f"({r['single_warm_b1_s'] * 1000:,.1f} ms) ({r['warm_ratio']:.2f}) | "
                 f"{r['switch_call_b1_s'] * 1000:,.0f} ms ({r['switch_s'] * 1000:,.0f} ms) |\n")
    return text


def filter_child(channels, side, calls):
    """Why the phone form keeps every filter a constant (and `--switching`, retired, did not
    reach single-task speed), on one convolution stack in
    LiteRT: 4 convolutions on `side` x `side` inputs, weight-bound as ResNet-50's last stage is at
    128 px (1x1: `channels` in and out; 3x3: a quarter of them, as in its bottlenecks), whose
    filters are constants (a baked file) or resource variables (a working copy), as CONV_2D or,
    1x1, as FULLY_CONNECTED; with XNNPACK as the
    interpreter applies it by default and with `experimental_default_delegate_latest_features`.
    Returns rows of the median warm call (ms)."""
    import tempfile

    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    rows = []
    for size, channels in ((1, channels), (3, channels // 4)):
        image = np.random.default_rng(0).uniform(size=(1, side, side, channels)).astype("float32")
        kernel = np.random.default_rng(1).normal(0, 0.01, (size, size, channels, channels)).astype("float32")
        for form in ("constant", "variable", "variable, FULLY_CONNECTED")[:3 if size == 1 else 2]:
            module = tf.Module()
            module.kernel = tf.Variable(kernel, trainable=False)
            module.dense = tf.Variable(kernel[0, 0].T if size == 1 else np.zeros(1, "float32"), trainable=False)

            @tf.function(input_signature=[tf.TensorSpec(image.shape)])
            def call(x, form=form, module=module):
                for _ in range(4):
                    if form == "constant":
                        x = tf.nn.conv2d(x, tf.constant(kernel), 1, "SAME")
                    elif form == "variable":
                        x = tf.nn.conv2d(x, module.kernel.read_value(), 1, "SAME")
                    else:
                        x = tf.reshape(tf.matmul(tf.reshape(x, [-1, channels]), module.dense.read_value(),
                                                 transpose_b=True), image.shape)
                return {"y": x}

            @tf.function(input_signature=[tf.TensorSpec([])])
            def scale(s, module=module):  # assigned somewhere, so the converter keeps them variables
                module.kernel.assign(module.kernel * s)
                module.dense.assign(module.dense * s)
                return {"y": s}

            with tempfile.TemporaryDirectory() as tmp:
                tf.saved_model.save(module, tmp, signatures={"call": call, "scale": scale})
                converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["call", "scale"])
                converter.experimental_enable_resource_variables = True
                flatbuffer = converter.convert()
            row = {"kernel": size, "channels": channels, "filter": form}
            for latest in (False, True):
                runner = Interpreter(model_content=flatbuffer, experimental_default_delegate_latest_features=latest
                                     ).get_signature_runner("call")
                runner(x=image)
                times = []
                for _ in range(calls):
                    begin = time.perf_counter()
                    runner(x=image)
                    times.append(time.perf_counter() - begin)
                row["latest_ms" if latest else "default_ms"] = 1000 * float(np.median(times))
            rows.append(row)
    return rows


def filter_table(rows):
    """Markdown of `filter_child`'s rows, each against the constant filter of its kernel size."""
    constant = {r["kernel"]: r for r in rows if r["filter"] == "constant"}
    text = ("\nOne stack of 4 weight-bound convolutions in LiteRT, warm call: filters as constants (a baked "
            "file) or as variables (the retired `--switching` form's working copy):\n\n"
            "| kernel | filter | XNNPACK default (ratio) | latest delegate features (ratio) |\n|---|---|---|---|\n")
    for r in rows:
        c = constant[r["kernel"]]
        text += (f"| {r['kernel']}x{r['kernel']}, {r['channels']} channels | {r['filter']} | "
                 f"{r['default_ms']:,.1f} ms ({r['default_ms'] / c['default_ms']:.2f}) | {r['latest_ms']:,.1f} ms "
                 f"({r['latest_ms'] / c['latest_ms']:.2f}) |\n")
    return text


def phone_table(lite, n):
    """Markdown: what a phone app with `n` tasks ships and runs, per choice of files."""
    def row(label, bytes_, r, switch):
        return (f"| {label} | {bytes_ / 1e6:,.1f} MB | {r['rss'] / 1e6:,.0f} MB | {r['warm_b1_s'] * 1000:,.0f} ms | "
                f"{switch * 1000:,.0f} ms |\n")

    by = {(r["tasks"], r["quantize"]): r for r in lite}
    text = (f"\nA phone app with {n} tasks (RSS: the process with one file loaded; a task switch: another "
            "file's load and first call, or a call after another task's in the same file):\n\n"
            "| files | bytes on disk | RSS | warm call (b1) | task switch (b1) |\n|---|---|---|---|---|\n")
    for quantize in ("int8", "float16"):
        single = by[1, quantize]
        text += row(f"{n} single-task files, {quantize}", n * single["bytes"], single,
                    single["load_s"] + single["first_call_s"])
    for key, label in (((n, "none"), "one file, float32, unpacked per call"),
                       ((n, "float16"), "one file, float16, unpacked per call")):
        text += row(label, by[key]["bytes"], by[key], by[key]["switch_call_b1_s"])
    return text


def export_child(model, image_size, paths, per_task, folder):
    """Seconds to export `paths` from the files into a new folder, and as the next version of a
    model folder that holds all but the last (whose tasks it reads back packed), one after the other."""
    import keras

    from tf_piggyback.serving.saved_model import export_saved_model
    from tf_piggyback.training.backbones import load_backbone

    keras.utils.set_random_seed(0)  # the backbone `run` built the tasks on (as bench.py seeds it)
    backbone = load_backbone(model, "none", image_size)
    tasks = [f"t{i:03d}={p}" for i, p in enumerate(paths)]
    export_saved_model(backbone, tasks[:-1], os.path.join(folder, "next"), per_task_signatures=per_task)
    seconds = {}
    for key, where in (("from_files_s", "files"), ("next_version_s", "next")):
        start = time.perf_counter()
        export_saved_model(backbone, tasks, os.path.join(folder, where), per_task_signatures=per_task)
        seconds[key] = time.perf_counter() - start
    shutil.rmtree(folder)
    return seconds


def export_rows(paths, config):
    """`export_child`'s seconds for every N > 1, with and without per-task signatures, in turn for
    `config.repeats` rounds (a fresh process each); the medians, and every round's."""
    runs = {(n, per_task): [] for n in config.tasks if n > 1 for per_task in (True, False)}
    for _ in range(config.repeats):
        for (n, per_task), samples in runs.items():
            samples.append(_child("export_child", model=config.model, image_size=config.image_size,
                                  paths=paths[:n], per_task=per_task,
                                  folder=os.path.join(config.workdir, "export_timing")))
    return [{"format": "export", "tasks": n, "per_task_signatures": per_task,
             **{key: float(np.median([s[key] for s in samples])) for key in samples[0]},
             "rounds": samples} for (n, per_task), samples in runs.items()]


def _child(function, **kwargs):
    return run_child("serving", function, **kwargs)


def run(config, log=print):
    """Builds the tasks and exports, measures; returns `(rows, table)`: JSON rows and Markdown."""
    from tf_piggyback.serving.saved_model import export_saved_model
    from tf_piggyback.serving.taskbank import TaskBank
    from tf_piggyback.training.backbones import load_backbone

    backbone = load_backbone(config.model, "none", config.image_size)
    paths = random_tasks(backbone, max(config.tasks), os.path.join(config.workdir, "tasks"), log=log)
    bank = TaskBank(backbone)
    bank.add(paths[0])
    kernel_bytes = 4 * bank.version.layout.flat_size
    packed_bytes = bank.tasks()[0]["packed_bytes"]
    models = {}
    exports = [("baked" if n == 1 else f"n{n}", n, True) for n in config.tasks]
    if config.shared_only:
        exports.append((f"n{max(config.tasks)}-shared", max(config.tasks), False))
    for name, n, per_task in exports:
        folder = os.path.join(config.workdir, "models", name)
        path = os.path.join(folder, "1")
        if not os.path.isdir(path):
            start = time.perf_counter()
            export_saved_model(backbone, [f"t{i:03d}={p}" for i, p in enumerate(paths[:n])], folder, version=1,
                               slots=config.slots, per_task_signatures=per_task)
            log(f"exported {name} ({n} tasks) in {time.perf_counter() - start:.0f} s")
        models[name] = (path, n, per_task)
    samples = {name: [] for name in models}
    image_shape = list(backbone.inputs[0].shape[1:])
    warm = []
    for round_ in range(config.repeats):
        for name, (path, n, per_task) in models.items():  # in turn, round after round
            samples[name].append(_child("serving_child", path=path, tasks=[f"t{i:03d}" for i in range(n)],
                                        batch_sizes=[1, 8], calls=config.calls, image_shape=image_shape,
                                        per_task=per_task))
        warm.append(_child("warm_child", models={name: m[0] for name, m in models.items()}, batch_sizes=[1, 8],
                           calls=4 * config.calls, image_shape=image_shape))
        log(f"round {round_ + 1}/{config.repeats} measured")
    rows = []
    for name, (path, n, per_task) in models.items():
        row = {"format": "saved_model", "model": name, "tasks": n, "per_task_signatures": per_task,
               "graph_bytes": os.path.getsize(os.path.join(path, "saved_model.pb"))}
        for key in samples[name][0]:
            row[key] = float(np.median([s[key] for s in samples[name]]))
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["graph_ratio"] = row["graph_bytes"] / base["graph_bytes"]
        row["load_ratio"] = row["load_s"] / base["load_s"]
        # warm calls: the ratio of medians measured side by side in one process, median over rounds
        for batch in ("1", "8"):
            row[f"warm_b{batch}_ratio"] = float(np.median(
                [w[row["model"]][batch] / w["baked"][batch] for w in warm]))
        row["rss_bound"] = base["rss_all_called"] + row["tasks"] * packed_bytes + (config.slots + 1) * kernel_bytes
        if "cold_b8_s" in row:
            row["cold_b8_over_warm"] = row["cold_b8_s"] / row["warm_b8_s"]
            row["cold_b1_extra_s"] = row["cold_b1_s"] - row["warm_b1_s"]
    table = markdown(rows, config, packed_bytes, kernel_bytes)
    exports = export_rows(paths, config)
    rows += exports
    table += ("\nExport, seconds (median; every round): N tasks from their files into a new folder, and the "
              "next version beside a version of N-1 of them (only the new file is decoded).\n\n"
              "| tasks | N tasks from the files | the next version (+1 task) |\n|---|---|---|\n")
    for r in exports:
        label = f"{r['tasks']}" + ("" if r["per_task_signatures"] else ", `--noper_task_signatures`")
        table += "| " + label + "".join(
            f" | {r[key]:.1f} ({' / '.join(f'{s[key]:.1f}' for s in r['rounds'])})"
            for key in ("from_files_s", "next_version_s")) + " |\n"
    if config.clients:
        busy = concurrency_rows({name: m for name, m in models.items() if name == "baked" or not m[2]
                                 or f"{name}-shared" not in models}, config, image_shape)
        rows += busy
        table += (f"\n{config.concurrent_requests} requests per client at batch 1, a random task each (the baked "
                  "model: its one task); fills: the share of requests that unpacked a task into a slot.\n\n"
                  "| model | clients | requests/s | p50 | p99 | fills | peak RSS |\n|---|---|---|---|---|---|---|\n")
        for r in busy:
            table += (f"| {r['model']} | {r['clients']} | {r['requests_per_s']:,.1f} | {r['p50_s'] * 1000:,.0f} ms | "
                      f"{r['p99_s'] * 1000:,.0f} ms | {r['fill_rate']:.2f} | {r['peak_rss'] / 1e6:,.0f} MB |\n")
    if config.tflite_tasks > 1:
        if config.tflite_tasks > len(paths):
            raise ValueError(f"tflite_tasks={config.tflite_tasks} is more than the {len(paths)} tasks built")
        lite = tflite_rows(backbone, paths, config, log=log)
        bits = 8 * packed_bytes  # masked parameters (+ the id entries) of one task
        bound = lite[0]["bytes"] + config.tflite_tasks * bits / 8 * 1.1
        rows += [{"format": "tflite", **r, "bound_bytes": bound if r["tasks"] > 1 else None} for r in lite]
        phone = phone_table(lite, config.tflite_tasks)
        lite = [r for r in lite if r["quantize"] == "none"]
        table += ("\n| TFLite tasks | bytes (bound: one task's file + N n/8 x 1.1) | load | first call, each "
                  "signature (b1) | warm call (b1) (ratio) | call after another task's (b1) | RSS |\n"
                  "|---|---|---|---|---|---|---|\n")
        for r in lite:
            switch = f"{r['switch_call_b1_s'] * 1000:,.0f} ms" if "switch_call_b1_s" in r else "—"
            table += (f"| {r['tasks']} | {r['bytes'] / 1e6:,.1f} MB"
                      + (f" ({bound / 1e6:,.1f} MB)" if r["tasks"] > 1 else "")
                      + f" | {r['load_s'] * 1000:,.0f} ms | {r['first_call_s'] * 1000:,.0f} ms | "
                      f"{r['warm_b1_s'] * 1000:,.0f} ms ({r['warm_b1_s'] / lite[0]['warm_b1_s']:.2f}) | {switch} | "
                      f"{r['rss'] / 1e6:,.0f} MB |\n")
        table += phone
        phones = phone_rows(backbone, paths, config, log=log)
        rows += phones
        table += phone_file_table(phones, packed_bytes)
        filters = _child("filter_child", channels=config.filter_channels, side=config.filter_side,
                         calls=config.calls)
        rows += [{"format": "tflite_filter", **r} for r in filters]
        table += filter_table(filters)
    return rows, table


def _label(row):
    if row["tasks"] == 1:
        return "1 (baked)"
    return str(row["tasks"]) + ("" if row["per_task_signatures"] else " (no per-task signatures)")


def markdown(rows, config, packed_bytes, kernel_bytes):
    def mb(value):
        return f"{value / 1e6:,.1f} MB"

    def ms(value):
        return f"{value * 1000:,.0f} ms"

    lines = [f"{config.model} at {config.image_size} px, {config.slots} working slots; packed masks "
             f"{mb(packed_bytes)} per task, one working copy {mb(kernel_bytes)}; medians of {config.repeats} "
             "fresh processes per model, interleaved; calls through the `tasks` signature. Ratios are against "
             "the baked single-task model; warm-call ratios are measured with both models in one process, "
             "call by call in turn. The RSS bound is the baked model's RSS + N x packed masks + (slots + 1) "
             "working copies. Bytes read: what a process's warm calls read through read system calls "
             "(`rchar`), all warm calls together.",
             "",
             "| tasks | saved_model.pb (ratio) | load (ratio) | RSS all called (bound) | first call b1 | "
             "warm b1 (ratio) | warm b8 (ratio) | bytes read, warm calls | cold b1 (extra) | cold b8 / warm b8 | "
             "per-task signature: first call, RSS all called |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cold = (f"{ms(r['cold_b1_s'])} (+{ms(r['cold_b1_extra_s'])}) | {r['cold_b8_over_warm']:.2f}"
                if "cold_b8_s" in r else "— | —")
        signatures = (f"{ms(r['signature_first_call_s'])}, {mb(r['rss_all_signatures'])}"
                      if "signature_first_call_s" in r else "—")
        lines.append(
            f"| {_label(r)} | {mb(r['graph_bytes'])} ({r['graph_ratio']:.2f}) | "
            f"{r['load_s']:.2f} s ({r['load_ratio']:.2f}) | {mb(r['rss_all_called'])} ({mb(r['rss_bound'])}) | "
            f"{ms(r['first_call_s'])} | {ms(r['warm_b1_s'])} ({r['warm_b1_ratio']:.3f}) | "
            f"{ms(r['warm_b8_s'])} ({r['warm_b8_ratio']:.3f}) | "
            f"{r['warm_b1_read_bytes'] + r['warm_b8_read_bytes']:,.0f} | {cold} | {signatures} |")
    return "\n".join(lines) + "\n"
