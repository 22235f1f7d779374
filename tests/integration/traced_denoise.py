"""``denoise_traced``: the real ``denoise`` step, announcing each batch on stdout.

Loaded by worker subprocesses with ``--import`` (and imported by the tests, so the
gateway accepts the step). Per batch it prints ``start <session> <state> <frames>``
for every input, holds the batch for ``AUDIOSTREAM_TEST_HOLD_S`` seconds (default
0.1) before running ``denoise`` so that a test can kill the process while it holds
the batch, then prints ``end <session> <state>``. ``<state>`` is a short hash of
the session's incoming denoise state: the same message redelivered to another
worker shows the same hash, which is how a test sees who finished what.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence

from audiostream.models import nsnet2
from audiostream.processors import ProcessorContext, StepInput, StepOutput, registry
from audiostream.processors.base import BatchFn


def state_tag(state: bytes | None) -> str:
    return "none" if state is None else hashlib.sha1(state).hexdigest()[:12]


if "denoise_traced" not in registry:

    @registry.factory("denoise_traced", sample_rates=nsnet2.RATES, stateful=True)
    def denoise_traced(ctx: ProcessorContext) -> BatchFn:
        """``denoise`` with start/end lines on stdout and a hold before the model runs."""
        inner = registry.get("denoise").factory(ctx)
        hold = float(os.environ.get("AUDIOSTREAM_TEST_HOLD_S", "0.1"))

        def run(batch: Sequence[StepInput]) -> Sequence[StepOutput]:
            for item in batch:
                print(f"start {item.session_id} {state_tag(item.state)} {len(item.audio)}",
                      flush=True)
            sys.stdout.flush()
            time.sleep(hold)  # widens the window in which the batch is held, unacked
            out = inner(batch)
            for item in batch:
                print(f"end {item.session_id} {state_tag(item.state)}", flush=True)
            return out

        return run
