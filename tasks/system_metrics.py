"""MLflow system metrics for a training run, so a slow run explains itself.

While an SFT or DPO job trains, MLflow's own monitor samples the machine (CPU and memory use,
disk, network, and each GPU's use and memory where NVML finds one) into the run as
`system/...` metrics, drawn on the run's "System metrics" tab. It samples from the Prefect
task's process, which watches the training job on the same machine (on a cluster: the
launching node).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# Seconds between samples: often enough to see a stall, rarely enough to cost nothing (one
# psutil read and one MLflow write each). MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SAMPLING_SECONDS = 10.0


@contextmanager
def system_metrics(uri: str, run_id: str) -> Iterator[None]:
    """Sample system metrics into `run_id` while the block runs. The sampling thread is
    stopped and joined on the way out, however the block ends; a retried attempt goes on
    from the steps the earlier one logged."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SAMPLING_SECONDS, resume_logging=True, tracking_uri=uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # joins the thread and flushes what it sampled last
