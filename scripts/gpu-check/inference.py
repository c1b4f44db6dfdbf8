#!/usr/bin/env python3
"""GPU check, group 3: a real inference loop in a slice, with and without the Python sidecar.

Builds a small Llama-style causal LM from a transformers config (random bf16 weights, nothing
downloaded), sized from the slice (``VRAMSLICE_VRAM_LIMIT_BYTES``, ~12% of it). Measures the real
peak of each request size alone (``max_memory_allocated``), choosing batch sizes so that the
smallest needs ~5% of the limit and the largest ~40%. Then ``--clients`` threads each send a
seeded mix of those sizes (forward passes, ``use_cache=False``, synchronised by ``.item()``) for
``--seconds``, so that only a few requests fit at once.

- ``--mode sidecar``: every request goes through ``vramslice.guarded``, keyed by its size, so the
  sidecar learns each size's peak, admits only what fits below the high-water mark and retries
  out-of-memory errors. Measured: requests completed, OOM errors that reached clients (target 0),
  admission timeouts and refusals, retries, learned peaks per size, most jobs running at once,
  p50/p99 latency, throughput, and the highest usage sampled against the limit.
- ``--mode plain``: the same stream straight into PyTorch under the same guard and limit, for
  contrast: how many requests die with ``OutOfMemoryError`` when nothing admits them.

Results are ``RESULT {json}`` lines (checklib); a summary goes to stderr. The run keeps to a
deadline (``--budget``, 75 s): the stream is shortened to fit, admission waits and joins have
timeouts, and a watchdog reports FAIL and exits if the deadline passes anyway.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

START = time.monotonic()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checklib  # noqa: E402
from checklib import GIB, emit, mib  # noqa: E402

CHECKS = {
    "sidecar": ("inference (sidecar): OOM errors reaching clients",
                "inference (sidecar): usage stayed within the limit"),
    "plain": ("inference (plain): OOM errors reaching clients (contrast)",),
}
# The request mix: size name, sequence length, target peak as a fraction of the limit, weight.
MIX = (("xs", 128, 0.05, 0.40), ("s", 256, 0.12, 0.30), ("m", 512, 0.22, 0.18), ("l", 1024, 0.40, 0.12))
MODEL_FRACTION = 0.12   # weights as a fraction of the limit
QUEUE_TIMEOUT_S = 10.0  # jobs run for tens of ms: a wait this long means something is stuck
OOM_RETRIES = 6         # with backoff 0.25 s doubling to 1 s: ~5 s of waits at most per request
BACKOFF_S = 0.25
TAIL_S = 6.0            # kept after the stream for requests in flight and the report
MIN_COMPLETED = 20
SAMPLE_S = 0.02

_report_lock = threading.Lock()
_reported: set = set()


def report(check: str, ok: bool, figure: str = "", target: str = "", detail: str = "", **values) -> None:
    with _report_lock:
        if check not in _reported:
            _reported.add(check)
            emit(check, ok, figure, target, detail, **values)


def fail_rest(mode: str, detail: str) -> None:
    """FAIL every check of ``mode`` not reported yet."""
    for check in CHECKS[mode]:
        report(check, False, detail=detail)


def start_watchdog(mode: str, at: float) -> None:
    def fire() -> None:
        fail_rest(mode, f"did not finish within its {at - START:.0f} s budget (watchdog)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(max(0.0, at - time.monotonic()), fire)
    timer.daemon = True
    timer.start()


@dataclass
class Bucket:
    name: str
    seq: int
    batch: int
    weight: float
    peak: int = 0  # measured alone: max_memory_allocated above the idle allocation

    def params(self) -> Dict[str, int]:
        return {"batch": self.batch, "seq": self.seq}


def job_key(name: str) -> str:
    return f"gpu-check-llm-forward-{name}"


class Tally:
    """What the clients saw, shared by all client threads."""

    def __init__(self, buckets: List[Bucket]) -> None:
        self.lock = threading.Lock()
        self.completed = {b.name: 0 for b in buckets}
        self.latencies: List[float] = []
        self.oom = self.queue_timeouts = self.refused = self.other = 0
        self.other_samples: List[str] = []
        self.retries = self.inner_ooms = 0
        self.active = self.max_active = 0

    def enter(self) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def leave(self) -> None:
        with self.lock:
            self.active -= 1

    def done(self, bucket: Bucket, latency: float) -> None:
        with self.lock:
            self.completed[bucket.name] += 1
            self.latencies.append(latency)

    def add(self, name: str, n: int = 1, exc: Optional[BaseException] = None) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)
            if name == "other" and exc is not None and len(self.other_samples) < 3:
                self.other_samples.append(f"{type(exc).__name__}: {str(exc)[:200]}")


class UsageSampler(threading.Thread):
    """Highest usage seen: the guard's view (mem_get_info), the sidecar's, PyTorch's reserve."""

    def __init__(self, torch, rt=None) -> None:
        super().__init__(name="usage-sampler", daemon=True)
        self.torch, self.rt = torch, rt
        self.halt = threading.Event()
        self.max_guard = self.max_sidecar = self.max_torch = self.max_running = self.samples = 0
        self.total_seen = 0
        self.last_error = ""

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                free, total = self.torch.cuda.mem_get_info()
                self.total_seen = total
                self.max_guard = max(self.max_guard, total - free)
                self.max_torch = max(self.max_torch, self.torch.cuda.memory_reserved())
                if self.rt is not None:
                    stats = self.rt.stats()
                    self.max_sidecar = max(self.max_sidecar, int(stats["live"]))
                    self.max_running = max(self.max_running, int(stats["running"]))
                self.samples += 1
            except Exception as exc:  # noqa: BLE001 - a failed sample is reported, not fatal
                self.last_error = repr(exc)
            self.halt.wait(SAMPLE_S)


def guard_used(torch) -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def build_model(torch, transformers, limit: int):
    """A Llama-style LM whose bf16 weights take ~MODEL_FRACTION of the limit, on the GPU."""
    vocab = 32000 if limit >= 2 * GIB else 8192
    hidden, inter, heads = 1024, 2816, 16
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = int(min(24, max(2, (MODEL_FRACTION * limit / 2 - fixed) // per_layer)))
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=False, use_cache=False)
    dtype = torch.bfloat16
    auto = transformers.AutoModelForCausalLM
    with torch.device("cuda"):  # initialise on the GPU: no slow CPU init, no copy
        try:
            model = auto.from_config(cfg, dtype=dtype)  # transformers 5
        except TypeError:
            model = auto.from_config(cfg, torch_dtype=dtype)  # transformers 4
    model = model.to(device="cuda", dtype=dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, cfg, weights


def make_forward(torch, model, vocab: int) -> Callable[[int, int], int]:
    def forward(batch: int, seq: int) -> int:
        with torch.inference_mode():
            ids = torch.randint(0, vocab, (batch, seq), device="cuda")
            logits = model(input_ids=ids, use_cache=False).logits
            # .item() waits for the GPU, so the request's memory and time fall inside the job.
            return int(logits[:, -1].argmax(-1).sum().item())
    return forward


def measure_peak(torch, forward, batch: int, seq: int) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward(batch, seq)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def plan_buckets(torch, forward, limit: int, room: int) -> List[Bucket]:
    """Batch sizes that give each size its target peak, measured alone (not guessed)."""
    probe = max(1, measure_peak(torch, forward, 2, 256)) / (2 * 256)
    # If the context, weights and workspaces leave less room than planned, shrink the mix.
    scale = min(1.0, 0.6 * room / (MIX[-1][2] * limit))
    buckets = []
    for name, seq, fraction, weight in MIX:
        target = fraction * scale * limit
        batch, peak = max(1, round(target / probe / seq)), 0
        for attempt in range(4):
            try:
                peak = measure_peak(torch, forward, batch, seq)
            except torch.cuda.OutOfMemoryError:
                batch, peak = max(1, batch // 2), 0
                continue
            new = max(1, round(batch * target / max(peak, 1)))
            if attempt == 3 or abs(new - batch) <= max(1, batch // 8):
                break
            batch = new
        if peak == 0:
            raise RuntimeError(f"size {name} (seq {seq}) ran out of memory even at batch {batch}")
        buckets.append(Bucket(name, seq, batch, weight, peak))
    torch.cuda.empty_cache()
    return buckets


def percentile(values: List[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


class Stream:
    """What the client threads share: the go signal, the stop time, the sizes, the server."""

    def __init__(self, clients: int) -> None:
        self.go = threading.Event()
        self.warm = [threading.Event() for _ in range(clients)]
        self.warm_errors: List[str] = []
        self.stop_at = 0.0
        self.buckets: List[Bucket] = []
        self.serve: Optional[Callable[[Bucket], int]] = None
        self.tally: Optional[Tally] = None


def client(index: int, seed: int, stream: Stream, forward, classify, torch, wait_s: float) -> None:
    try:
        forward(1, 16)  # this thread's cuBLAS handle and workspace now, not inside a job
    except Exception as exc:  # noqa: BLE001
        stream.warm_errors.append(repr(exc))
    finally:
        stream.warm[index].set()
    if not stream.go.wait(wait_s) or stream.serve is None:
        return
    rng = random.Random(seed * 1000 + index)
    weights = [b.weight for b in stream.buckets]
    while time.monotonic() < stream.stop_at:
        bucket = rng.choices(stream.buckets, weights)[0]
        begun = time.monotonic()
        try:
            stream.serve(bucket)
        except Exception as exc:  # noqa: BLE001 - every error a client sees is counted
            kind = classify(exc)
            if kind == "oom":
                torch.cuda.empty_cache()
            stream.tally.add(kind, exc=exc)
        else:
            stream.tally.done(bucket, time.monotonic() - begun)


def sidecar_server(torch, vramslice, rt, forward, tally: Tally) -> Callable[[Bucket], int]:
    def attempt(*, bucket: str, batch: int, seq: int, attempts: List[int]) -> int:
        attempts[0] += 1
        tally.enter()
        try:
            return forward(batch, seq)
        except BaseException as exc:
            if vramslice.is_out_of_memory(exc):
                tally.add("inner_ooms")
            raise
        finally:
            tally.leave()

    guarded = vramslice.guarded(
        key=lambda **p: job_key(p["bucket"]),
        params=lambda **p: {"batch": p["batch"], "seq": p["seq"]},
        runtime=rt,
    )(attempt)

    def serve(b: Bucket) -> int:
        attempts = [0]
        try:
            return guarded(bucket=b.name, batch=b.batch, seq=b.seq, attempts=attempts)
        finally:
            tally.add("retries", max(0, attempts[0] - 1))
            # The guard's account (the sidecar's usage source) counts PyTorch's cached blocks as
            # used. A request that ran alone had them emptied by guarded's `settle` after its
            # final reading and before the next request was admitted, so that one's growth is
            # measured from a settled start. One that ran beside others skipped that (nothing is
            # learned then); emptied here too, live usage is again the weights plus what running
            # requests hold, so later admissions do not wait on dead cache. (On an OOM, guarded's
            # cleanup also empties the cache before the retry.)
            torch.cuda.empty_cache()

    return serve


def plain_server(forward, tally: Tally) -> Callable[[Bucket], int]:
    def serve(b: Bucket) -> int:
        tally.enter()
        try:
            return forward(b.batch, b.seq)
        finally:
            tally.leave()
    return serve


def run(args) -> int:
    mode = args.mode
    deadline = START + args.budget
    try:
        import torch
        import transformers
    except Exception as exc:  # noqa: BLE001
        fail_rest(mode, f"cannot import torch/transformers: {exc!r}")
        return 0
    if not torch.cuda.is_available():
        fail_rest(mode, f"CUDA is not available to PyTorch {torch.__version__}")
        return 0
    vramslice = None
    if mode == "sidecar":
        try:
            import vramslice
        except Exception as exc:  # noqa: BLE001
            fail_rest(mode, f"cannot import vramslice: {exc!r}")
            return 0
    try:
        transformers.logging.set_verbosity_error()
    except AttributeError:
        pass
    limit = checklib.env_int("VRAMSLICE_VRAM_LIMIT_BYTES")
    torch.manual_seed(args.seed)
    torch.cuda.init()
    context_used = guard_used(torch)
    model, cfg, weights = build_model(torch, transformers, limit)
    forward = make_forward(torch, model, cfg.vocab_size)
    forward(1, 16)

    def classify(exc: BaseException) -> str:
        if vramslice is not None and isinstance(exc, vramslice.QueueTimeout):
            return "queue_timeouts"
        if vramslice is not None and isinstance(exc, vramslice.Refused):
            return "refused"
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() or (
                vramslice is not None and vramslice.is_out_of_memory(exc)):
            return "oom"
        return "other"

    stream = Stream(args.clients)
    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True,
                                args=(i, args.seed, stream, forward, classify, torch,
                                      max(1.0, deadline - time.monotonic())))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for ev in stream.warm:
        ev.wait(max(0.1, min(20.0, deadline - time.monotonic())))
    if stream.warm_errors or not all(ev.is_set() for ev in stream.warm):
        raise RuntimeError(f"client warm-up failed or hung: {stream.warm_errors[:2]}")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    idle_used = guard_used(torch)
    buckets = plan_buckets(torch, forward, limit, limit - idle_used)
    idle_used = guard_used(torch)
    print(f"[inference] limit {mib(limit)}, context {mib(context_used)}, model {mib(weights)} "
          f"({cfg.num_hidden_layers} layers), idle usage {mib(idle_used)}; sizes: "
          + ", ".join(f"{b.name} {b.batch}x{b.seq} peak {mib(b.peak)} ({b.peak / limit:.0%})" for b in buckets),
          file=sys.stderr, flush=True)

    tally = Tally(buckets)
    rt = None
    if mode == "sidecar":
        usage = "accounting" if os.environ.get("VRAMSLICE_ACCOUNTING_DIR") else "auto"
        rt = vramslice.configure(limit=limit, usage=usage, queue_timeout=QUEUE_TIMEOUT_S,
                                 oom_retries=OOM_RETRIES, backoff=BACKOFF_S)
        stream.serve = sidecar_server(torch, vramslice, rt, forward, tally)
    else:
        stream.serve = plain_server(forward, tally)
    stream.buckets, stream.tally = buckets, tally
    sampler = UsageSampler(torch, rt)
    sampler.start()
    seconds = max(3.0, min(float(args.seconds), deadline - time.monotonic() - TAIL_S))
    began = time.monotonic()
    stream.stop_at = began + seconds
    stream.go.set()
    for t in threads:
        t.join(max(0.1, deadline - 2.0 - time.monotonic()))
    elapsed = time.monotonic() - began
    sampler.halt.set()
    sampler.join(1.0)
    unfinished = sum(t.is_alive() for t in threads)

    with tally.lock:
        completed = sum(tally.completed.values())
        errors = tally.oom + tally.queue_timeouts + tally.refused + tally.other
        lat = list(tally.latencies)
        counts = dict(tally.completed)
    total = completed + errors
    rate = completed / elapsed if elapsed > 0 else 0.0
    p50, p99 = percentile(lat, 0.50) * 1000, percentile(lat, 0.99) * 1000
    sizes = []
    for b in buckets:
        learned = rt.learned_peak(job_key(b.name), b.params()) if rt is not None else None
        sizes.append({"size": b.name, "batch": b.batch, "seq": b.seq, "weight": b.weight,
                      "measured_peak_bytes": b.peak, "measured_peak_fraction": round(b.peak / limit, 3),
                      "learned_peak_bytes": learned, "completed": counts[b.name]})
    values = dict(
        mode=mode, limit_bytes=limit, clients=args.clients, seed=args.seed, seconds_requested=args.seconds,
        seconds_streamed=round(elapsed, 2), context_bytes=context_used, model_bytes=weights,
        model_layers=cfg.num_hidden_layers, idle_usage_bytes=idle_used, sizes=sizes, requests=total,
        completed=completed, oom_errors_to_clients=tally.oom, queue_timeouts=tally.queue_timeouts,
        refused=tally.refused, other_errors=tally.other, other_error_samples=tally.other_samples,
        retries=tally.retries, ooms_inside_jobs=tally.inner_ooms, max_concurrent_jobs=tally.max_active,
        latency_p50_ms=round(p50, 1), latency_p99_ms=round(p99, 1), throughput_rps=round(rate, 2),
        max_usage_guard_bytes=sampler.max_guard, max_usage_sidecar_bytes=sampler.max_sidecar,
        max_torch_reserved_bytes=sampler.max_torch, mem_get_info_total_bytes=sampler.total_seen,
        usage_samples=sampler.samples, sampler_error=sampler.last_error, unfinished_clients=unfinished)
    sizes_text = "; ".join(
        f"{s['size']} {s['batch']}x{s['seq']}: peak {mib(s['measured_peak_bytes'])}"
        + (f", learned {mib(s['learned_peak_bytes'])}" if s["learned_peak_bytes"] else "")
        + f", {s['completed']} done" for s in sizes)
    setting = (f"limit {mib(limit)}, model {mib(weights)}, idle usage {mib(idle_used)}; {args.clients} clients "
               f"for {elapsed:.0f} s; sizes (batch x seq): {sizes_text}; most jobs at once {tally.max_active}; "
               f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    if unfinished:
        setting += f"; {unfinished} clients still busy at the deadline"
    others = f"{tally.queue_timeouts} queue timeouts, {tally.refused} refused, {tally.other} other errors"
    if tally.other_samples:
        others += f" (e.g. {tally.other_samples[0]})"

    if mode == "sidecar":
        missing = [b.name for b in buckets if counts[b.name] == 0]
        # Errors other than OOM reach clients too: a refusal or another error never should here
        # (no request declares a need; the model works unguarded), and a queue timeout means a
        # wait of QUEUE_TIMEOUT_S behind jobs of tens of ms, a stall, allowed for 1 in 100.
        stalls_allowed = total // 100
        ok = (tally.oom == 0 and completed >= MIN_COMPLETED and not missing and tally.refused == 0
              and tally.other == 0 and tally.queue_timeouts <= stalls_allowed)
        why = []
        if tally.oom:
            why.append(f"{tally.oom} OOM errors reached clients after {OOM_RETRIES} retries")
        if tally.refused or tally.other:
            why.append(f"{tally.refused} refusals and {tally.other} other errors reached clients")
        if tally.queue_timeouts > stalls_allowed:
            why.append(f"{tally.queue_timeouts} requests timed out in the queue (at most {stalls_allowed})")
        if completed < MIN_COMPLETED:
            why.append(f"only {completed} requests completed")
        if missing:
            why.append(f"sizes never completed: {', '.join(missing)}")
        figure = f"{tally.oom} OOMs / {total} requests, {tally.retries} retries, {rate:.1f} req/s"
        if errors > tally.oom:
            figure += f", {errors - tally.oom} other errors"
        report(CHECKS[mode][0], ok, figure,
               f"0 OOM errors reach clients, nor refusals or other errors, queue timeouts <= 1%; "
               f">= {MIN_COMPLETED} requests and every size completed",
               ("; ".join(why) + ". " if why else "") + setting
               + f"; {tally.inner_ooms} OOMs inside jobs absorbed by retries; {others}; usage source {rt.usage_kind}",
               **values)
        # mem_get_info is the guard's own answer (total - free <= limit by construction); PyTorch's
        # reserved memory is what its allocator really got from the driver, which exceeds the
        # limit only if the guard let allocations through uncounted.
        highest = max(sampler.max_guard, sampler.max_sidecar, sampler.max_torch)
        report(CHECKS[mode][1], 0 < highest <= limit,
               f"{mib(highest)} of {mib(limit)} ({highest / limit:.0%})",
               "highest sampled usage (guard, sidecar, PyTorch reserved) <= limit",
               f"{sampler.samples} samples every {SAMPLE_S * 1000:.0f} ms: guard's mem_get_info "
               f"{mib(sampler.max_guard)}, sidecar live {mib(sampler.max_sidecar)}, PyTorch reserved "
               f"{mib(sampler.max_torch)}" + (f"; sampler error {sampler.last_error}" if sampler.last_error else ""),
               **{k: v for k, v in values.items() if k.startswith(("max_", "limit", "usage", "mem_", "sampler"))})
    else:
        contended = ("more than 0 shows what the sidecar prevents" if tally.oom else
                     "0: the stream did not contend for memory here, so this run shows nothing the sidecar prevents")
        report(CHECKS[mode][0], total > 0, f"{tally.oom} OOMs / {total} requests",
               "contrast, not a target: it ran and counted",
               f"{contended}; {completed} completed, {rate:.1f} req/s; {setting}; {others}", **values)

    print(f"[inference] {mode}: {total} requests in {elapsed:.1f} s, {completed} completed ({rate:.1f} req/s), "
          f"{tally.oom} OOMs reached clients, {others}, {tally.retries} retries, max {tally.max_active} at once, "
          f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, highest usage {mib(max(sampler.max_guard, sampler.max_sidecar))} "
          f"of {mib(limit)}\n[inference] {sizes_text}", file=sys.stderr, flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(CHECKS), required=True)
    parser.add_argument("--seconds", type=float, default=60.0, help="stream length (shortened to fit --budget)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=75.0, help="seconds for the whole program")
    args = parser.parse_args(argv)
    start_watchdog(args.mode, START + args.budget)
    try:
        return run(args)
    except (Exception, SystemExit):  # env_int exits on a missing limit: report it too
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        fail_rest(args.mode, "unexpected error: " + " | ".join(text.strip().splitlines()[-4:]))
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() for t in threading.enumerate() if t.name.startswith("client-")):
        os._exit(code)  # a client stuck in CUDA must not hold up the interpreter's exit
    sys.exit(code)
