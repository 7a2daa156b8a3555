"""The step: compiled train, eval and predict steps over flat state leaves (`engine`), the
layout of those leaves on the mesh (`placement`), what a step's metrics may be
(`metric_values`), one update from several micro-batches (`accumulation`) and the EMA
optimizer (`ema`). It imports nothing of the trainer, the fit run, callbacks or saving."""
