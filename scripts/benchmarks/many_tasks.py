"""Tasks beyond RAM (`scripts/bench.py --preset=many_tasks`): 10 to 10,000 ResNet-50 tasks in one
SavedModel, whose tasks stay in the version's files (`tf_piggyback.serving.store`).

Builds `max(tasks)` synthetic task files (`synthetic_tasks`: one real random piggyback task file,
then copies with fresh random masks and heads, written directly: `random_tasks` takes ~1 s a
ResNet-50 task). For each N, in fresh processes: the export of N tasks without per-task signatures
(seconds, peak memory, bytes on disk), the next version with one more task (seconds), then that
version loaded and called as a server would: load time, resident memory, cold calls of `samples`
tasks in turn (each a fill: its masks read from its file and unpacked) and warm calls, batch 1,
through `tasks`. The reference is one task's baked SavedModel, measured the same way. The model
folders of each N are deleted once measured (10,000 ResNet-50 tasks take 32 GB, their files 32 GB
more), the task files are kept under `workdir` for the next run.
"""

import dataclasses
import json
import os
import shutil
import time

import numpy as np

from benchmarks import run_child
from benchmarks.serving import random_tasks
from benchmarks.suite import memory_bytes


@dataclasses.dataclass
class ManyTasksConfig:
    model: str = "ResNet50"
    image_size: int = 128
    tasks: tuple = (10, 100, 1000, 10000)
    # Tasks in files against tasks in variables (exports before `serving.store`) at this N, served
    # in turn `rounds` times each (0: skipped).
    compare: int = 100
    rounds: int = 3
    slots: int = 2
    samples: int = 200  # cold calls measured, tasks in turn (distinct where N allows)
    calls: int = 20  # warm calls measured
    workdir: str = os.path.join("runs", "bench_many_tasks")


def synthetic_tasks(backbone, count, folder, log=print):
    """`count` task files over `backbone` in `folder/tNNNNN.npz`: the first real task file's
    manifest (`random_tasks`), each with its own random masks (stored as plain bits) and head."""
    from tf_piggyback.core.files import sha256, write_npz
    from tf_piggyback.core.fingerprint import fingerprint
    from tf_piggyback.core.taskfile import read_manifest, read_task

    paths = [os.path.join(folder, f"t{i:05d}.npz") for i in range(count)]
    current = fingerprint(backbone)
    if all(os.path.exists(p) for p in paths) and read_manifest(paths[-1])["backbone"]["fingerprint"] == current:
        return paths
    manifest, arrays = read_task(random_tasks(backbone, 1, os.path.join(folder, "template"), log=log)[0])
    offset = 0
    for layer in manifest["layers"]:
        nbytes = -(-int(np.prod(layer["shape"])) // 8)
        for key in ("symbol", "count", "k", "value"):
            layer.pop(key, None)
        layer.update(coding="bits", offset=offset, nbytes=nbytes)
        offset += nbytes
    start = time.perf_counter()
    for i, path in enumerate(paths):
        rng = np.random.default_rng(i)
        task = {"masks": rng.integers(0, 256, offset, dtype=np.uint8)}
        task.update({name: rng.normal(0, 0.05, value.shape).astype(value.dtype)
                     for name, value in arrays.items() if name != "masks"})
        manifest["sha256"] = {name: sha256(value) for name, value in task.items()}
        task = {"manifest": np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8), **task}
        with open(path, "wb") as f:
            write_npz(f, task)
    log(f"wrote {count} synthetic task files in {time.perf_counter() - start:.0f} s")
    return paths


def _backbone(model, image_size):
    import keras

    from tf_piggyback.training.backbones import load_backbone

    keras.utils.set_random_seed(0)  # the backbone `run` built the tasks on
    return load_backbone(model, "none", image_size)


def export_child(model, image_size, tasks_folder, count, folder, slots, in_variables=False):
    """Exports the first `count` task files of `tasks_folder` as version 1 of `folder`, then one
    more as version 2 (the others' files are linked from version 1); seconds of each, peak memory.
    `in_variables`: version 1 alone, its tasks in variables, as exports were before `serving.store`."""
    import tensorflow as tf

    from tf_piggyback.serving.saved_model import build_serving_module, export_saved_model

    backbone = _backbone(model, image_size)
    tasks = [f"t{i:05d}={os.path.join(tasks_folder, f't{i:05d}.npz')}" for i in range(count + 1)]
    if in_variables:
        module, signatures, _ = build_serving_module(backbone, tasks[:-1], slots, per_task_signatures=False)
        tf.saved_model.save(module, os.path.join(folder, "1"), signatures=signatures)
        return {}
    result = {}
    for key, these in (("export", tasks[:-1]), ("next_version", tasks)):
        start = time.perf_counter()
        export_saved_model(backbone, these, folder, slots=slots, per_task_signatures=len(these) == 1)
        result[f"{key}_s"] = time.perf_counter() - start
    result["export_rss_peak"] = memory_bytes("VmHWM")
    return result


def serve_child(path, count, image_shape, samples, calls):
    """In a fresh process: load seconds and memory, cold calls of tasks in turn, warm calls."""
    import tensorflow as tf

    start = time.perf_counter()
    loaded = tf.saved_model.load(path)
    result = {"load_s": time.perf_counter() - start, "rss_loaded": memory_bytes()}
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, *image_shape)).astype("float32"))
    signature = loaded.signatures["tasks" if count > 1 else "serving_default"]

    def call(task):
        begin = time.perf_counter()
        kwargs = {"task": tf.constant([task], tf.int32)} if count > 1 else {}
        signature(image=image, **kwargs)["logits"].numpy()
        return time.perf_counter() - begin

    result["first_call_s"] = call(0)
    order = np.random.default_rng(1).permutation(count) if count > 1 else np.zeros(1, int)
    cold = [call(int(order[i % len(order)])) for i in range(1, samples + 1)] if count > 2 else []
    warm = [call(0) for _ in range(calls + 1)][1:]
    result.update(cold_p50_s=float(np.percentile(cold, 50)) if cold else None,
                  cold_p99_s=float(np.percentile(cold, 99)) if cold else None,
                  warm_s=float(np.median(warm)), rss_called=memory_bytes(), rss_peak=memory_bytes("VmHWM"))
    return result


def _child(function, **kwargs):
    return run_child("many_tasks", function, **kwargs)


def _disk_bytes(folder):
    """Bytes of the files under `folder`, each inode once (a linked file is counted where first seen)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total


def run(config, log=print):
    """Builds the task files, exports and measures each N; returns `(rows, table)`."""
    backbone = _backbone(config.model, config.image_size)
    paths = synthetic_tasks(backbone, max(*config.tasks, config.compare) + 1, os.path.join(config.workdir, "tasks"),
                            log=log)
    shape = list(backbone.inputs[0].shape[1:])
    rows = []
    for n in (1, *config.tasks):
        folder = os.path.join(config.workdir, f"model_{n}")
        shutil.rmtree(folder, ignore_errors=True)
        exported = _child("export_child", model=config.model, image_size=config.image_size,
                          tasks_folder=os.path.dirname(paths[0]), count=n, folder=folder, slots=config.slots)
        version_bytes = _disk_bytes(os.path.join(folder, "1"))
        served = _child("serve_child", path=os.path.join(folder, "1" if n == 1 else "2"), count=n if n == 1 else n + 1,
                        image_shape=shape, samples=config.samples, calls=config.calls)
        rows.append({"tasks": n, "bytes": version_bytes, **exported, **served})
        log(json.dumps(rows[-1]))
        shutil.rmtree(folder)
    comparison = compare(config, os.path.dirname(paths[0]), shape, log) if config.compare else []
    return rows + comparison, markdown(rows, config) + "\n\n" + compare_markdown(comparison)


def compare(config, tasks_folder, shape, log=print):
    """`config.compare` tasks in files and in variables, each served in a fresh process, in turn."""
    folders = {"files": os.path.join(config.workdir, "compare_files"),
               "variables": os.path.join(config.workdir, "compare_variables")}
    for form, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        _child("export_child", model=config.model, image_size=config.image_size, tasks_folder=tasks_folder,
               count=config.compare, folder=folder, slots=config.slots, in_variables=form == "variables")
    rounds = {form: [] for form in folders}
    for _ in range(config.rounds):
        for form, folder in folders.items():
            rounds[form].append(_child("serve_child", path=os.path.join(folder, "1"), count=config.compare,
                                       image_shape=shape, samples=config.samples, calls=config.calls))
            log(json.dumps({form: rounds[form][-1]}))
    for folder in folders.values():
        shutil.rmtree(folder)
    return [{"form": form, "tasks": config.compare, "rounds": samples,
             **{key: float(np.median([s[key] for s in samples])) for key in samples[0]}}
            for form, samples in rounds.items()]


def compare_markdown(rows):
    if not rows:
        return ""
    lines = [f"{rows[0]['tasks']} tasks, medians of {len(rows[0]['rounds'])} fresh processes per form, in turn:", "",
             "| tasks in | RSS loaded | RSS after calls | cold p50 / p99 | warm |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['form']} | {row['rss_loaded'] / 1e6:,.0f} MB | {row['rss_called'] / 1e6:,.0f} MB | "
                     f"{1000 * row['cold_p50_s']:,.0f} ms / {1000 * row['cold_p99_s']:,.0f} ms | "
                     f"{1000 * row['warm_s']:,.0f} ms |")
    return "\n".join(lines)


def markdown(rows, config):
    def mb(value):
        return f"{value / 1e6:,.0f} MB"

    def ms(value):
        return "—" if value is None else f"{1000 * value:,.0f} ms"

    single = rows[0]
    lines = [f"{config.model}, {config.image_size} px, {config.slots} slots, batch 1, without per-task signatures; "
             f"cold: {config.samples} calls of tasks in turn, each a fill",
             "",
             "| tasks | on disk | export | next version (+1 task) | export peak RSS | load | RSS loaded | "
             "RSS after calls (× one task's) | cold p50 / p99 | warm |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = "1 (baked)" if row is single else f"{row['tasks']:,}"
        following = "—" if row is single else f"{row['next_version_s']:.1f} s"
        lines.append(f"| {label} | {mb(row['bytes'])} | {row['export_s']:.1f} s | "
                     f"{following} | {mb(row['export_rss_peak'])} | "
                     f"{row['load_s']:.2f} s | {mb(row['rss_loaded'])} | {mb(row['rss_called'])} "
                     f"({row['rss_called'] / single['rss_called']:.2f}×) | "
                     f"{ms(row['cold_p50_s'])} / {ms(row['cold_p99_s'])} | {ms(row['warm_s'])} |")
    return "\n".join(lines)
