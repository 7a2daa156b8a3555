"""Callbacks: each owns one concern and reacts to the trainer's events through its view.

The package imports none of them by itself (`nnxloop` names each one), so that the fit run,
which adds the default ones (`defaults`), loads no callback a user composes.
"""
