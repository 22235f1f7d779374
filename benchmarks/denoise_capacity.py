"""NSNet2 real-time sessions per worker core through the whole pipeline, batched vs unbatched.

client (this process) -> ``audiostream gateway`` -> RabbitMQ -> one ``audiostream worker
--processing denoise,passthrough`` process -> RabbitMQ -> gateway -> client, 16 kHz mono
in 20 ms chunks streamed in real time (``audiostream.bench``). The worker is pinned to
``--worker-cpus`` (all of its threads, re-applied after the model loads); ONNX Runtime
runs with one intra-op thread (the worker default).

For each batching mode (``--modes``; default: the dynamic batcher with ``--max-wait-ms``
10 (the worker's default for denoise) with and without bundles, and ``--max-batch 1``)
the session count grows by
``--step`` until a trial fails (p99 >= 100 ms, a drop, an error; each count gets
``--attempts`` tries because the machine may be shared), then is bisected. Then, on the
same worker, a ``passthrough`` control trial at the largest passing count measures
everything but the model (gateway, broker, the worker's messaging).

Every trial reports CPU per process in cores (1.0 = one core busy), the machine's busy
cores (everyone's: other load shows up here), the worker's CPU split into its event-loop
thread and its executor (processing) thread, its batch sizes and call times (from its
``/metrics``), and ``sessions_per_worker_core`` = sessions / worker CPU: what one fully
used worker core would carry at that per-session cost. That is a measured capacity only
if the worker is what saturates; ``busiest`` says which process was.

``--profile`` records the worker with py-spy during one more trial at the largest passing
count and groups the samples; ``--engine`` measures the bare NSNet2 engine
(``bench_models.throughput``) at the batch size and message length the pipeline made.

    .venv/bin/python benchmarks/denoise_capacity.py --profile --engine
    # GPU machine (not run here): the worker on the GPU with two CPU cores for its Python
    .venv/bin/python benchmarks/denoise_capacity.py --device gpu --worker-cpus 2,3 \\
        --start 50 --step 50 --max 2000 --modes batched:256:5,unbatched:1:0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

P99_LIMIT_MS = 100.0


def pipeline(variant: str | None) -> tuple[Any, ...]:
    if variant is None:
        return ("denoise",)
    return ({"name": "denoise", "params": {"variant": variant}},)


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _task_seconds(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / c.CLK_TCK


class Meters:
    """Machine-wide busy cores (everyone's, not just ours) and the worker's CPU split by
    thread: the event-loop thread (AMQP, msgpack, batching) vs the executor threads (the
    processing step: decode, NSNet2, encode)."""

    def __init__(self, worker_pid: int) -> None:
        self.pid = worker_pid

    def __enter__(self) -> Meters:
        self.t0 = time.monotonic()
        self.busy0 = _busy_jiffies()
        self.threads0 = self._threads()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _threads(self) -> dict[int, float]:
        out = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out[int(task.name)] = _task_seconds(self.pid, int(task.name))
        return out

    def read(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        busy, total = _busy_jiffies()
        share = (busy - self.busy0[0]) / max(1, total - self.busy0[1])
        now = self._threads()
        delta = {tid: (v - self.threads0.get(tid, 0.0)) / wall for tid, v in now.items()}
        loop = delta.pop(self.pid, 0.0)
        return {
            "machine_busy_cores": round(share * (os.cpu_count() or 1), 3),
            "worker_threads_cores": {"event_loop": round(loop, 3),
                                     "executor_and_other": round(sum(delta.values()), 3)},
        }


async def trial(st: c.Stack, pipe: tuple[Any, ...], sessions: int, duration: float,
                pids: dict[str, int], args: argparse.Namespace,
                profile_to: Path | None = None) -> dict[str, Any]:
    from audiostream.bench import BenchConfig, run_bench

    assert st.worker is not None
    cfg = BenchConfig(url=st.ws_url, api_key=st.key, sessions=sessions, duration_s=duration,
                      pipeline=pipe, ramp_s=min(3.0, 0.05 * sessions),
                      metrics_urls=tuple(u for u in (st.gateway_metrics, st.worker_metrics)
                                         if u))
    spy = None
    if profile_to is not None:
        spy = await asyncio.create_subprocess_exec(
            args.py_spy, "record", "-p", str(st.worker.pid), "-d", str(int(duration)),
            "-r", "200", "-f", "raw", "--nonblocking", "-o", str(profile_to),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    load_before = os.getloadavg()[0]
    with c.CpuMeter(pids) as cpu, Meters(st.worker.pid) as meters:
        r = await run_bench(cfg)
        usage = cpu.read()
        machine = meters.read()
    if spy is not None:
        await spy.wait()
    rt = r["round_trip_ms"]
    srv = r["server"] or {}
    name = pipe[0] if isinstance(pipe[0], str) else pipe[0]["name"]
    worker = (srv.get("workers") or {}).get(name) or {}
    ok = (rt["p99"] < P99_LIMIT_MS and r["chunks"]["dropped"] == 0 and not r["errors_by_code"]
          and r["sessions"]["completed"] == sessions)
    wcpu = usage.get("worker", 0.0)
    inference = worker.get("inference") or {}
    ours = sum(usage.values())
    return {
        "bench": "denoise_capacity", "processing": name, "sessions": sessions, "pass": ok,
        "latency_ms": {k: rt[k] for k in ("p50", "p90", "p99", "max")},
        "dropped": r["chunks"]["dropped"], "drops_by_reason": r["drops_by_reason"],
        "errors": r["errors_by_code"],
        "cpu_cores": usage,
        **machine,
        "other_processes_cores": round(max(0.0, machine["machine_busy_cores"] - ours), 3),
        "worker_cpu_percent": round(100 * wcpu, 1),
        "worker_cpu_ms_per_session_second": round(1000 * wcpu / sessions, 2),
        "sessions_per_worker_core": round(sessions / wcpu, 1) if wcpu > 0 else None,
        "busiest": max(usage, key=lambda k: usage[k]) if usage else None,
        "mean_batch_size": worker.get("mean_batch_size"),
        "batches": worker.get("batches"),
        "worker_call_mean_ms": inference.get("mean_ms"),
        "chunks_per_message": srv.get("chunks_per_message"),
        "messages_per_bundle": srv.get("messages_per_bundle"),
        "worker_mean_bundle_size": worker.get("mean_bundle_size"),
        "worker_deliveries_per_s": round((worker.get("deliveries") or 0) / r["wall_s"], 1)
        if r["wall_s"] else None,
        "messages_per_s": round(srv.get("messages_published", 0) / r["wall_s"], 1)
        if r["wall_s"] else None,
        "stage_means_ms": {k: v["mean_ms"] for k, v in srv.get("stages", {}).items()},
        "load_average_1m_before": round(load_before, 2),
    }


Mode = tuple[str, int, float, int]
"""name, worker --max-batch, worker --max-wait-ms, gateway --bundle-max"""


def worker_args(mode: Mode, args: argparse.Namespace) -> list[str]:
    _, batch, wait, _ = mode
    out = ["--max-batch", str(batch), "--max-wait-ms", str(wait), "--device", args.device,
           "--log-level", "warning"]
    if args.model_dir is not None:
        out += ["--model-dir", str(args.model_dir)]
    return out


AT_MAX_KEYS = (
    "latency_ms", "cpu_cores", "machine_busy_cores", "other_processes_cores",
    "worker_threads_cores", "worker_cpu_percent", "sessions_per_worker_core",
    "worker_cpu_ms_per_session_second", "mean_batch_size", "worker_call_mean_ms",
    "chunks_per_message", "messages_per_bundle", "worker_mean_bundle_size",
    "worker_deliveries_per_s", "messages_per_s", "busiest",
)


async def sweep(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Largest passing session count for one batching mode, then a passthrough control
    trial at that count on the same worker (its CPU is the cost of everything but the
    model), and optionally a py-spy profile."""
    name, batch, wait, bundle = mode
    rabbit = c.find_pid("beam.smp")
    trials: dict[int, dict[str, Any]] = {}
    denoise = pipeline(args.variant)
    async with c.stack(["denoise", "passthrough"], broker=args.broker,
                       worker_args=worker_args(mode, args),
                       gateway_args=["--bundle-max", str(bundle),
                                     *args.gateway_args.split()]) as st:
        assert st.worker is not None
        cpus = {int(x) for x in args.worker_cpus.split(",") if x.strip()}
        pinned = c.pin(st.worker.pid, cpus) if cpus else sorted(os.sched_getaffinity(st.worker.pid))
        pids = {"client": os.getpid(), "gateway": st.gateway.pid, "worker": st.worker.pid}
        if rabbit:
            pids["rabbitmq"] = rabbit
        c.log(f"[denoise_capacity] {name}: warm-up (loads the model)")
        warm = await trial(st, denoise, 2, 2.0, pids, args)
        if warm["dropped"] and set(warm["drops_by_reason"]) <= {"model_error",
                                                                "processing_failed"}:
            raise RuntimeError(f"denoise fails: {warm['drops_by_reason']} "
                               "(models prepared? `audiostream models prepare`)")
        await trial(st, ("passthrough",), 2, 1.0, pids, args)
        if cpus:
            pinned = c.pin(st.worker.pid, cpus)  # threads started since

        async def run(n: int) -> dict[str, Any]:
            best_try: dict[str, Any] | None = None
            for attempt in range(1, args.attempts + 1):
                c.log(f"[denoise_capacity] {name}: {n} sessions (attempt {attempt})")
                t = await trial(st, denoise, n, args.duration, pids, args)
                t.update(mode=name, max_batch=batch, max_wait_ms=wait, bundle_max=bundle,
                         attempt=attempt)
                c.emit(t, args.out)
                if best_try is None or t["pass"] or (
                        not best_try["pass"]
                        and t["latency_ms"]["p99"] < best_try["latency_ms"]["p99"]):
                    best_try = t
                if t["pass"]:
                    break
            assert best_try is not None
            trials[n] = best_try
            return best_try

        async def passes(n: int) -> bool:
            return bool((await run(n))["pass"])

        best, worst = await c.find_limit(passes, start=args.start, step=args.step,
                                         maximum=args.max, resolution=args.resolution)
        at = best or args.start
        c.log(f"[denoise_capacity] {name}: passthrough control at {at} sessions")
        ctl = await trial(st, ("passthrough",), at, args.duration, pids, args)
        ctl.update(mode=name, control=True)
        c.emit(ctl, args.out)
        profile = None
        if args.profile and best:
            c.log(f"[denoise_capacity] {name}: profiling the worker at {best} sessions")
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "worker.txt"
                t = await trial(st, denoise, best, args.duration, pids, args, profile_to=raw)
                t.update(mode=name, profiled=True)
                c.emit(t, args.out)
                profile = summarize_profile(raw) if raw.exists() else {"error": "no output"}
    at_best = trials.get(best, {})
    return {
        "bench": "denoise_capacity", "mode": name, "max_batch": batch, "max_wait_ms": wait,
        "bundle_max": bundle, "gateway_args": args.gateway_args, "device": args.device,
        "variant": args.variant or "default",
        "worker_cpus": pinned, "max_sessions": best, "first_failing": worst,
        "criterion": f"p99 < {P99_LIMIT_MS:g} ms, no drops, best of {args.attempts} attempt(s)",
        "resolution": args.resolution,
        "at_max": {k: at_best.get(k) for k in AT_MAX_KEYS},
        "first_failing_trial": {k: trials[worst].get(k) for k in (
            "latency_ms", "dropped", "cpu_cores", "machine_busy_cores", "other_processes_cores",
            "busiest", "mean_batch_size")} if worst is not None else None,
        "passthrough_control": {k: ctl.get(k) for k in ("sessions", *AT_MAX_KEYS)},
        "worker_profile": profile,
    }


# --- the worker's own ceiling (no gateway) ----------------------------------------------------


def _work_messages(args: argparse.Namespace, processing: str, sessions: int, reply_to: str
                   ) -> list[bytes]:
    from audiostream.envelope import encode_work

    return [encode_work(e) for e in _work_envelopes(args, processing, sessions, reply_to)]


def _work_envelopes(args: argparse.Namespace, processing: str, sessions: int, reply_to: str
                    ) -> list[Any]:
    """One 20 ms work message per session, as the gateway makes them. For denoise
    each carries a steady-state NSNet2 state (from 1 s of audio), so the worker does the
    real per-message work (two 10 ms frames, state in and out)."""
    from audiostream.audio import AudioFormat, Encoding
    from audiostream.bench import synthetic_audio
    from audiostream.envelope import Step, WorkEnvelope, state_key
    from audiostream.models import nsnet2

    fmt = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
    step = Step(processing, {"variant": args.variant} if args.variant and
                processing == "denoise" else {})
    warm = synthetic_audio(0, 1.0, 16000).astype(np.float32)[:, None] / 32768
    state: dict[str, bytes] = {}
    if processing == "denoise":
        engine = nsnet2.denoiser(16000, args.variant or "fp32", model_dir=args.model_dir)
        ((_, raw),) = engine.process([(warm, None)])
        state = {state_key(0, step): raw}
    out = []
    for i in range(sessions):
        pcm = synthetic_audio(i, 0.02, 16000).tobytes()
        out.append(WorkEnvelope(
            session_id=f"ceiling{i}", msg_id=0, seq=0, chunk_frames=(320,),
            received_at=time.time(), deadline=time.time() + 3600, format=fmt,
            output_format=fmt, audio=pcm, pipeline=(step,), step_index=0,
            reply_to=reply_to, state=state))
    return out


async def ceiling(args: argparse.Namespace, mode: Mode, processing: str) -> dict[str, Any]:
    """Work messages (20 ms each) kept ``inflight`` at a time straight into the work queues,
    replies read back: the worker's throughput per core of its own when it is never
    starved. Sessions per worker core = messages/s per worker core / 50. With a mode's
    bundle size > 1 the messages go through the gateway's ``WorkBundler``."""
    import uuid

    from audiostream.bench import scrape_all, server_view
    from audiostream.bundler import WorkBundler
    from audiostream.embedded import default_topology
    from audiostream.transport import open_transport

    name, batch, _, bundle = mode
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topo = default_topology(prefix=prefix)
    port = c.free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    inflight = max(4 * batch, 256)
    worker = await c.start("worker", c.cli(
        "worker", "--broker", args.broker, "--prefix", prefix, "--processing",
        "denoise,passthrough", "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
        "--prefetch", str(inflight), *worker_args(mode, args)), "consuming")
    transport = open_transport(args.broker, topo)
    reply_q = topo.reply_queue("ceiling")
    try:
        cpus = {int(x) for x in args.worker_cpus.split(",") if x.strip()}
        if cpus:
            c.pin(worker.pid, cpus)
        await transport.connect()
        await transport.declare()
        await transport.declare_reply_queue(reply_q)
        envelopes = _work_envelopes(args, processing, inflight, reply_q)
        bodies = _work_messages(args, processing, inflight, reply_q)
        bundler = WorkBundler(transport, max_items=bundle) if bundle > 1 else None
        done = 0
        stop_at = time.monotonic() + 3.0
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()

        async def publish(k: int) -> None:
            if bundler is not None:
                await bundler.publish(envelopes[k])
            else:
                await transport.publish_work(processing, k % topo.shards, bodies[k],
                                             ttl=60.0)

        def send(k: int) -> None:
            # Publishes overlap (confirms are awaited concurrently, never one by one).
            task = loop.create_task(publish(k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def on_reply(delivery: Any) -> None:
            nonlocal done
            done += 1
            await delivery.ack()
            if time.monotonic() < stop_at:
                send(done % len(bodies))

        sub = await transport.consume_replies(reply_q, on_reply)
        c.log(f"[denoise_capacity] ceiling {name}/{processing}: warm-up")
        for k in range(inflight):
            send(k)
        await asyncio.sleep(3.0)  # warm-up: the model loads, the loop reaches steady state
        if cpus:
            c.pin(worker.pid, cpus)
        rabbit = c.find_pid("beam.smp")
        pids = {"client": os.getpid(), "worker": worker.pid, **({"rabbitmq": rabbit}
                                                                  if rabbit else {})}
        stop_at = time.monotonic() + args.duration + 10.0
        before = await scrape_all([metrics], None)
        start_done = done
        c.log(f"[denoise_capacity] ceiling {name}/{processing}: {args.duration:g} s")
        with c.CpuMeter(pids) as cpu, Meters(worker.pid) as meters:
            await asyncio.sleep(args.duration)  # measuring a steady flow for this long
            usage, machine = cpu.read(), meters.read()
            replies = done - start_done
        stop_at = 0.0
        after = await scrape_all([metrics], None)
        await sub.cancel()
        for task in list(tasks):
            task.cancel()
        if bundler is not None:
            await bundler.close()
    finally:
        with contextlib.suppress(Exception):
            await transport.delete_reply_queue(reply_q)
        await transport.close()
        await worker.stop()
        await c.delete_prefix(args.broker, prefix)
    view = server_view(before, after)["workers"].get(processing, {})
    rate = replies / args.duration
    wcpu = usage.get("worker", 0.0)
    per_core = rate / wcpu if wcpu else None
    return {
        "bench": "denoise_capacity", "ceiling": True, "mode": name, "max_batch": batch,
        "bundle_max": bundle, "processing": processing,
        "mean_bundle_size": view.get("mean_bundle_size"), "inflight": inflight,
        "messages_per_s": round(rate, 1),
        "cpu_cores": usage, **machine,
        "mean_batch_size": view.get("mean_batch_size"),
        "worker_call_mean_ms": (view.get("inference") or {}).get("mean_ms"),
        "messages_per_worker_core_s": round(per_core, 1) if per_core else None,
        "sessions_per_worker_core_at_20ms": round(per_core / 50, 1) if per_core else None,
    }


# --- where the worker's time goes ---------------------------------------------------------------

#: (category, substrings of a frame) in priority order: a sample counts for the first
#: category that any frame of its stack matches (ONNX Runtime is called from nsnet2.py,
#: which is called from step.py, which the worker runtime calls).
CATEGORIES = [
    ("onnxruntime (NSNet2 GRU/FC)", ("onnxruntime_inference_collection",)),
    ("nsnet2 numpy (STFT, framing, overlap-add, state)", ("models/nsnet2.py",)),
    ("audio decode/encode", ("audiostream/audio.py",)),
    ("envelope msgpack", ("audiostream/envelope.py", "msgpack")),
    ("step / batch bookkeeping", ("worker/step.py", "worker/batcher.py")),
    ("AMQP client (aio-pika, aiormq, pamqp)", ("aio_pika", "aiormq", "pamqp")),
    ("prometheus", ("prometheus_client",)),
    ("worker runtime (consume, settle, ack)", ("worker/runtime.py",)),
    ("executor hand-off (concurrent.futures)", ("concurrent/futures",)),
    ("event loop (uvloop C code and callbacks)", ("asyncio", "uvloop")),
]


def summarize_profile(raw: Path) -> dict[str, Any]:
    """Shares of active samples (py-spy omits idle threads) per category, plus top leaves."""
    cats: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")[1:]  # the first element names the thread
        leaf[frames[-1] if frames else "?"] += n
        hit = next((name for name, keys in CATEGORIES
                    if any(k in f for f in frames for k in keys)), "other")
        cats[hit] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "share_by_category": {k: round(v / total, 3) for k, v in cats.most_common()},
        "top_functions": [[k, round(v / total, 3)] for k, v in leaf.most_common(12)],
    }


def step_throughput(args: argparse.Namespace, batch: int, seconds: float) -> float:
    """Real-time streams per core of the worker's whole step, without AMQP: decode the
    work messages, ``run_step`` (audio decode, NSNet2, audio encode, state in and out),
    encode the replies; ``batch`` 20 ms messages per call."""
    from audiostream.envelope import decode_work, encode_reply
    from audiostream.processors import ProcessorContext, registry
    from audiostream.worker.step import run_step

    fn = registry.get("denoise").factory(ProcessorContext(model_dir=args.model_dir))
    bodies = _work_messages(args, "denoise", batch, "bench")

    def once() -> None:
        report = run_step(fn, [decode_work(b) for b in bodies])
        for r in report.results:
            encode_reply(r)  # type: ignore[arg-type]

    for _ in range(3):
        once()
    calls = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        once()
        calls += 1
    return round(calls * batch * 0.02 / (time.process_time() - cpu0), 1)


def engine_reference(results: list[dict[str, Any]], args: argparse.Namespace
                     ) -> list[dict[str, Any]]:
    """Streams per core of the bare engine (``bench_models.throughput``) and of the whole
    worker step without AMQP, at batch sizes 1, 8, 64 and those the pipeline made."""
    import bench_models

    from audiostream.models import nsnet2, runtime

    engine = nsnet2.denoiser(16000, args.variant or "fp32", model_dir=args.model_dir,
                             options=runtime.RuntimeOptions(intra_op_threads=1))
    seen = {max(1, round((r.get("at_max") or {}).get("mean_batch_size") or 1))
            for r in results}
    out = []
    for batch in sorted({1, 8, 64} | seen):
        t = bench_models.throughput(engine, batch, 20, 2.0)
        out.append({"bench": "denoise_capacity", "engine_only": True, "batch": batch,
                    "chunk_ms": 20, "engine_streams_per_core": t["streams_per_core"],
                    "engine_ms_per_call": t["ms_per_call"],
                    "step_streams_per_core": step_throughput(args, batch, 2.0)})
    return out


async def main(args: argparse.Namespace) -> int:
    modes = []
    for spec in args.modes.split(","):
        name, batch, wait, *bundle = spec.split(":")
        modes.append((name, int(batch), float(wait), int(bundle[0]) if bundle else 64))
    c.emit({"bench": "denoise_capacity", "machine": c.machine(), "duration_s": args.duration,
            "chunk_ms": 20, "sample_rate": 16000, "device": args.device,
            "worker_cpus": args.worker_cpus, "intra_op_threads": 1,
            "load_average": os.getloadavg()}, args.out)
    results = []
    for mode in modes if args.sweep else []:
        try:
            res = await sweep(args, mode)
        except RuntimeError as exc:
            res = {"bench": "denoise_capacity", "mode": mode[0], "unavailable": str(exc)}
        results.append(res)
        c.emit(res, args.out)
    if args.ceiling:
        for mode in modes:
            for processing in ("denoise", "passthrough"):
                c.emit(await ceiling(args, mode, processing), args.out)
    if args.engine:
        for row in engine_reference([r for r in results if "at_max" in r], args):
            c.emit(row, args.out)
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--modes", default="bundled:64:10:64,unbundled:64:10:1,unbatched:1:0:1",
                    help="name:max_batch:max_wait_ms[:bundle_max], comma separated: the "
                    "worker's --max-batch/--max-wait-ms and the gateway's --bundle-max "
                    "(default 64)")
    ap.add_argument("--gateway-args", default="",
                    help="extra gateway options for every mode, e.g. '--linger-ms 20'")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--variant", choices=("fp32", "int8", "fp16"), default=None,
                    help="ask for this NSNet2 variant in the pipeline (default: the worker's)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--worker-cpus", default="1",
                    help="CPUs to pin the worker to, e.g. 1 or 2,3 ('' = no pinning)")
    c.sweep_options(ap, start=5, step=5, maximum=400, resolution=2)
    ap.add_argument("--attempts", type=int, default=2,
                    help="tries per session count; it passes if one does (shared machines)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the worker at the largest passing count (needs py-spy)")
    ap.add_argument("--engine", action="store_true",
                    help="also measure the bare engine at the batch sizes the pipeline made")
    ap.add_argument("--ceiling", action="store_true",
                    help="also measure the worker alone, fed straight through RabbitMQ")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="run the pipeline sweeps (--no-sweep: only --ceiling/--engine)")
    args = ap.parse_args()
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.profile:
        subprocess.run([args.py_spy, "--version"], check=True, capture_output=True)
    c.use_uvloop()
    c.raise_nofile()
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
