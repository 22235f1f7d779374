"""Processors for crash tests, loaded by worker subprocesses with ``--import``."""

from __future__ import annotations

import sys
import time

from audiostream.processors import StepInput, StepOutput, registry

if "slowpass" not in registry:

    @registry.per_item("slowpass")
    def slowpass(item: StepInput) -> StepOutput:
        """Passthrough that takes 100 ms and says when it starts and ends."""
        print(f"start {item.session_id}", flush=True)
        sys.stdout.flush()
        time.sleep(0.1)
        print(f"end {item.session_id}", flush=True)
        return StepOutput(item.audio)
