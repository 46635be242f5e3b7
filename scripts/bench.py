"""Benchmarks: piggyback's costs as ratios measured side by side in one run (BUILD.md, "Interfaces").

python scripts/bench.py --preset=cpu            # a few minutes on 2 cores
python scripts/bench.py --preset=train          # the train step: piggyback vs its floor, finetune, mask_from
python scripts/bench.py --preset=methods        # train step of each method on the digits CNN and ViT
python scripts/bench.py --preset=gpu            # cpu's and train's rows: ResNet50, 224 px, batch 32, XLA
python scripts/bench.py --preset=serving        # 1, 10, 100 ResNet50 tasks in one SavedModel
python scripts/bench.py --preset=phone          # the phone file (3 ResNet50 tasks, 96 px): float32, float16, int8
python scripts/bench.py --preset=phone --tflite_tasks=10 --image_size=224 --phone_quantize=int8
python scripts/bench.py --preset=phone --tflite_tasks=2 --image_size=224 --int8_export_images=100 --repeats=2
python scripts/bench.py --preset=pipeline --dataset=folder:runs/wikiart_like --image_size=224
python scripts/bench.py --preset=many_tasks     # 10 to 10,000 ResNet50 tasks read from a version's files (64 GB disk)

Prints a table and writes --output (bench.json).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

import dataclasses
import json

import keras
from absl import app, flags

from benchmarks import many_tasks as bench_many_tasks
from benchmarks import pipeline as bench_pipeline
from benchmarks import serving as bench_serving
from benchmarks import suite as bench
from tf_piggyback.cli import user_errors
from tf_piggyback.core.files import write_atomic
from tf_piggyback.data.datasets import DEFAULT_CACHE_MB, PROTOCOLS
from tf_piggyback.training.experiment import RunConfig
from tf_piggyback.training.trainer import TrainConfig

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("preset", "cpu", [*bench.PRESETS, "serving", "phone", "pipeline", "many_tasks"],
                      "cpu (small, fast), train (the train step at 160 px: floor, finetune, mask_from, profile), "
                      "methods (piggyback, LoRA, classifier-only and finetune steps on the digits backbones), "
                      "gpu (cpu's and train's rows at the paper's sizes), serving (many tasks in one SavedModel), "
                      "phone (the phone file's rows alone) or pipeline (one epoch of train.py's input, no model).")
    flags.DEFINE_string("model", None, "keras.applications backbone (preset: ResNet50).")
    flags.DEFINE_integer("image_size", None, "Input size (preset: 64 on cpu, 160 on train, 224 on gpu, 128 for "
                         "serving).")
    flags.DEFINE_integer("batch_size", None, "Batch size (preset: 8 on cpu, 16 on train, 32 on gpu).")
    flags.DEFINE_string("mask_from", None, "train, gpu: the fast mode's first masked layer "
                        "(default conv4_block1_0_conv: ResNet50's stages 4 and 5).")
    flags.DEFINE_integer("repeats", None, "Timed repeats after warm-up (serving: fresh processes per model).")
    flags.DEFINE_bool("jit_compile", None, "XLA for the train steps (preset: off on cpu, on on gpu).")
    flags.DEFINE_enum("mixed_precision", None, ["mixed_float16", "mixed_bfloat16"],
                      "Policy of the mixed-precision train-step row (preset: bfloat16 on cpu, float16 on gpu).")
    flags.DEFINE_list("tasks", None, "serving: task counts per SavedModel (default 1,10,100; 1 is the baked model).")
    flags.DEFINE_integer("slots", None, "serving: unpacked working copies in each multi-task model (default 2).")
    flags.DEFINE_string("workdir", None, "serving: where the random tasks and exports go (default runs/bench_serving).")
    flags.DEFINE_integer("tflite_tasks", None, "serving, phone: tasks in the multi-task .tflite measured (default 10 "
                         "for serving, 0: none; 3 for phone).")
    flags.DEFINE_list("phone_quantize", None, "serving, phone: the phone file's precisions, of none, float16, int8 "
                      "(default none for serving; all three for phone).")
    flags.DEFINE_integer("int8_export_images", None, "phone: time int8 phone exports calibrated on this many images "
                         "(one conversion against each task converted whole) instead of the phone rows.")
    flags.DEFINE_list("clients", None, "serving: concurrent clients per run of the saturation table (default 1,4,16; "
                      "empty: skipped).")
    flags.DEFINE_string("dataset", None, "pipeline: the dataset spec, as train.py takes it.")
    flags.DEFINE_integer("cache_mb", DEFAULT_CACHE_MB, "pipeline: train.py's --cache_mb (0: no cache).")
    flags.DEFINE_integer("channels", 3, "pipeline: image channels the backbone would take.")
    flags.DEFINE_enum("protocol", "simple", PROTOCOLS, "pipeline: train.py's --protocol.")
    flags.DEFINE_string("output", "bench.json", "Where the rows and the config go.")


def _serving():
    settings = {}
    if FLAGS.preset == "phone":
        settings = {"image_size": 96, "tflite_tasks": 3, "phone_quantize": ("none", "float16", "int8"),
                    "workdir": os.path.join("runs", f"bench_phone_{FLAGS.image_size or 96}")}
    for name in ("model", "image_size", "repeats", "slots", "workdir", "tflite_tasks", "int8_export_images"):
        if getattr(FLAGS, name) is not None:
            settings[name] = getattr(FLAGS, name)
    if FLAGS.phone_quantize:
        unknown = sorted(set(FLAGS.phone_quantize) - {"none", "float16", "int8"})
        if unknown:
            raise ValueError(f"--phone_quantize takes none, float16, int8. Received: {','.join(unknown)}")
        settings["phone_quantize"] = tuple(FLAGS.phone_quantize)
    if FLAGS.tasks:
        counts = tuple(sorted({int(n) for n in FLAGS.tasks}))
        if counts[0] != 1 or len(counts) < 2:
            raise ValueError(f"--tasks must include 1 (the baked baseline) and a larger count. Received: {FLAGS.tasks}")
        settings["tasks"] = counts
    if FLAGS.clients is not None:
        settings["clients"] = tuple(int(c) for c in FLAGS.clients)
    config = bench_serving.ServingConfig(**settings)
    # The random (weights=None) backbone is seeded, so the tasks kept in --workdir load in the
    # next run, whose backbone has the same fingerprint.
    keras.utils.set_random_seed(0)
    rows, table = (bench_serving.run_phone if FLAGS.preset == "phone" else bench_serving.run)(config)
    print("\n" + table)
    return config, rows


def _many_tasks():
    settings = {name: getattr(FLAGS, name) for name in ("model", "image_size", "slots", "workdir")
                if getattr(FLAGS, name) is not None}
    if FLAGS.tasks:
        settings["tasks"] = tuple(sorted({int(n) for n in FLAGS.tasks}))
    config = bench_many_tasks.ManyTasksConfig(**settings)
    rows, table = bench_many_tasks.run(config)
    print("\n" + table)
    return config, rows


def _pipeline():
    if not FLAGS.dataset:
        raise ValueError("--preset=pipeline needs --dataset (e.g. folder:runs/wikiart_like)")
    size = FLAGS.image_size or 224
    config = RunConfig(dataset=FLAGS.dataset, cache=FLAGS.cache_mb > 0, cache_mb=FLAGS.cache_mb,
                       protocol=FLAGS.protocol, train=TrainConfig(batch_size=FLAGS.batch_size or 32))
    row = bench_pipeline.run(config, (size, size, FLAGS.channels))
    print("\n" + bench_pipeline.markdown(row))
    return config, row


@user_errors
def main(argv):
    del argv
    if FLAGS.preset == "pipeline":
        config, row = _pipeline()
        payload = {"config": dataclasses.asdict(config), **row}
        write_atomic(FLAGS.output, lambda f: f.write(json.dumps(payload, indent=2).encode()))
        print(f"wrote {FLAGS.output}")
        return
    if FLAGS.preset in ("serving", "phone"):
        config, rows = _serving()
    elif FLAGS.preset == "many_tasks":
        config, rows = _many_tasks()
    else:
        settings = dict(bench.PRESETS[FLAGS.preset])
        for name in ("model", "image_size", "batch_size", "repeats", "jit_compile", "mixed_precision", "mask_from"):
            if getattr(FLAGS, name) is not None:
                settings[name] = getattr(FLAGS, name)
        config = bench.BenchConfig(**settings)
        if FLAGS.preset == "methods":
            rows = bench.run_methods(config)
        else:
            rows = [] if FLAGS.preset == "train" else bench.run(config)
            if FLAGS.preset != "cpu":
                rows += bench.run_train(config)
        print("\n" + bench.markdown(rows))
    payload = {"config": dataclasses.asdict(config), "rows": rows}
    write_atomic(FLAGS.output, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
