"""`MLflowWriter`: an MLflow run as a metric writer; imports mlflow only when built."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from nnxloop.writers.base import MetricWriter


class MLflowWriter(MetricWriter):
    """An MLflow run: scalars as metrics by step, hyper-parameters as params, texts (the
    parameter table) as tags.

    A resumed run continues the same MLflow run (its id is saved with the `MetricsLogger`'s
    state in every checkpoint), and lines a killed run had already logged after the checkpoint
    it resumes from are not logged twice. `mlflow` is imported when the writer is built:
    `pip install "nnxloop[mlflow]"`.

    Args:
        tracking_uri: where the run goes (`"sqlite:///mlflow.db"`, `"http://host:5000"`, a
            directory); None: MLflow's default (`MLFLOW_TRACKING_URI`, else `./mlruns`).
        experiment: the experiment, created when missing.
        run_name: the run's name; None lets MLflow choose one.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str = "nnxloop",
        run_name: str | None = None,
    ):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError('MLflowWriter needs mlflow: pip install "nnxloop[mlflow]".') from exc
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._synced = False
        self._logged: dict[str, set[int]] = {}
        self._status = "FINISHED"  # how close() ends the run (end_run changes it)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id
        self._synced = False
        self._status = "FINISHED"

    def reset_state(self) -> None:
        """Forgets the run: the next line starts a new MLflow run (a fit from step 0)."""
        self.run_id, self._synced, self._logged = None, False, {}
        self._status = "FINISHED"

    def _run(self) -> str:
        if self.run_id is None:
            found = self._client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self._client.create_experiment(self.experiment)
            )
            run = self._client.create_run(experiment_id, run_name=self.run_name)
            self.run_id, self._synced = run.info.run_id, True
        elif not self._synced:
            # A resumed run: what the killed run logged is there already, step by step.
            self._client.update_run(self.run_id, status="RUNNING")
            for key in self._client.get_run(self.run_id).data.metrics:
                history = self._client.get_metric_history(self.run_id, key)
                self._logged[key] = {m.step for m in history}
            self._synced = True
        return self.run_id

    def write_scalars(self, step, scalars):
        from mlflow.entities import Metric

        run_id = self._run()
        now = int(time.time() * 1000)
        metrics = [
            Metric(str(k), float(v), now, int(step))
            for k, v in scalars.items()
            if int(step) not in self._logged.get(str(k), ())
        ]
        for m in metrics:
            self._logged.setdefault(m.key, set()).add(m.step)
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)

    def write_hparams(self, hparams):
        from mlflow.entities import Param

        run_id = self._run()
        existing = self._client.get_run(run_id).data.params
        # MLflow takes at most 100 params per call and keys of at most 250 characters (a
        # longer one is left out); values are cut to its 6000-character limit.
        params = [
            Param(str(k), str(v)[:6000])
            for k, v in hparams.items()
            if str(k) not in existing and len(str(k)) <= 250
        ]
        for i in range(0, len(params), 100):
            self._client.log_batch(run_id, params=params[i : i + 100])

    def write_texts(self, step, texts):
        run_id = self._run()
        for name, text in texts.items():
            self._client.set_tag(run_id, f"nnxloop.{name}", text[:5000])

    def end_run(self, status):
        self._status = status

    def close(self):
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, status=self._status)
        # A later fit with this writer sets the run running again, and ends it as it ends.
        self._status, self._synced = "FINISHED", False
