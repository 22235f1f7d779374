"""Play the chart's autoscaling rules against a recorded load curve (pure Python, no cluster).

Thresholds and HPA behaviour come from ``helm/audiostream/values.yaml``, so the simulation
follows the chart: workers (KEDA dead band on queue age and one-pod-fewer utilisation) and
gateways (HPA on streaming sessions per pod). The load curve
(``benchmarks/data/load_curve.csv``: ramp to 10,000 sessions, a spike to 15,000, a drop to
3,000) drives a simple queue model of one processing type:

* a worker pod serves ``--worker-capacity`` real-time sessions at p99 < 100 ms (120: fp32
  NSNet2 per worker core under a CFS quota, docs/benchmarks.md 2026-12-04); a gateway pod
  ``--gateway-capacity`` (33: below the 40 sessions a one-core quota held at p99 68 ms,
  docs/benchmarks.md "Capacity"; the chart scales up at ~85 % of it);
* below capacity the oldest chunk's age rises steeply near saturation (0.01 s idle, 0.1 s at
  capacity); above it a backlog builds at (load / capacity - 1) seconds per second, capped
  by the 1 s deadline (chunks past it expire);
* new pods serve after ``--worker-start``/``--gateway-start`` seconds.

Prints one JSON object (``--series`` adds the per-second series) and renders ``--plot``.

    .venv/bin/python benchmarks/autoscale_sim.py --plot docs/autoscale-sim.png
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "helm" / "audiostream" / "values.yaml"
CURVE = ROOT / "benchmarks" / "data" / "load_curve.csv"
HPA_SYNC_S = 15  # kube-controller-manager --horizontal-pod-autoscaler-sync-period
HPA_TOLERANCE = 0.1  # the cluster's default tolerance
DEADLINE_S = 1.0  # gateway.deadlineMs
GATEWAY_CAPACITY = 33  # sessions per gateway pod (its requested core; see the docstring)


def seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m|h)", duration)
    if not m:
        raise ValueError(f"not a duration: {duration!r}")
    return int(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]]


@dataclass(frozen=True)
class Policy:
    kind: str  # Pods | Percent
    value: int
    period_s: int


@dataclass(frozen=True)
class Direction:
    window_s: int
    select: str  # Max | Min
    policies: tuple[Policy, ...]

    @classmethod
    def from_values(cls, raw: dict[str, Any]) -> Direction:
        return cls(int(raw.get("stabilizationWindowSeconds", 0)), raw.get("selectPolicy", "Max"),
                   tuple(Policy(p["type"], int(p["value"]), int(p["periodSeconds"]))
                         for p in raw["policies"]))


@dataclass(frozen=True)
class Rules:
    queue_age_above: float
    utilisation_below: float
    window_s: int
    worker_up: Direction
    worker_down: Direction
    worker_min: int
    gateway_target: float
    gateway_up: Direction
    gateway_down: Direction
    gateway_min: int
    gateway_scale_up_above: float

    @classmethod
    def from_values(cls, path: Path = VALUES) -> Rules:
        v = yaml.safe_load(path.read_text())
        wa, ga = v["workers"]["autoscaling"], v["gateway"]["autoscaling"]
        # The chart's default HPA target: scale-up starts at scaleUpAbove (template comment).
        target = math.floor(ga["scaleUpAbove"] / (1 + ga["clusterTolerance"]))
        return cls(
            queue_age_above=float(wa["queueAgeAbove"]),
            utilisation_below=float(wa["utilisationBelow"]),
            window_s=seconds(wa["prometheus"]["window"]),
            worker_up=Direction.from_values(wa["behavior"]["scaleUp"]),
            worker_down=Direction.from_values(wa["behavior"]["scaleDown"]),
            worker_min=int(v["workers"]["cpu"]["minReplicas"]),
            gateway_target=float(target),
            gateway_up=Direction.from_values(ga["behavior"]["scaleUp"]),
            gateway_down=Direction.from_values(ga["behavior"]["scaleDown"]),
            gateway_min=int(ga["minReplicas"]),
            gateway_scale_up_above=float(ga["scaleUpAbove"]),
        )


@dataclass
class Hpa:
    """The autoscaling/v2 controller: tolerance, stabilisation windows, rate policies."""

    up: Direction
    down: Direction
    low: int
    high: int
    replicas: int
    recommendations: deque[tuple[int, int]] = field(default_factory=deque)
    events: deque[tuple[int, int]] = field(default_factory=deque)  # (t, change)

    def sync(self, t: int, ratio: float) -> int:
        raw = self.replicas
        if abs(ratio - 1) > HPA_TOLERANCE:
            raw = math.ceil(self.replicas * ratio)
        raw = max(self.low, min(self.high, raw))
        self.recommendations.append((t, raw))
        keep = max(self.up.window_s, self.down.window_s)
        while self.recommendations and self.recommendations[0][0] < t - keep:
            self.recommendations.popleft()
        up = min(r for s, r in self.recommendations if s >= t - self.up.window_s)
        down = max(r for s, r in self.recommendations if s >= t - self.down.window_s)
        want = self.replicas
        if up > self.replicas:
            want = min(up, self._limit(t, self.up, +1))
        elif down < self.replicas:
            want = max(down, self._limit(t, self.down, -1))
        if want != self.replicas:
            self.events.append((t, want - self.replicas))
            self.replicas = want
        return self.replicas

    def _limit(self, t: int, d: Direction, sign: int) -> int:
        limits = []
        for p in d.policies:
            moved = sum(c for s, c in self.events if s > t - p.period_s and c * sign > 0)
            start = self.replicas - moved
            if p.kind == "Pods":
                limits.append(start + sign * p.value)
            elif sign > 0:
                limits.append(math.ceil(start * (1 + p.value / 100)))
            else:
                limits.append(math.floor(start * (1 - p.value / 100)))
        most = max if sign > 0 else min
        least = min if sign > 0 else max
        return (most if d.select == "Max" else least)(limits)


@dataclass
class Pool:
    """Pods of one Deployment and the queue in front of them."""

    capacity: float
    start_s: int
    ready_at: list[int] = field(default_factory=list)
    lag: float = 0.0  # seconds of backlog beyond what the pods serve

    def resize(self, t: int, replicas: int) -> None:
        while len(self.ready_at) < replicas:
            self.ready_at.append(t + self.start_s)
        del self.ready_at[replicas:]  # the newest go first

    def ready(self, t: int) -> int:
        return sum(1 for r in self.ready_at if r <= t)

    def step(self, t: int, load: float) -> tuple[float, float, float]:
        """One second: (age of the oldest waiting chunk, busy fraction, share expired)."""
        served = self.ready(t) * self.capacity
        rho = load / served if served else (math.inf if load else 0.0)
        self.lag = min(DEADLINE_S, max(0.0, self.lag + min(rho, 10.0) - 1))
        age = min(DEADLINE_S, 0.01 + 0.09 * min(rho, 1.0) ** 8 + self.lag)
        expired = 0.0 if age < DEADLINE_S else max(0.0, 1 - 1 / rho) if rho > 0 else 0.0
        return age, min(1.0, rho), expired


def load_curve(path: Path = CURVE) -> list[tuple[int, float]]:
    with path.open() as f:
        return [(int(r["t_s"]), float(r["sessions"])) for r in csv.DictReader(f)]


def interpolate(curve: Sequence[tuple[int, float]], t: int) -> float:
    for (t0, v0), (t1, v1) in itertools.pairwise(curve):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return curve[-1][1]


def simulate(rules: Rules, curve: Sequence[tuple[int, float]], *, worker_capacity: float = 120,
             gateway_capacity: float = GATEWAY_CAPACITY, worker_start: int = 30,
             gateway_start: int = 10, worker_max: int = 200,
             gateway_max: int = 1000) -> dict[str, list[float]]:
    first = curve[0][1]
    workers = Pool(worker_capacity, worker_start)
    gateways = Pool(gateway_capacity, gateway_start)
    w_hpa = Hpa(rules.worker_up, rules.worker_down, rules.worker_min, worker_max,
                max(rules.worker_min, math.ceil(first / worker_capacity)))
    g_hpa = Hpa(rules.gateway_up, rules.gateway_down, rules.gateway_min, gateway_max,
                max(rules.gateway_min, math.ceil(first / rules.gateway_target)))
    workers.resize(-worker_start, w_hpa.replicas)
    gateways.resize(-gateway_start, g_hpa.replicas)
    ages: deque[float] = deque(maxlen=rules.window_s)
    utils: deque[float] = deque(maxlen=rules.window_s)
    out: dict[str, list[float]] = {k: [] for k in (
        "t", "sessions", "workers", "gateways", "queue_age", "latency", "expired")}
    for t in range(curve[0][0], curve[-1][0] + 1):
        load = interpolate(curve, t)
        age, busy, expired = workers.step(t, load)
        g_age, _, g_expired = gateways.step(t, load)
        ready = workers.ready(t)
        # The util trigger: summed busy fraction over ready pods / (pods - 1).
        utils.append(busy * ready / max(ready - 1, 1))
        ages.append(age)
        if t % HPA_SYNC_S == 0:
            composite = 150 if sum(ages) / len(ages) > rules.queue_age_above else (
                50 if sum(utils) / len(utils) < rules.utilisation_below else 100)
            workers.resize(t, w_hpa.sync(t, composite / 100))
            g_ready = max(gateways.ready(t), 1)
            gateways.resize(t, g_hpa.sync(t, load / g_ready / rules.gateway_target))
        out["t"].append(t)
        out["sessions"].append(load)
        out["workers"].append(w_hpa.replicas)
        out["gateways"].append(g_hpa.replicas)
        out["queue_age"].append(age)
        out["latency"].append(age + g_age)
        out["expired"].append(max(expired, g_expired))
    return out


def direction_changes(series: Sequence[float]) -> int:
    changes, last = 0, 0
    for a, b in itertools.pairwise(series):
        d = (b > a) - (b < a)
        if d and last and d != last:
            changes += 1
        last = d or last
    return changes


def summarise(rules: Rules, s: dict[str, list[float]]) -> dict[str, Any]:
    over = [a > rules.queue_age_above for a in s["queue_age"]]
    sessions = s["sessions"]
    lost = sum(e * n for e, n in zip(s["expired"], sessions, strict=True))
    return {
        "rules": {"queue_age_above_s": rules.queue_age_above,
                  "utilisation_below": rules.utilisation_below,
                  "gateway_target_per_pod": rules.gateway_target},
        "duration_s": len(sessions),
        "peak_sessions": max(sessions),
        "workers_max": max(s["workers"]), "workers_final": s["workers"][-1],
        "gateways_max": max(s["gateways"]), "gateways_final": s["gateways"][-1],
        "worker_direction_changes": direction_changes(s["workers"]),
        "gateway_direction_changes": direction_changes(s["gateways"]),
        "queue_age_max_s": round(max(s["queue_age"]), 3),
        "seconds_over_queue_age_threshold": sum(over),
        "latency_p99_s": round(sorted(s["latency"])[int(0.99 * len(s["latency"]))], 3),
        "session_seconds_expired_share": round(lost / max(sum(sessions), 1), 6),
    }


def plot(s: dict[str, list[float]], rules: Rules, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [t / 60 for t in s["t"]]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax1.plot(minutes, s["sessions"], color="grey", label="sessions")
    ax1.set_ylabel("sessions")
    ax1b = ax1.twinx()
    ax1b.step(minutes, s["workers"], where="post", color="tab:blue", label="worker pods")
    ax1b.step(minutes, [g / 5 for g in s["gateways"]], where="post", color="tab:green",
              label="gateway pods / 5")
    ax1b.set_ylabel("replicas")
    ax1.legend(loc="upper left")
    ax1b.legend(loc="upper right")
    ax1.set_title("Chart autoscaling rules against the recorded load curve (simulated)")
    ax2.plot(minutes, s["queue_age"], color="tab:orange", label="oldest chunk age")
    ax2.axhline(rules.queue_age_above, color="red", linestyle="--",
                label=f"scale-up threshold {rules.queue_age_above:g} s")
    ax2.set_ylabel("queue age (s)")
    ax2.set_yscale("log")
    ax2.legend(loc="upper left")
    ax3.plot(minutes, [x * 1000 for x in s["latency"]], color="tab:purple",
             label="latency (worker + gateway queueing)")
    ax3.axhline(100, color="red", linestyle="--", label="p99 objective 100 ms")
    ax3.set_ylabel("latency (ms)")
    ax3.set_yscale("log")
    ax3.set_xlabel("minutes")
    ax3.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=Path, default=VALUES)
    ap.add_argument("--curve", type=Path, default=CURVE)
    ap.add_argument("--worker-capacity", type=float, default=120)
    ap.add_argument("--gateway-capacity", type=float, default=GATEWAY_CAPACITY)
    ap.add_argument("--worker-start", type=int, default=30)
    ap.add_argument("--gateway-start", type=int, default=10)
    ap.add_argument("--worker-max", type=int, default=200,
                    help="maxReplicas (the chart's 20 per pool cannot carry 10,000 sessions)")
    ap.add_argument("--gateway-max", type=int, default=1000)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--series", action="store_true", help="include the per-second series")
    args = ap.parse_args(argv)
    rules = Rules.from_values(args.values)
    s = simulate(rules, load_curve(args.curve), worker_capacity=args.worker_capacity,
                 gateway_capacity=args.gateway_capacity, worker_start=args.worker_start,
                 gateway_start=args.gateway_start, worker_max=args.worker_max,
                 gateway_max=args.gateway_max)
    result = summarise(rules, s)
    if args.series:
        result["series"] = s
    if args.plot:
        plot(s, rules, args.plot)
        result["plot"] = str(args.plot)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
