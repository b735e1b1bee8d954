"""A worker process's Prometheus metrics, served on GENQ_METRICS_PORT by
`genq worker` (0 = off). One set per process: with --concurrency > 1 the
prefork children count in their own memory and only the parent serves, so
run one process per pod/container (the GPU default) to scrape them."""
from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Seconds, from a 10 ms doorbell to a fine-tune of hours.
TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, float("inf"))

JOBS_FINISHED = Counter("genq_worker_jobs", "Jobs this worker finished, by model, pool and final state.",
                        ["model", "pool", "status"])
QUEUE_SECONDS = Histogram("genq_job_queue_seconds", "Submit to start, per model.", ["model"], buckets=TIME_BUCKETS)
RUN_SECONDS = Histogram("genq_job_run_seconds", "Time in the model per batch, per model.", ["model"], buckets=TIME_BUCKETS)
BATCH_SIZE = Histogram("genq_batch_size", "Jobs per batch, per model.", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")))
MODEL_LOAD_SECONDS = Histogram("genq_model_load_seconds", "Loading a model into this process.", ["model"],
                               buckets=TIME_BUCKETS)
CACHE_LOOKUPS = Counter("genq_model_cache_lookups", "Model cache lookups, by model and result (hit/miss).",
                        ["model", "result"])
WEBHOOK_ATTEMPTS = Counter("genq_webhook_attempts", "Webhook POSTs by the delivery's resulting status.", ["outcome"])


class GpuMemoryCollector:
    """CUDA memory this process holds, read at scrape time; nothing without a GPU."""

    def collect(self):
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily("genq_gpu_memory_allocated_bytes", "CUDA memory held by tensors.", labels=["device"])
        reserved = GaugeMetricFamily("genq_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator.",
                                     labels=["device"])
        for i in range(torch.cuda.device_count()):
            allocated.add_metric([str(i)], torch.cuda.memory_allocated(i))
            reserved.add_metric([str(i)], torch.cuda.memory_reserved(i))
        yield allocated
        yield reserved


_served = False


def serve(port: int) -> None:
    """Serve /metrics on `port` in a thread of this process (once)."""
    global _served
    if not port or _served:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        # Metrics are for operators; a port taken must not stop the jobs.
        log.error("cannot serve metrics on port %d (%s); this worker runs without them. Give each worker "
                  "process its own GENQ_METRICS_PORT", port, exc)
        return
    REGISTRY.register(GpuMemoryCollector())
    _served = True
    log.info("metrics on :%d/metrics", port)
