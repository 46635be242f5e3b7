"""Reports: a Table-2-style comparison, the Visual Decathlon score and a per-layer sparsity plot.

`collect` reads the `metrics.json` and `config.json` of training runs (`scripts/train.py`'s
model_dirs); `comparison` lays them out as Table 2 does: top-1 error per task and method, and what
storing all the tasks costs per method.
"""

import csv
import io
import json
import os
import statistics

from tf_piggyback.core import methods
from tf_piggyback.core.files import write_atomic
from tf_piggyback.core.taskfile import read_manifest
from tf_piggyback.training.backbones import load_backbone

COLUMNS = ("task", "method", "accuracy", "top1_error", "top5_error", "sparsity", "params", "task_bytes")


# The mark of a run that trained at chance level (its metrics.json `warnings`), in every table.
AT_CHANCE = "⚠ at chance"


def _at_chance_note(rows):
    """The line under a table that names its runs at chance level ("" if none)."""
    failed = [row["model_dir"] for row in rows if row.get("warnings")]
    if not failed:
        return ""
    return (f"\n{AT_CHANCE}: {len(failed)} run(s) trained at chance level, not results (their metrics.json "
            f"`warnings`): {', '.join(failed)}\n")


def markdown_table(rows):
    """A Markdown table of result rows (dicts with the keys of `COLUMNS`)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row.get(column, "")
            if column in ("accuracy", "top1_error", "top5_error", "sparsity") and value not in ("", None):
                value = f"{100 * value:.2f}%" + (f" {AT_CHANCE}" if column == "accuracy" and row.get("warnings") else "")
            elif value is None:
                value = ""
            elif column in ("params", "task_bytes") and value != "":
                value = f"{value:,}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _at_chance_note(rows)


def sparsity_plot(manifests, path):
    """Bar chart of each masked layer's sparsity, one series per task (§5.2, Fig. 3).

    Args:
        manifests: `{task name: task-file manifest}` of piggyback tasks on one backbone.
        path: the PNG to write (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [entry["name"].rsplit("/", 1)[0] for entry in next(iter(manifests.values()))["layers"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    width = 0.8 / len(manifests)
    for i, (task, manifest) in enumerate(manifests.items()):
        values = [100 * entry["sparsity"] for entry in manifest["layers"]]
        ax.bar([j + i * width for j in range(len(values))], values, width, label=task)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel("zeros in mask (%)")
    ax.set_title("Learned sparsity per layer, input to output")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


# Visual Decathlon (Rebuffi et al. 2017): the baseline errors are those of the Finetune row of the
# paper's Table 8 (100 - top-1 accuracy, in %), keyed by TFDS `visual_domain_decathlon` config.
DECATHLON_BASELINE_ERRORS = {
    "imagenet12": 40.13, "aircraft": 39.66, "cifar100": 17.88, "daimlerpedcls": 7.18, "dtd": 44.47,
    "gtsrb": 2.47, "vgg-flowers": 18.59, "omniglot": 12.31, "svhn": 3.45, "ucf101": 48.8,
}


def decathlon_score(errors, baseline_errors=None):
    """Σ_d 1000 · max(0, E_max − E_d)² / E_max², with E_max twice the baseline error of task d.

    Args:
        errors: `{task: top-1 error in %}`; task names are `DECATHLON_BASELINE_ERRORS` keys
            unless `baseline_errors` is given.
        baseline_errors: `{task: baseline top-1 error in %}`.

    Returns:
        The score: 1000 per task at most, 250 per task at the baseline's error (§6, Table 8).
    """
    baseline_errors = DECATHLON_BASELINE_ERRORS if baseline_errors is None else baseline_errors
    unknown = sorted(set(errors) - set(baseline_errors))
    if unknown:
        raise ValueError(f"no baseline error for task(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(baseline_errors))}")
    score = 0.0
    for task, error in errors.items():
        e_max = 2.0 * baseline_errors[task]
        score += 1000.0 * max(0.0, e_max - error) ** 2 / e_max ** 2
    return score


def _task_name(dataset):
    return dataset.partition(":")[2].rsplit("/", 1)[-1] or dataset


def collect(model_dirs):
    """One row per finished run: `task`, `method` (the method's label, `Method.label`; PackNet runs
    labelled with their task order), `storage` (`Method.storage`), `accuracy`, `top1_error`,
    `sparsity`, `params`, `task_bytes`, `model_dir`, `backbone`, `warnings` (why the run is no
    result: trained at chance level; `experiment.run_warnings`)."""
    runs = {}
    for model_dir in model_dirs:
        path = os.path.join(model_dir, "metrics.json")
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir} holds no metrics.json; pass the --model_dir of a finished training run")
        with open(path) as f:
            metrics = json.load(f)
        runs[os.path.abspath(model_dir)] = metrics
    rows, packs = [], {}
    for model_dir, metrics in runs.items():
        config = metrics["config"]
        row = {"task": _task_name(config["dataset"]), "method": metrics["method"], "model_dir": model_dir,
               "backbone": f"{config['backbone']}:{config['weights']}", "task_index": metrics.get("task_index"),
               **{k: metrics.get(k) for k in ("accuracy", "top1_error", "top5_error", "sparsity", "params",
                                              "task_bytes")}, "warnings": metrics.get("warnings", [])}
        method = methods.get(metrics["method"])
        row["method"], row["storage"] = method.label(config), method.storage
        if method.storage == "pack":  # grouped by the pack's first run, found through packnet_base
            first, base = model_dir, config.get("packnet_base")
            while base:
                first = os.path.abspath(base)
                with open(os.path.join(base, "config.json")) as f:
                    base = json.load(f).get("packnet_base")
            packs.setdefault(first, []).append(row)
        rows.append(row)
    for pack in packs.values():  # PackNet's results depend on task order, so the label shows it
        order = " → ".join(row["task"] for row in sorted(pack, key=lambda row: row["task_index"]))
        for row in pack:
            row["method"] = f"packnet ({order})"
    return rows


def _error_cell(runs):
    """Top-1 error in % (top-5 in parentheses, as in Table 2); mean ± std over several runs."""
    def stat(key):
        values = [100 * run[key] for run in runs if run.get(key) is not None]
        if not values:
            return None
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    top1, top5 = stat("top1_error"), stat("top5_error")
    if top1 is None:
        return ""
    failed = sum(bool(run.get("warnings")) for run in runs)
    mark = "" if not failed else f" {AT_CHANCE}" if len(runs) == 1 else f" {AT_CHANCE} ({failed} of {len(runs)})"
    return top1 + (f" ({top5})" if top5 else "") + (f" [n={len(runs)}]" if len(runs) > 1 else "") + mark


def comparison(rows, backbone_bytes):
    """Table 2's layout as Markdown: top-1 error (%) per task (rows) and method (columns), top-5
    error in parentheses where a task has more than 5 classes, then the storage of all tasks per
    method next to one backbone's (`backbone_bytes`, float32 weights). Several runs of one task
    and method (seeds) show as mean ± standard deviation over the runs, with their count.

    Storage, by `Method.storage`: piggyback, classifier-only and LoRA keep one backbone and each
    task file; finetune one model per task; PackNet one pack, the one written after its last
    task (per task, the first run's files count).
    """
    labels = list(dict.fromkeys(row["method"] for row in rows))
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    cells = {}
    for row in rows:
        cells.setdefault((row["task"], row["method"]), []).append(row)
    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_error_cell(cells.get((task, m), [])) for m in labels) + " |")
    storage, counts = [], []
    for method in labels:
        own = [runs[0] for (_, m), runs in cells.items() if m == method]
        if own[0]["storage"] == "pack":
            total, models = max(own, key=lambda row: row["task_index"])["task_bytes"], 1
        elif own[0]["storage"] == "own":
            total, models = sum(row["task_bytes"] for row in own), len(own)
        else:
            total, models = backbone_bytes + sum(row["task_bytes"] for row in own), 1
        storage.append(f"{total / 2**20:.2f} MB ({total / backbone_bytes:.2f}x)")
        counts.append(str(models))
    lines.append("| storage, all tasks | " + " | ".join(storage) + " |")
    lines.append("| # models | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n" + _at_chance_note(rows)


def write_csv(rows, path):
    """The rows as CSV (one line per run, its warnings joined by " | "), atomically."""
    buffer = io.StringIO()
    columns = ("task", "method", "accuracy", "top1_error", "top5_error", "sparsity", "params", "task_bytes", "backbone",
               "model_dir", "warnings")
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "warnings": " | ".join(row.get("warnings", []))} for row in rows)
    write_atomic(path, lambda f: f.write(buffer.getvalue().encode()))


def backbone_bytes(model_dir):
    """float32 bytes of the backbone a run was trained on (built without downloading weights)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = "none" if config["weights"] == "imagenet" or config["backbone"] == "digits" else config["weights"]
    return 4 * load_backbone(config["backbone"], weights, config["image_size"]).count_params()


def build_report(model_dirs, output):
    """Writes the report files; returns the Markdown text."""
    rows = collect(model_dirs)
    backbones = {row["backbone"] for row in rows}
    if len(backbones) > 1:
        raise ValueError(f"the runs use different backbones ({', '.join(sorted(backbones))}); report one at a time")
    text = ["# Results", "", comparison(rows, backbone_bytes(rows[0]["model_dir"]))]
    if {row["task"] for row in rows} <= set(DECATHLON_BASELINE_ERRORS):
        scores = {}  # the mean error over a task's runs
        for row in rows:
            scores.setdefault(row["method"], {}).setdefault(row["task"], []).append(100 * row["top1_error"])
        scores = {m: {t: statistics.mean(e) for t, e in errors.items()} for m, errors in scores.items()}
        text += ["Visual Decathlon score (baseline errors: Table 8's Finetune row):", ""]
        failed = {row["method"] for row in rows if row["warnings"]}
        text += [f"- {method}: {decathlon_score(errors):.0f} over {len(errors)} tasks"
                 + (f" {AT_CHANCE} (a run of it)" if method in failed else "") for method, errors in scores.items()]
        text.append("")
    text += ["## Runs", "", markdown_table(rows)]
    manifests = {f"{row['task']}": read_manifest(os.path.join(row["model_dir"], "task.npz"))
                 for row in rows if row["method"] == "piggyback"}
    os.makedirs(output, exist_ok=True)
    if manifests:
        sparsity_plot(manifests, os.path.join(output, "sparsity.png"))
        text += ["Per-layer sparsity of the piggyback masks: sparsity.png", ""]
    markdown = "\n".join(text)
    write_atomic(os.path.join(output, "report.md"), lambda f: f.write(markdown.encode()))
    write_csv(rows, os.path.join(output, "report.csv"))
    return markdown
