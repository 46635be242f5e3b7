"""The input-pipeline benchmark (`scripts/bench.py --preset=pipeline`): one training epoch of
the input exactly as `scripts/train.py` builds it (`experiment.input_pipeline`), with no model.

Reports images/s (and per CPU core this process may use), peak resident memory and the mean
number of distinct classes per batch
(a class-sorted stream gives few; a full shuffle of C classes gives C * (1 - (1 - 1/C)^32)
in a batch of 32: 29.5 for WikiArt's 195).
"""

import os
import time

import numpy as np


def run(config, image_shape, epochs=1, log=print):
    """Iterates `epochs` epochs of the training batches of `config` (an `experiment.RunConfig`);
    returns the row dict (keys `pipeline_images_per_s`, `pipeline_peak_rss_bytes`,
    `pipeline_classes_per_batch`, ...) that `bench.json` holds."""
    from benchmarks.suite import memory_bytes
    from tf_piggyback.training.experiment import input_pipeline

    start = time.perf_counter()
    splits, batches = input_pipeline(config, image_shape)
    images, classes = 0, []
    for epoch in range(epochs):
        for _, labels in batches(epoch):
            labels = labels.numpy()
            images += len(labels)
            if len(labels) == config.train.batch_size:
                classes.append(len(np.unique(labels)))
        log(f"epoch {epoch + 1}: {images:,} images in {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    return {"dataset": config.dataset, "image_shape": list(image_shape), "batch_size": config.train.batch_size,
            "cache_mb": config.cache_mb if config.cache else 0, "epochs": epochs, "train_size": splits.train_size,
            "classes": len(splits.class_names), "protocol": config.protocol, "cached": splits.cached,
            "pipeline_images_per_s": images / seconds, "cores": len(os.sched_getaffinity(0)),
            "pipeline_images_per_s_per_core": images / seconds / len(os.sched_getaffinity(0)),
            "pipeline_peak_rss_bytes": memory_bytes("VmHWM"), "pipeline_classes_per_batch": float(np.mean(classes)),
            "seconds": seconds}


def markdown(row):
    return ("| dataset | protocol | images | classes | image | batch | cache | images/s | per core | peak RSS | "
            "classes per batch |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {row['dataset']} | {row['protocol']} | {row['train_size']:,} | {row['classes']} | "
            f"{'x'.join(map(str, row['image_shape']))} | {row['batch_size']} | {row['cache_mb']} MiB "
            f"({row['cached']:,} images) | {row['pipeline_images_per_s']:,.0f} | "
            f"{row['pipeline_images_per_s_per_core']:,.0f} | "
            f"{row['pipeline_peak_rss_bytes'] / 2**30:.2f} GiB | {row['pipeline_classes_per_batch']:.1f} |\n")
