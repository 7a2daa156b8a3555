"""Saving: coordinating checkpoint saves (`coordinator`: sync or async, the in-flight bound,
refusals) and what a training checkpoint holds and how a run is restored from one
(`contents`). The orbax side is `nnxloop.checkpointing`."""
