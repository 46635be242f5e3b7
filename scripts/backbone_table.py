r"""Writes BUILD.md's "Which backbones work" table from the keras-hub sweep, so that the table cannot
drift from the code: runs `tests/test_backbone_sweep.py` (its slow part too) with each test writing
its row, then replaces the table between BUILD.md's markers.

python scripts/backbone_table.py              # the whole sweep, exports included, about 40 min on 2 cores
python scripts/backbone_table.py --only=Qwen3Backbone,MiTBackbone   # rows of these, the others kept
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

from tf_piggyback.core.files import write_atomic

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- backbone table: scripts/backbone_table.py -->", "<!-- end of backbone table -->"


def define_flags():
    flags.DEFINE_list("only", None, "Sweep only these classes; the table keeps the other rows.")
    flags.DEFINE_string("build_md", os.path.join(REPO, "BUILD.md"), "The file whose table is written.")


def sweep(only):
    """`{class: row}` from running the sweep's tests."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = os.path.join(tmp, "rows.jsonl")
        select = ["-k", " or ".join(f"[{name}]" for name in only)] if only else []
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                        "tests/test_backbone_sweep.py::test_backbone", "tests/test_backbone_sweep.py::test_backbone_exports",
                        *select], cwd=REPO,
                       env={**os.environ, "TF_PIGGYBACK_SWEEP": rows}, check=False)
        with open(rows) as f:
            return merged(map(json.loads, f))


def merged(rows):
    """`{class: row}`, each class's `exports` row (test_backbone_exports) added to its own row:
    what the exports checked after what the task checked, their refusals after its note."""
    rows = list(rows)
    table = {row["class"]: row for row in rows if row["status"] != "exports"}
    for row in rows:
        if row["status"] == "exports" and row["class"] in table:
            own = table[row["class"]]
            own["checked"] = own["checked"] + row["checked"]
            own["note"] = "; ".join(note for note in (own["note"], row["note"]) if note)
    return table


def table(rows):
    lines = ["| class | status | checked | refusal or note |", "|---|---|---|---|"]
    for name in sorted(rows):
        row = rows[name]
        note = row["note"].replace("|", "\\|")
        lines.append(f"| {name} | {row['status']} | {', '.join(row['checked'])} | {note} |")
    return "\n".join(lines)


def old_rows(text):
    """The rows of the table in `text` (to keep those `--only` does not sweep)."""
    rows = {}
    for line in text.split(BEGIN, 1)[-1].split(END, 1)[0].splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0] != "class" and not cells[0].startswith("-"):
            rows[cells[0]] = {"class": cells[0], "status": cells[1], "checked": [c for c in cells[2].split(", ") if c],
                              "note": cells[3].replace("\\|", "|")}
    return rows


def main(argv):
    del argv
    with open(FLAGS.build_md) as f:
        if BEGIN not in f.read():
            raise SystemExit(f"{FLAGS.build_md} has no {BEGIN} ... {END} markers to write the table between")
    swept = sweep(FLAGS.only)
    with open(FLAGS.build_md) as f:  # read again: the sweep takes minutes
        text = f.read()
    rows = {**(old_rows(text) if FLAGS.only else {}), **swept}
    head, rest = text.split(BEGIN, 1)
    text = f"{head}{BEGIN}\n{table(rows)}\n{END}{rest.split(END, 1)[1]}"
    write_atomic(FLAGS.build_md, lambda f: f.write(text.encode()))
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("works", "refused", "crash", "not built")}
    print(f"wrote {len(rows)} rows to {FLAGS.build_md}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


if __name__ == "__main__":
    define_flags()
    app.run(main)
