r"""Tables and plots over finished training runs (Table 2, Fig. 3 and Table 8 style).

python scripts/report.py --model_dir=runs/upper --model_dir=runs/inverted ... --output=runs/report

Writes --output/report.md (top-1 error per task and method, storage of all tasks per method, and
the Visual Decathlon score when every task is a `visual_domain_decathlon` one), report.csv (one
line per run) and sparsity.png (per-layer sparsity of the piggyback tasks).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs


from absl import app, flags

from tf_piggyback.cli import user_errors
from tf_piggyback.training.report import build_report

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_multi_string("model_dir", None, "A finished run's --model_dir (repeat the flag).")
    flags.DEFINE_string("output", None, "Folder for report.md, report.csv and sparsity.png.")
    for name in ("model_dir", "output"):
        flags.mark_flag_as_required(name)


@user_errors
def main(argv):
    del argv
    print(build_report(FLAGS.model_dir, FLAGS.output))
    print(f"wrote {FLAGS.output}/report.md, report.csv" + (", sparsity.png" if os.path.exists(
        os.path.join(FLAGS.output, "sparsity.png")) else ""))


if __name__ == "__main__":
    define_flags()
    app.run(main)
