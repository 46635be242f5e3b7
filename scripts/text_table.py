r"""BUILD.md's text-task table: per keras-hub family, each method's accuracy and task bytes on one
small text task, trained from a preset folder as train.py does (`experiment.run`).

python scripts/make_text_presets.py --output=runs/text
python scripts/text_table.py --presets=runs/text --epochs=15

The presets are small and random (`make_text_presets.py`; real ones need downloads), so the table
compares the methods on one backbone, not the families with each other.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import user_errors

FLAGS = flags.FLAGS
# (row name, method, LoRA rank)
METHODS = [("piggyback", "piggyback", 4), ("classifier-only", "classifier", 4), ("LoRA r=4", "lora", 4),
           ("LoRA r=8", "lora", 8), ("finetune", "finetune", 4)]
# A backbone with several outputs names the one the head reads.
FEATURE_LAYER = {"bert": "sequence_output"}


def define_flags():
    flags.DEFINE_string("presets", "runs/text", "What make_text_presets.py wrote.")
    flags.DEFINE_list("families", ["bert", "distil_bert", "llama"], "Preset folders under --presets.")
    flags.DEFINE_integer("epochs", 15, "Epochs per run.")
    flags.DEFINE_float("head_lr", 1e-3, "Adam rate of the head (the demo's: small data).")
    flags.DEFINE_integer("seed", 0, "Seed of every run.")


@user_errors
def main(argv):
    del argv
    import tf_piggyback as pb
    from tf_piggyback.training.experiment import RunConfig, run

    rows = ["| family | method | accuracy | task bytes | train s |", "|---|---|---|---|---|"]
    for family in FLAGS.families:
        preset = os.path.join(FLAGS.presets, family)
        for row, method, rank in METHODS:
            config = RunConfig(backbone=preset, dataset=f"folder:{os.path.join(FLAGS.presets, 'topics')}",
                               feature_layer=FEATURE_LAYER.get(family), lora_rank=rank,
                               train=pb.TrainConfig(method=method, epochs=FLAGS.epochs, head_lr=FLAGS.head_lr,
                                                    seed=FLAGS.seed))
            model_dir = os.path.join(FLAGS.presets, "runs", f"{family}_{method}{rank if method == 'lora' else ''}")
            metrics = run(config, model_dir, log=lambda line: None)
            rows.append(f"| {family} | {row} | {metrics['accuracy']:.3f} | {metrics['task_bytes']:,} | "
                        f"{metrics['train_seconds']:.0f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
