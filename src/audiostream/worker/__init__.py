"""Worker: consumes work queues, batches across sessions, runs processors."""

from audiostream.worker.batcher import Batcher
from audiostream.worker.runtime import Worker, WorkerSettings

__all__ = ["Batcher", "Worker", "WorkerSettings"]
