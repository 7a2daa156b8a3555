"""The fit run: what lives only while one `fit` runs (`run.FitRun`: its plan, its status, the
feed, the restored position; it is the view callbacks receive), the training-metric totals
(`totals`), the `History` it fills, the preemption watcher, and what it reports on stderr
(`console`, `summary`, `progress`)."""
