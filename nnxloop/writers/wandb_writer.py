"""`WandbWriter`: a Weights & Biases run as a metric writer; imports wandb only when built."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Mapping
from typing import Any

from nnxloop.writers import wandb_files
from nnxloop.writers.base import MetricWriter, Scalars


class WandbWriter(MetricWriter):
    """A Weights & Biases run: scalars in its history at the training step
    (`run.log(scalars, step=step)`), hyper-parameters in its config, texts (the parameter
    table) in its summary as `nnxloop/<name>`.

    The run starts at the first write. A resumed run continues the same W&B run: its id is
    saved with the `MetricsLogger`'s state in every checkpoint, and steps the W&B run already
    has (those a killed run logged after the checkpoint it resumes from) are not logged again.
    W&B keeps the latest lines in memory for a while (its service process writes the run's
    `.wandb` file only now and then, every 15 seconds in wandb 0.31, and loses what it had not
    written when the training process is killed), so the lines it may not have saved yet travel
    in the checkpoint too, and a resumed run logs those W&B lost again. Online, the W&B server
    says which steps the run has; offline (`mode="offline"`), the `.wandb` files of the earlier
    processes in the same `wandb` directory do (each resumed offline run writes a directory of
    its own, and `wandb sync` uploads them in order). `wandb` is imported when the writer is
    built: `pip install "nnxloop[wandb]"`.

    Args:
        project: the W&B project; None: W&B's default (`WANDB_PROJECT`, else the script's name).
        mode: `"online"`, `"offline"` (files only, uploaded later with `wandb sync`) or
            `"disabled"`; None: W&B's default (`WANDB_MODE`, else online).
        **init_kwargs: more arguments for `wandb.init` (`entity`, `name`, `dir`, `tags`,
            `config`, `settings`, ...), except `id`, `resume`, `resume_from` and `fork_from`:
            the writer chooses the run and resumes it itself. `reinit` defaults to
            `"create_new"`, so that the writer's run and a run of your own live side by side.
    """

    _OWN_ARGS = ("id", "resume", "resume_from", "fork_from")
    # Online, a line counts as uploaded this long after it was logged (W&B sends every 15 s).
    _UPLOAD_SECONDS = 60.0

    def __init__(self, *, project: str | None = None, mode: str | None = None, **init_kwargs: Any):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError('WandbWriter needs wandb: pip install "nnxloop[wandb]".') from exc
        own = sorted(set(init_kwargs) & set(self._OWN_ARGS))
        if own:
            raise ValueError(
                f"WandbWriter chooses and resumes its run itself; do not pass {', '.join(own)}."
            )
        self._wandb: Any = wandb
        self.project = project
        self.mode = mode
        self.init_kwargs = dict(init_kwargs)
        self.run_id: str | None = None
        self.run: Any = None  # the live wandb Run, between the first write and close()
        # Steps at or before this one were logged by an earlier process: never again.
        self._logged_through = -1
        # The rows W&B may not have saved yet, by step, with the time each was first logged.
        self._unsaved: dict[int, dict[str, float]] = {}
        self._logged_at: dict[int, float] = {}
        self._log_path: str | None = None  # the live run's .wandb file
        self._log_offset = 0  # how far it has been read
        self._exit_code = 0  # what close() reports to W&B (end_run sets it)

    def state_dict(self) -> dict[str, Any]:
        self._forget_saved()
        return {"run_id": self.run_id, "unsaved": [[s, dict(r)] for s, r in self._unsaved.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._finish()
        self.run_id = state.get("run_id") or self.run_id
        self._unsaved = {int(step): dict(row) for step, row in state.get("unsaved", [])}
        self._logged_at = {}

    def reset_state(self) -> None:
        """Forgets the run: the next line starts a new W&B run (a fit from step 0)."""
        self._finish()
        self.run_id, self._unsaved, self._logged_at = None, {}, {}

    def _start(self) -> Any:
        if self.run is not None:
            return self.run
        kwargs: dict[str, Any] = {"reinit": "create_new", **self.init_kwargs}
        if self.run_id is not None:
            kwargs.update(id=self.run_id, resume="allow")
        run = self._wandb.init(project=self.project, mode=self.mode, **kwargs)
        self.run, self.run_id = run, run.id
        if getattr(run, "disabled", False):
            self._log_path, self._logged_through = None, -1
        else:
            self._log_path = run.settings.sync_file
            if run.offline:
                # An offline run starts at step 0 again: what earlier processes saved is in
                # their .wandb files, each in a directory of its own.
                done = [wandb_files.last_step(p) for p in self._earlier_logs(run)]
                self._logged_through = max(done, default=-1)
            else:
                # The W&B server resumes the run at the step after the last one it has.
                self._logged_through = run.step - 1
        self._log_offset = 0
        # Rows the checkpoint carried that W&B lost when the last process was killed.
        carried, self._unsaved, self._logged_at = self._unsaved, {}, {}
        for step in sorted(carried):
            if step > self._logged_through:
                self._log(step, carried[step])
        return run

    def _earlier_logs(self, run: Any) -> list[str]:
        # offline-run-<time>-<id>, with -1, -2, ... after it when one started in the same second
        here = os.path.abspath(run.settings.sync_dir)
        pattern = os.path.join(glob.escape(os.path.dirname(here)), "offline-run-*", "run-*.wandb")
        return [
            p
            for p in glob.glob(pattern)
            if os.path.basename(p) == f"run-{run.id}.wandb" and os.path.dirname(p) != here
        ]

    def _log(self, step: int, row: Mapping[str, float]) -> None:
        self.run.log(dict(row), step=step)
        if self._log_path is not None:  # a disabled run keeps nothing
            self._unsaved.setdefault(step, {}).update(row)
            self._logged_at.setdefault(step, time.monotonic())

    def _forget_saved(self) -> None:
        """Drops the rows W&B has saved from those a checkpoint carries."""
        if self.run is None or self._log_path is None:
            return
        if self.run.offline:
            steps, self._log_offset = wandb_files.history_steps(self._log_path, self._log_offset)
            saved = max(steps, default=-1)
            gone = [s for s in self._unsaved if s <= saved]
        else:
            old = time.monotonic() - self._UPLOAD_SECONDS
            gone = [s for s in self._unsaved if self._logged_at.get(s, old) <= old]
        for step in gone:
            del self._unsaved[step]
            self._logged_at.pop(step, None)

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        self._start()
        step = int(step)
        if step > self._logged_through:
            self._log(step, {str(k): float(v) for k, v in scalars.items()})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        clean = {
            str(k): v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
            for k, v in hparams.items()
        }
        self._start().config.update(clean, allow_val_change=True)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        run = self._start()
        for name, text in texts.items():
            run.summary[f"nnxloop/{name}"] = text

    def _finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)
            self._unsaved, self._logged_at = {}, {}  # finish() saves everything

    def end_run(self, status: str) -> None:
        self._exit_code = 1 if status == "FAILED" else 255  # W&B shows a non-zero as failed

    def close(self) -> None:
        code, self._exit_code = self._exit_code, 0
        self._finish(code)
