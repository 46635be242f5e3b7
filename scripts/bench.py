"""Benchmarks: piggyback's costs as ratios measured side by side in one run (issue 6).

python scripts/bench.py --preset=cpu            # a few minutes on 2 cores
python scripts/bench.py --preset=gpu            # ResNet50, 224 px, batch 16, XLA, mixed_float16

Prints a table (median, min, baseline, ratio, target) and writes --output (bench.json).
"""

import dataclasses
import json

from absl import app, flags

from tf_piggyback import bench
from tf_piggyback.cli import user_errors
from tf_piggyback.taskfile import write_atomic

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("preset", "cpu", list(bench.PRESETS), "Sizes: cpu (small, fast) or gpu (the paper's).")
    flags.DEFINE_string("model", None, "keras.applications backbone (preset: ResNet50).")
    flags.DEFINE_integer("image_size", None, "Input size (preset: 64 on cpu, 224 on gpu).")
    flags.DEFINE_integer("batch_size", None, "Batch size (preset: 8 on cpu, 16 on gpu).")
    flags.DEFINE_integer("repeats", None, "Timed repeats after warm-up.")
    flags.DEFINE_bool("jit_compile", None, "XLA for the train steps (preset: off on cpu, on on gpu).")
    flags.DEFINE_enum("mixed_precision", None, ["mixed_float16", "mixed_bfloat16"],
                      "Policy of the mixed-precision train-step row (preset: bfloat16 on cpu, float16 on gpu).")
    flags.DEFINE_string("output", "bench.json", "Where the rows and the config go.")


@user_errors
def main(argv):
    del argv
    settings = dict(bench.PRESETS[FLAGS.preset])
    for name in ("model", "image_size", "batch_size", "repeats", "jit_compile", "mixed_precision"):
        if getattr(FLAGS, name) is not None:
            settings[name] = getattr(FLAGS, name)
    config = bench.BenchConfig(**settings)
    rows = bench.run(config)
    print("\n" + bench.markdown(rows))
    payload = {"config": dataclasses.asdict(config), "rows": rows}
    write_atomic(FLAGS.output, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
