"""Training: the loop, tasks, metrics, baselines, raw batches, distributed runs, autotune, plots."""
