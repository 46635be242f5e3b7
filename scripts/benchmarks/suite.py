"""Benchmarks behind `scripts/bench.py`: every figure is a ratio measured side by side in one run.

Timings are medians (and minima) over repeats after warm-up, of compiled `tf.function`s or loaded
SavedModel signatures on the same random input; both sides of a ratio are called in turn, round
after round, so they see the same machine state.
"""

import collections
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks import CHILD_PATH
from tf_piggyback import classifier_only, finetune, lora, masked_layers, piggyback
from tf_piggyback.core import coding
from tf_piggyback.core.surgery import add_head, feature_model
from tf_piggyback.core.taskfile import save_task
from tf_piggyback.data.datasets import load_dataset
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.serving.signatures import image_spec, signature, with_outputs
from tf_piggyback.training.backbones import load_backbone
from tf_piggyback.training.trainer import TrainConfig, epoch_batches, make_optimizers, make_train_step, precision_policy

PRESETS = {
    "cpu": dict(model="ResNet50", image_size=64, batch_size=8, repeats=5, jit_compile=False,
                mixed_precision="mixed_bfloat16"),
    "gpu": dict(model="ResNet50", image_size=224, batch_size=32, repeats=20, jit_compile=True,
                mixed_precision="mixed_float16"),
    # Issue 15's setting: the train-step rows alone (`run_train`), at the size the paper's
    # figures are about, where the convolutions dominate.
    "train": dict(model="ResNet50", image_size=160, batch_size=16, repeats=5, jit_compile=False),
    # The methods a user chooses between (README's LoRA table), on the embedded backbones.
    "methods": dict(model="digits,digits_vit", batch_size=32, repeats=20, jit_compile=False),
}


@dataclasses.dataclass
class BenchConfig:
    model: str = "ResNet50"
    image_size: int = 64
    batch_size: int = 8
    repeats: int = 5
    warmup: int = 2
    jit_compile: bool = False
    mixed_precision: str = "mixed_bfloat16"
    num_classes: int = 10
    # The fast mode's first masked layer (`piggyback(mask_from=...)`): ResNet50's stages 4 and 5.
    mask_from: str = "conv4_block1_0_conv"


def timed(*fns, config, repeats=None):
    """`[(median, min), ...]` seconds per function over `repeats` rounds (default
    `config.repeats`) after `config.warmup`; each round calls every function once, in turn, so
    the functions of a ratio share the machine's state."""
    for _ in range(config.warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats or config.repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [(float(np.median(t)), float(np.min(t))) for t in times]


def _inputs(model, config):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (config.batch_size, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, config.num_classes, config.batch_size)
    return tf.constant(x), tf.constant(y)


def train_step(model, method, config, jit_compile=None, precision="float32"):
    """A zero-argument function that runs one training step of `model` on a fixed random batch
    (`config.batch_size`), with `config.jit_compile` unless `jit_compile` says otherwise."""
    groups = make_optimizers(model, TrainConfig(method=method, precision=precision), steps_per_epoch=100)
    for optimizer, variables in groups:
        optimizer.build(variables)
    jit_compile = config.jit_compile if jit_compile is None else jit_compile
    step = make_train_step(model, groups, tf.distribute.get_strategy(), jit_compile=jit_compile or None)
    x, y = _inputs(model, config)
    return lambda: [t.numpy() for t in step(x, y)]


class _Skip(keras.layers.Layer):
    """Passes its input through: what replaces BatchNormalization in `floor_model`."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def floor_model(backbone, num_classes):
    """The floor of a train step: the backbone's convolutions (trainable copies, with their
    biases and activations) and a head, without masks or BatchNormalization."""
    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return _Skip(name=layer.name)
        if layer.weights:
            return type(layer).from_config({**layer.get_config(), "trainable": True})
        return layer

    body = keras.models.clone_model(feature_model(backbone), clone_function=clone)
    return add_head(body, num_classes, name=f"floor_{backbone.name}")


def gradient_step(model, config):
    """A zero-argument function: forward and backward (gradients of every trainable weight) on a
    fixed random batch, nothing applied: the convolutions' own cost."""
    variables = model.trainable_variables

    @tf.function(jit_compile=config.jit_compile or None)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        grads = tape.gradient(loss, variables)
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])  # every gradient is computed

    x, y = _inputs(model, config)
    return lambda: [t.numpy() for t in step(x, y)]


def profile_ops(fn, logdir, top=10):
    """`[(op type, self ms, share)]`: where one call of `fn` spends TensorFlow's compute threads,
    from a `tf.profiler` trace (written to `logdir`, viewable in TensorBoard's profile plugin)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the trace's format (TensorBoard's too)

    tf.profiler.experimental.start(logdir)
    fn()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name.startswith("/host:CPU"))
    names = {key: meta.name for key, meta in plane.event_metadata.items()}
    self_ps = collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_"):  # TensorFlow's compute threads; not the caller, waiting
            continue
        stack = []  # events nest on a thread: an event's self time excludes its children's
        for start, end, name in sorted((e.offset_ps, e.offset_ps + e.duration_ps, names[e.metadata_id])
                                       for e in line.events):
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                self_ps[stack[-1][1]] -= end - start
            kind = name.rsplit(":", 1)[-1]
            self_ps[kind] += end - start
            stack.append((end, kind))
    total = sum(self_ps.values())
    return [(kind, ps / 1e9, ps / total) for kind, ps in self_ps.most_common(top)]


def run_train(config, log=print):
    """The train-step rows: piggyback against its floor and against finetuning, the `mask_from`
    fast mode against the full method, peak RAM of both, and a profile of one piggyback step."""
    rows = []
    backbone = load_backbone(config.model, "none", config.image_size)
    pig = piggyback(backbone, config.num_classes)
    fast = piggyback(backbone, config.num_classes, mask_from=config.mask_from)
    steps = [train_step(pig, "piggyback", config), train_step(finetune(backbone, config.num_classes), "finetune", config),
             gradient_step(floor_model(backbone, config.num_classes), config), train_step(fast, "piggyback", config)]
    times = dict(zip(("piggyback", "finetune", "floor", "fast"), timed(*steps, config=config)))
    for figure, a, b, target in (("train step, piggyback / floor (convolutions alone)", "piggyback", "floor", "<= 1.10"),
                                 ("train step, piggyback / finetune", "piggyback", "finetune", "<= 0.80"),
                                 (f"train step, mask_from={config.mask_from} / piggyback", "fast", "piggyback", None)):
        rows.append({"figure": figure, "median": times[a][0], "min": times[a][1], "baseline_median": times[b][0],
                     "ratio": times[a][0] / times[b][0], "unit": "s", "target": target})
        log(f"{figure}: {times[a][0] * 1000:.1f} ms / {times[b][0] * 1000:.1f} ms = {rows[-1]['ratio']:.3f}")
    ram = {name: _peak_ram("piggyback", config, mask_from) for name, mask_from in (("piggyback", None),
                                                                                   ("fast", config.mask_from))}
    rows.append({"figure": f"peak RAM while training, mask_from={config.mask_from} / piggyback", "unit": "bytes",
                 "median": ram["fast"], "baseline_median": ram["piggyback"], "ratio": ram["fast"] / ram["piggyback"],
                 "target": None})
    log(f"peak RAM: piggyback {ram['piggyback'] / 2**20:.0f} MiB, mask_from {ram['fast'] / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as logdir:
        ops = profile_ops(steps[0], logdir)
    rows.append({"figure": "profile of one piggyback step: self time by op type", "unit": "profile",
                 "ops": [{"op": kind, "ms": ms, "share": share} for kind, ms, share in ops]})
    log("piggyback step by op type: " + ", ".join(f"{kind} {share:.1%}" for kind, _, share in ops))
    return rows


def run_methods(config, log=print):
    """Train-step time of each method a user chooses between, interleaved, for each backbone in
    `config.model` (comma-separated): piggyback, LoRA (r = 1, 4, 8), classifier-only, finetune."""
    rows = []
    for name in config.model.split(","):
        backbone = load_backbone(name, "pretrained" if name.startswith("digits") else "none", config.image_size)
        methods = {"piggyback": (piggyback(backbone, config.num_classes), "piggyback"),
                   **{f"lora (r={r})": (lora(backbone, config.num_classes, rank=r), "lora") for r in (1, 4, 8)},
                   "classifier": (classifier_only(backbone, config.num_classes), "classifier"),
                   "finetune": (finetune(backbone, config.num_classes), "finetune")}
        times = timed(*[train_step(model, method, config) for model, method in methods.values()], config=config)
        for label, (median, fastest) in zip(methods, times):
            rows.append({"figure": f"train step, {name}, {label} / piggyback", "median": median, "min": fastest,
                         "baseline_median": times[0][0], "ratio": median / times[0][0], "unit": "s", "target": None})
            log(f"{rows[-1]['figure']}: {median * 1000:.2f} ms ({rows[-1]['ratio']:.2f})")
    return rows


def paper_sparsities(model, seed=0):
    """Random masks whose sparsity rises with depth from 4% to 34% (Table 6 / Fig. 3's range)."""
    rng = np.random.default_rng(seed)
    layers = masked_layers(model)
    for i, layer in enumerate(layers):
        sparsity = 0.04 + 0.30 * i / max(1, len(layers) - 1)
        for mask in layer.masks:
            mask.assign(layer.mask_value(rng.random(mask.shape) >= sparsity))
    return model


def _saved_signature(model, path):
    module = tf.Module()
    module.variables_ = [v.value for v in model.variables]  # as saved_model.build_serving_module does
    serve = signature(with_outputs(lambda image: model(image, training=False)), image_spec(model), "serving_default")
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
    return tf.saved_model.load(path).signatures["serving_default"]


def _first_call(path, signature, x, config):
    """`(median, min)` seconds of the first call of a signature in a freshly loaded SavedModel."""
    times = []
    for _ in range(min(3, config.repeats)):
        function = tf.saved_model.load(path).signatures[signature]
        start = time.perf_counter()
        function(image=x)["logits"].numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def run(config, log=print):
    """Runs every measurement; returns a list of row dicts (`figure`, `median`, `min`, `ratio`, ...)."""
    rows = []

    def add(figure, a, b, unit="s", target=None, **extra):
        ratio = a[0] / b[0] if b else None
        rows.append({"figure": figure, "median": a[0], "min": a[1], "baseline_median": b[0] if b else None,
                     "ratio": ratio, "unit": unit, "target": target, **extra})
        log(f"{figure}: {a[0] * (1000 if unit == 's' else 1):.3f}{'ms' if unit == 's' else ''}"
            + (f"  ratio {ratio:.3f}" if ratio is not None else "") + (f"  (target {target})" if target else ""))

    backbone = load_backbone(config.model, "none", config.image_size)
    # 1. train step: piggyback vs finetuning the same network
    pig = piggyback(backbone, config.num_classes)
    fine = finetune(backbone, config.num_classes)
    add("train step, piggyback / finetune",
        *timed(train_step(pig, "piggyback", config), train_step(fine, "finetune", config), config=config),
        target="<= 1.05")
    del fine
    # 1b. the train step's options, each against the piggyback float32 step without XLA
    with precision_policy(config.mixed_precision):
        mixed = piggyback(load_backbone(config.model, "none", config.image_size), config.num_classes)
    xla_time, mixed_time, plain_time = timed(
        train_step(pig, "piggyback", config, jit_compile=True),
        train_step(mixed, "piggyback", config, jit_compile=False, precision=config.mixed_precision),
        train_step(pig, "piggyback", config, jit_compile=False), config=config)
    del mixed
    add("train step, piggyback with XLA / without", xla_time, plain_time)
    add(f"train step, piggyback {config.mixed_precision} / float32", mixed_time, plain_time)

    with tempfile.TemporaryDirectory() as tmp:
        # 2. baked SavedModel vs the plain keras.applications model (same head)
        paper_sparsities(pig, seed=1)
        task_a = os.path.join(tmp, "a", "task.npz")
        manifest = save_task(pig, task_a)
        pig_b = paper_sparsities(piggyback(backbone, config.num_classes), seed=2)
        task_b = os.path.join(tmp, "b", "task.npz")
        save_task(pig_b, task_b)
        x, _ = _inputs(backbone, config)
        # The plain model: the keras.applications backbone and a head, no masks, saved and
        # loaded with the same signature as an export, so only the graphs differ.
        plain_fn = _saved_signature(classifier_only(backbone, config.num_classes), os.path.join(tmp, "plain"))
        baked = tf.saved_model.load(export_saved_model(backbone, [task_a], os.path.join(tmp, "single")))
        baked_fn = baked.signatures["serving_default"]
        multi = tf.saved_model.load(export_saved_model(backbone, [task_a, task_b], os.path.join(tmp, "multi")))
        # Inference calls are short and noisy: four times the repeats, interleaved.
        baked_time, plain_time, multi_time = timed(
            lambda: baked_fn(image=x)["logits"].numpy(), lambda: plain_fn(image=x)["logits"].numpy(),
            lambda: multi.signatures["a"](image=x)["logits"].numpy(), config=config, repeats=4 * config.repeats)
        add("inference, baked SavedModel / plain model", baked_time, plain_time, target="<= 1.02")
        # 3. one signature of a multi-task SavedModel vs the baked single-task model
        add("inference, multi-task signature / baked single task", multi_time, baked_time, target="<= 1.10")
        # 4. switching task: a call on one task right after a call on the other (each task's
        # masks are unpacked on its first call, measured next)
        one = x[:1]

        def switch():
            multi.signatures["a"](image=one)
            start = time.perf_counter()
            multi.signatures["b"](image=one)["logits"].numpy()
            return time.perf_counter() - start

        switches = [switch() for _ in range(config.warmup + config.repeats)][config.warmup:]
        add("switching task (batch 1, first call on the other task)", (float(np.median(switches)), min(switches)),
            None, target="< 50 ms")
        add("first call after loading, multi-task (unpacks masks) / baked single task",
            _first_call(os.path.join(tmp, "multi", "1"), "b", one, config),
            _first_call(os.path.join(tmp, "single", "1"), "serving_default", one, config))
        # 5. task file bytes vs the entropy bound and vs 1 bit per parameter
        masks = [m for layer in masked_layers(pig) for m in layer.thresholded_masks()]
        bound = sum(coding.entropy_bits(m) for m in masks) / 8
        n = sum(m.size for m in masks)
        file_bytes = os.path.getsize(task_a)
        rows.append({"figure": "task file bytes / entropy bound", "ratio": file_bytes / bound, "unit": "bytes",
                     "median": file_bytes, "baseline_median": bound, "target": "<= 1.10",
                     "sparsity": manifest["sparsity"]})
        rows.append({"figure": "task file bytes / (n / 8)", "ratio": file_bytes / (n / 8), "unit": "bytes",
                     "median": file_bytes, "baseline_median": n / 8, "target": "< 1.0"})
        log(f"task file: {file_bytes:,} bytes, entropy bound {bound:,.0f}, n/8 {n / 8:,.0f} "
            f"(overall sparsity {manifest['sparsity']:.3f})")
    # 6. the input pipeline alone: images/s that epoch_batches delivers (decode, resize, shuffle,
    # batch; cached after the first epoch), to compare with the train step's images/s
    examples = load_dataset("digits:all", image_shape=backbone.inputs[0].shape[1:]).train.cache()
    make = epoch_batches(examples, config.batch_size)
    count = sum(int(tf.shape(x)[0]) for x, _ in make(0))  # fills the cache
    (seconds, fastest), = timed(lambda: [None for _ in make(1)], config=config, repeats=3)
    rows.append({"figure": "input pipeline, images/s (cached digits at the model's size)", "unit": "images/s",
                 "median": count / seconds, "min": count / fastest, "baseline_median": None, "ratio": None,
                 "target": None})
    log(f"input pipeline: {count / seconds:,.0f} images/s; the piggyback train step takes "
        f"{config.batch_size / rows[0]['median']:,.0f} images/s")
    # 7. peak RAM of training, each method in its own process
    ram = {method: _peak_ram(method, config) for method in ("piggyback", "finetune")}
    rows.append({"figure": "peak RAM while training, piggyback / finetune", "ratio": ram["piggyback"] / ram["finetune"],
                 "unit": "bytes", "median": ram["piggyback"], "baseline_median": ram["finetune"], "target": "<= 1.2"})
    log(f"peak RAM: piggyback {ram['piggyback'] / 2**20:.0f} MiB, finetune {ram['finetune'] / 2**20:.0f} MiB")
    return rows


def _peak_ram(method, config, mask_from=None):
    code = (f"import json, sys\nsys.path.insert(0, {CHILD_PATH!r})\nimport benchmarks.suite as b\n"
            f"print(b.ram_child({method!r}, b.BenchConfig(**json.loads({json.dumps(json.dumps(dataclasses.asdict(config)))})), "
            f"{mask_from!r}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory_bytes(field="VmRSS"):
    """This process's memory from `/proc/self/status` (Linux), in bytes: `VmRSS` (resident now)
    or `VmHWM` (the resident peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:"))


def bytes_read():
    """The bytes this process has read through read system calls so far (`rchar` of
    `/proc/self/io`, Linux): from the page cache or the disk alike."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def ram_child(method, config, mask_from=None):
    """Peak resident bytes while one method's model trains (first step, with tracing, included).

    Building ResNet50 peaks higher than training at small sizes, so the peak is reset (Linux:
    `echo 5 > /proc/self/clear_refs`) once the model exists, and read after the steps.
    """
    backbone = load_backbone(config.model, "none", config.image_size)
    if method == "piggyback":
        model = piggyback(backbone, config.num_classes, mask_from=mask_from)
    else:
        model = finetune(backbone, config.num_classes)
    del backbone
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    step = train_step(model, method, config)
    for _ in range(3):
        step()
    return memory_bytes("VmHWM")


def markdown(rows):
    lines = ["| figure | median | min | baseline median | ratio | target |", "|---|---|---|---|---|---|"]
    profiles = [row for row in rows if row["unit"] == "profile"]
    for row in rows:
        if row["unit"] == "profile":
            continue
        def fmt(value):
            if value is None:
                return ""
            return f"{value * 1000:.2f} ms" if row["unit"] == "s" else f"{value:,.0f}" + (
                " images/s" if row["unit"] == "images/s" else "")
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {row['figure']} | {fmt(row['median'])} | {fmt(row.get('min'))} | "
                     f"{fmt(row['baseline_median'])} | {ratio} | {row['target'] or ''} |")
    for row in profiles:
        lines += ["", f"{row['figure']}:", "", "| op | self time | share |", "|---|---|---|"]
        lines += [f"| {op['op']} | {op['ms']:,.1f} ms | {op['share']:.1%} |" for op in row["ops"]]
    return "\n".join(lines) + "\n"
