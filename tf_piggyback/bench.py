"""Benchmarks behind `scripts/bench.py`: every figure is a ratio measured side by side in one run.

Timings are medians (and minima) over repeats after warm-up, of compiled `tf.function`s or loaded
SavedModel signatures on the same random input, so both sides of a ratio see the same machine state.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from tf_piggyback import coding
from tf_piggyback.backbones import load_backbone
from tf_piggyback.export import _outputs, _signature, export_saved_model
from tf_piggyback.surgery import classifier_only, finetune, masked_layers, piggyback
from tf_piggyback.taskfile import save_task
from tf_piggyback.trainer import TrainConfig, make_optimizers, make_train_step

PRESETS = {
    "cpu": dict(model="ResNet50", image_size=64, batch_size=8, repeats=5, jit_compile=False),
    "gpu": dict(model="ResNet50", image_size=224, batch_size=16, repeats=20, jit_compile=True),
}


@dataclasses.dataclass
class BenchConfig:
    model: str = "ResNet50"
    image_size: int = 64
    batch_size: int = 8
    repeats: int = 5
    warmup: int = 2
    jit_compile: bool = False
    num_classes: int = 10


def timed(fn, config):
    """`(median, min)` seconds of `fn()` over `config.repeats` calls after `config.warmup`."""
    for _ in range(config.warmup):
        fn()
    times = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def _inputs(model, config):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (config.batch_size, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, config.num_classes, config.batch_size)
    return tf.constant(x), tf.constant(y)


def _train_step(model, method, config):
    groups = make_optimizers(model, TrainConfig(method=method), steps_per_epoch=100)
    for optimizer, variables in groups:
        optimizer.build(variables)
    step = make_train_step(model, groups, tf.distribute.get_strategy(), jit_compile=config.jit_compile or None)
    x, y = _inputs(model, config)
    return lambda: [t.numpy() for t in step(x, y)]


def paper_sparsities(model, seed=0):
    """Random masks whose sparsity rises with depth from 4% to 34% (Table 6 / Fig. 3's range)."""
    rng = np.random.default_rng(seed)
    layers = masked_layers(model)
    for i, layer in enumerate(layers):
        sparsity = 0.04 + 0.30 * i / max(1, len(layers) - 1)
        for mask in layer.masks:
            mask.assign(np.where(rng.random(mask.shape) < sparsity, 0.0, 0.01).astype("float32"))
    return model


def _saved_signature(model, path):
    module = tf.Module()
    module.variables_ = [v.value for v in model.variables]  # as export.build_serving_module does
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32, name="image")
    signature = _signature(lambda image: _outputs(model(image, training=False)), spec, "serving_default")
    tf.saved_model.save(module, path, signatures={"serving_default": signature})
    return tf.saved_model.load(path).signatures["serving_default"]


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
    add("train step, piggyback / finetune", timed(_train_step(pig, "piggyback", config), config),
        timed(_train_step(fine, "finetune", config), config), target="<= 1.05")
    del fine

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
        baked_time = timed(lambda: baked_fn(image=x)["logits"].numpy(), config)
        add("inference, baked SavedModel / plain model", baked_time,
            timed(lambda: plain_fn(image=x)["logits"].numpy(), config), target="<= 1.02")
        # 3. one signature of a multi-task SavedModel vs the baked single-task model
        multi = tf.saved_model.load(export_saved_model(backbone, [task_a, task_b], os.path.join(tmp, "multi")))
        add("inference, multi-task signature / baked single task",
            timed(lambda: multi.signatures["a"](image=x)["logits"].numpy(), config), baked_time, target="<= 1.10")
        # 4. switching task: a call on one task right after a call on the other
        one = x[:1]

        def switch():
            multi.signatures["a"](image=one)
            start = time.perf_counter()
            multi.signatures["b"](image=one)["logits"].numpy()
            return time.perf_counter() - start

        switches = [switch() for _ in range(config.warmup + config.repeats)][config.warmup:]
        add("switching task (batch 1, first call on the other task)", (float(np.median(switches)), min(switches)),
            None, target="< 50 ms")
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
    # 6. peak RAM of training, each method in its own process
    ram = {method: _peak_ram(method, config) for method in ("piggyback", "finetune")}
    rows.append({"figure": "peak RAM while training, piggyback / finetune", "ratio": ram["piggyback"] / ram["finetune"],
                 "unit": "bytes", "median": ram["piggyback"], "baseline_median": ram["finetune"], "target": "<= 1.2"})
    log(f"peak RAM: piggyback {ram['piggyback'] / 2**20:.0f} MiB, finetune {ram['finetune'] / 2**20:.0f} MiB")
    return rows


def _peak_ram(method, config):
    code = (f"import json, resource, tf_piggyback.bench as b\n"
            f"b.ram_child({method!r}, b.BenchConfig(**json.loads({json.dumps(json.dumps(dataclasses.asdict(config)))})))\n"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def ram_child(method, config):
    """Builds one method's model and runs a few train steps (peak RAM is read by the parent)."""
    backbone = load_backbone(config.model, "none", config.image_size)
    model = piggyback(backbone, config.num_classes) if method == "piggyback" else finetune(backbone, config.num_classes)
    del backbone
    step = _train_step(model, method, config)
    for _ in range(3):
        step()


def markdown(rows):
    lines = ["| figure | median | min | baseline median | ratio | target |", "|---|---|---|---|---|---|"]
    for row in rows:
        def fmt(value):
            if value is None:
                return ""
            return f"{value * 1000:.2f} ms" if row["unit"] == "s" else f"{value:,.0f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {row['figure']} | {fmt(row['median'])} | {fmt(row.get('min'))} | "
                     f"{fmt(row['baseline_median'])} | {ratio} | {row['target'] or ''} |")
    return "\n".join(lines) + "\n"
