"""Reports: a Table-2-style comparison and a per-layer sparsity plot (Fig. 3 style)."""

import io

from tf_piggyback.taskfile import write_atomic

COLUMNS = ("task", "method", "accuracy", "top1_error", "sparsity", "params", "task_bytes")


def markdown_table(rows):
    """A Markdown table of result rows (dicts with the keys of `COLUMNS`)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row.get(column, "")
            if column in ("accuracy", "top1_error", "sparsity") and value != "":
                value = f"{100 * value:.2f}%"
            elif column in ("params", "task_bytes") and value != "":
                value = f"{value:,}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
