"""Multi-process runs on JAX's own runtime: a thin `initialize` with timeouts that fail fast."""

from __future__ import annotations

import os

import jax

HEARTBEAT_TIMEOUT_SECONDS = 20
SHUTDOWN_TIMEOUT_SECONDS = 30


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
    shutdown_timeout_seconds: int = SHUTDOWN_TIMEOUT_SECONDS,
    initialization_timeout: int = 300,
) -> None:
    """Calls `jax.distributed.initialize`, filling arguments from the environment.

    Arguments left as None come from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`, or from JAX's cluster auto-detection (SLURM, Cloud TPU, ...). CPU
    collectives use gloo, so a multi-process run also works on CPUs.

    The timeouts bound how long a lost process can go unnoticed: when one process dies, JAX's
    coordination service stops the others after `heartbeat_timeout_seconds` with an error
    naming the lost task, instead of letting them hang in a collective.

    Args:
        coordinator_address: `host:port` of process 0's coordination service.
        num_processes: how many processes take part.
        process_id: this process's index, from 0.
        heartbeat_timeout_seconds: a process silent for this long counts as lost.
        shutdown_timeout_seconds: how long processes wait for each other at exit.
        initialization_timeout: how long to wait for every process to connect.

    Example:
        ```python
        nl.distributed.initialize()  # with JAX_COORDINATOR_ADDRESS etc. in the environment
        ```
    """
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        shutdown_timeout_seconds=shutdown_timeout_seconds,
        initialization_timeout=initialization_timeout,
    )
