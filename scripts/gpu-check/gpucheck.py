"""The vramslice GPU check: one command that proves the pieces on a real GPU (or, with
--dry-run, on the fake CUDA driver and fake NVML library, so the check itself cannot rot).

    python3 gpucheck.py --bundle .gpu-check --out "$OUT" [--dry-run]

The bundle (built by `scripts/gpu-check.sh --build`) holds the binaries; nothing is built or
fetched here. Every check program runs as a child process with a timeout; results go to
$OUT/gpu-check.json and $OUT/gpu-check.txt after every program (partial results survive a kill),
and every child's output to $OUT/gpu-check.log. Exits 1 when a check failed (or, on a real run,
did not run), 0 otherwise. Nothing here changes the GPU's settings: it only reads NVML, allocates
memory and runs kernels.

Groups: (1) device plugin with backend nvml against a test kubelet; (2) the guard at a 4 GiB
limit, at the driver API (ctypes; also in the dry run) and under PyTorch; (3) an inference loop
through the Python sidecar, and without it; (4) a vLLM-like start sized from cudaMemGetInfo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from checklib import (  # noqa: E402
    FAIL, GIB, MIB, NOT_RUN, PASS, figure, match_process, mib, readline_within, result,
)

LIMIT = 4 * GIB
INFERENCE_LIMIT = 3 * GIB
RESOURCE = "vramslice.io/vram-gib"
FAKE_UUID = "GPU-0f0f0f0f-1111-4222-8333-444444444444"
FAKE_TOTAL = 143771 * MIB  # what an H200 reports
HOLDER_BYTES = 1 * GIB
INIT_WAIT_S = 60  # how long a child may take to initialise CUDA and answer
CUDA_ERROR_OUT_OF_MEMORY = 2
# Recorded as found: what decides how PyTorch and the CUDA runtime behave in the children.
ENV_RECORDED = ("CUDA_MODULE_LOADING", "CUDA_VISIBLE_DEVICES", "PYTORCH_NVML_BASED_CUDA_CHECK",
                "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
REAL_USAGE_CHECK = "guard vs driver: a filled slice's real usage (NVML) within the limit"

TORCH_CHECKS = {
    "limits": [f"torch [{label}]: {what}" for label in ("default", "expandable_segments", "cudaMallocAsync")
               for what in ("the allocator asked for is the one in force",
                            "mem_get_info shows the slice", "40% of the limit allocates and works",
                            "past the limit raises OutOfMemoryError", "growing stops within the limit",
                            "empty_cache returns memory to the slice")],
    "graphs": ["torch graphs: capture + replay correct under the guard",
               "torch graphs: graph memory nodes count against the limit",
               "torch graphs: a graph past the slice fails its replay, the process goes on"],
    "share": ["torch: two processes share one account"],
    "throughput": ["torch: matmul fp16 8192^3 throughput with vs without the guard",
                   "torch: memory-bandwidth copy throughput with vs without the guard"],
    "vllm": ["vLLM-like start (torch): sizes to the slice, not the card"],
}
INFERENCE_CHECKS = {
    "sidecar": ["inference (sidecar): OOM errors reaching clients", "inference (sidecar): usage stayed within the limit"],
    "plain": ["inference (plain): OOM errors reaching clients (contrast)"],
}
ALLOC_CONFS = {"default": "", "expandable_segments": "expandable_segments:True",
               "cudaMallocAsync": "backend:cudaMallocAsync"}


class Run:
    """The results so far and where they are written."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget_s: float,
                 groups: Optional[List[str]] = None) -> None:
        self.out, self.work, self.dry_run = out, work, dry_run
        self.groups = groups or list(report.GROUPS)
        self.deadline = time.monotonic() + budget_s
        self.records: List[dict] = []
        self.environment: Dict[str, object] = {}
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu-check.log", "w", encoding="utf-8")

    def add(self, group: str, record: dict) -> None:
        self.records.append(dict(record, group=group))
        self.flush()

    def check(self, group: str, name: str, ok: bool, figure: str = "", target: str = "", detail: str = "",
              **values) -> bool:
        self.add(group, result(name, PASS if ok else FAIL, figure, target, detail, **values))
        return ok

    def not_run(self, group: str, names: List[str], why: str) -> None:
        for name in names:
            self.add(group, result(name, NOT_RUN, detail=why))

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def flush(self) -> None:
        verdict = report.overall(self.records, self.dry_run)
        doc = report.document(self.records, verdict, self.environment, self.dry_run, self.groups)
        tmp = self.out / "gpu-check.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(self.out / "gpu-check.json")
        (self.out / "gpu-check.txt").write_text(report.render_table(self.records, verdict, self.groups))

    def note(self, text: str) -> None:
        self.log.write(text if text.endswith("\n") else text + "\n")
        self.log.flush()

    def program(self, group: str, argv: List[str], env: Dict[str, str], timeout: float,
                expected: List[str]) -> List[dict]:
        """Run a check program; record its results and how it ended."""
        name = " ".join(Path(a).name if i == 1 else a for i, a in enumerate(argv[1:4], 1))
        timeout = min(timeout, max(self.left_s(), 1))
        if self.left_s() < 5:
            self.not_run(group, expected, "the check's time budget ran out before this program")
            return []
        started = time.monotonic()
        self.note(f"\n===== {name} (timeout {timeout:.0f} s)")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        self.note(stdout + "\n--- stderr\n" + stderr + f"\n--- exit {proc.returncode} after "
                  f"{time.monotonic() - started:.1f} s")
        records, problems = report.parse_results(stdout, group)
        for r in records:
            self.records.append(r)
        for r in report.program_outcome(group, name, records, problems, proc.returncode, timed_out, expected):
            self.records.append(r)
        self.unwrapped_entry_points(group, name, stderr)
        self.flush()
        return records

    def unwrapped_entry_points(self, group: str, name: str, stderr: str) -> None:
        """A FAIL when a guarded process's stderr names a driver entry point the guard was handed
        and could not wrap: what goes through one is not counted, so that process's checks could
        pass for the wrong reason."""
        unknown = sorted({line.strip() for line in stderr.splitlines() if UNKNOWN_ENTRY_POINT in line})
        if unknown:
            self.check(group, f"{name}: every driver entry point the runtime asked for is wrapped", False,
                       "; ".join(unknown)[:600], "none the guard does not know")


# What the guard says of a cuGetProcAddress answer it cannot wrap (crates/vramslice-guard,
# ffi/resolve.rs).
UNKNOWN_ENTRY_POINT = "returned an entry point the guard does not know"


def base_env(bundle: Path, drivers: Dict[str, str]) -> Dict[str, str]:
    """The children's environment: no guard, the bundle's Python package, the drivers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMSLICE_") and k != "LD_PRELOAD"}
    # torch >= 2.8 reads PYTORCH_ALLOC_CONF before PYTORCH_CUDA_ALLOC_CONF: one set by the image
    # would override the allocator variants the checks select (recorded in the environment).
    env.pop("PYTORCH_ALLOC_CONF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(bundle / "python"), str(HERE)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(drivers)
    env["RUST_BACKTRACE"] = "0"  # the binaries' errors name the problem; a backtrace would bury it
    return env


def fake_drivers(bundle: Path, work: Path) -> Dict[str, str]:
    """Dry run: the fake libcuda and a copy of the fake libnvidia-ml scripted by a state file."""
    nvml_dir = work / "fake-nvml"
    nvml_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundle / "fake-nvml" / "libnvidia-ml.so.1", nvml_dir / "libnvidia-ml.so.1")
    write_fake_nvml(work, [])
    dirs = [str(bundle / "fake"), str(nvml_dir)]
    if os.environ.get("LD_LIBRARY_PATH"):
        dirs.append(os.environ["LD_LIBRARY_PATH"])
    return {"LD_LIBRARY_PATH": os.pathsep.join(dirs), "FAKE_CUDA_DEVICE_BYTES": str(FAKE_TOTAL)}


def write_fake_nvml(work: Path, processes: List[Tuple[int, int]]) -> None:
    """Script the fake NVML: GPU 0 with these (pid, used bytes) compute processes. With
    GPUCHECK_FAKE_HOST_PID_OFFSET (scripts/check-gpu-check.sh) it lists them under PIDs moved by
    that much, as NVML does from another PID namespace (a gVisor sandbox)."""
    offset = int(os.environ.get("GPUCHECK_FAKE_HOST_PID_OFFSET", "0"))
    lines = [f"gpu 0 {FAKE_UUID} {FAKE_TOTAL} {FAKE_TOTAL - 600 * MIB - sum(used for _, used in processes)} "
             "NVIDIA H200 (fake NVML)"]
    lines += [f"proc 0 compute {pid + offset} {used}" for pid, used in processes]
    state = work / "fake-nvml" / "fake-nvml-state"
    tmp = state.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(state)


def nvml_read(bundle: Path, env: Dict[str, str]) -> dict:
    """One NVML reading of every GPU (`vramslice-gpu-check nvml`, unguarded); raises on failure."""
    out = subprocess.run([str(bundle / "bin" / "vramslice-gpu-check"), "nvml"], env=env, capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"vramslice-gpu-check nvml: exit {out.returncode}: {out.stderr[-300:]}")
    return json.loads(out.stdout)


def processes_of(reading: dict) -> List[dict]:
    """Every GPU's compute processes in one NVML reading."""
    return [p for gpu in reading.get("gpus", []) for p in gpu.get("processes", [])]


def free_of(reading: dict) -> int:
    return sum(gpu["free_bytes"] for gpu in reading.get("gpus", []))


def note_pid_namespace(run: "Run", how: str) -> None:
    """Record once that NVML's PIDs are another namespace's (processes were matched by size)."""
    if how == "size":
        run.environment["nvml_pid_namespace"] = ("another (the host's): NVML did not list our PIDs; processes "
                                                 "were matched by their memory use")


def fake_used(counts: Path) -> int:
    """Dry run: device 0's bytes in use as the fake CUDA driver counted them (FAKE_CUDA_SHARED_FILE:
    an array of int64 counters, device 0's first), i.e. what the fake driver really handed out."""
    try:
        return int.from_bytes(counts.read_bytes()[:8], "little", signed=True)
    except OSError:
        return 0


def start_child(argv: List[str], env: Dict[str, str], stderr_path: Path) -> Tuple[subprocess.Popen, Optional[str]]:
    """A helper child that prints one line when it is ready; (process, that line or None when it
    did not answer within INIT_WAIT_S, in which case it has been killed). Its stderr goes to
    `stderr_path` (see `child_stderr`)."""
    with open(stderr_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    line = readline_within(proc.stdout, INIT_WAIT_S)
    if line is None:
        proc.kill()
        proc.wait()
    return proc, line


# One NVML client open for the whole run: without persistence mode (recorded, never set) the
# driver may tear the GPU's state down whenever its last client closes and set it up again for
# the next, and the run starts some thirty CUDA processes one after another.
KEEPALIVE = ("import ctypes, sys\n"
             "nvml = ctypes.CDLL('libnvidia-ml.so.1')\n"
             "print('nvml rc=%d' % nvml.nvmlInit_v2(), flush=True)\n"
             "sys.stdin.read()\n"
             "nvml.nvmlShutdown()\n")
_HELD: List[subprocess.Popen] = []


def child_stderr(run: "Run", stderr_path: Path) -> str:
    """What a `start_child` child wrote to stderr, copied into the run's log."""
    try:
        text = stderr_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        text = f"(its stderr could not be read: {e})"
    run.note(f"--- stderr of the child ({stderr_path.name})\n{text}")
    return text


def keep_driver_loaded(env: Dict[str, str]) -> str:
    """Start the NVML client that stays open until the run ends (released by `main`); what it
    said, for the environment record. It creates no CUDA context and allocates nothing."""
    try:
        proc = subprocess.Popen([sys.executable, "-c", KEEPALIVE], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError as e:
        return f"not started: {e}"
    _HELD.append(proc)
    line = wait_line(proc, 15)
    return line or f"no answer in 15 s (exit {proc.poll()})"


def wait_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` prints within `timeout` seconds ('' when none)."""
    if not proc.stdout:
        return ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def release(proc: subprocess.Popen) -> None:
    """Close a holding child's stdin (it exits) and reap it; killed after 30 s."""
    try:
        if proc.stdin:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def context_size(run: "Run", bundle: Path, env: Dict[str, str]) -> Dict[str, object]:
    """The real size of a plain CUDA context: NVML's free memory before and while a plain process
    holds only its primary context (and that process's own usedGpuMemory)."""
    child_env = dict(env)
    counts = run.work / "fake-cuda-context.counts"
    if run.dry_run:
        write_fake_nvml(run.work, [])
        child_env["FAKE_CUDA_SHARED_FILE"] = str(counts)
    before = nvml_read(bundle, env)
    stderr_path = run.work / "context.stderr"
    proc, line = start_child([sys.executable, str(HERE / "guard_driver.py"), "context"], child_env, stderr_path)
    try:
        if line is None or line.strip() != "ready":
            return {"error": f"CUDA init did not answer within {INIT_WAIT_S} s" if line is None
                    else f"the plain process answered {line.strip()[:200]!r}"}
        if run.dry_run:
            write_fake_nvml(run.work, [(proc.pid, fake_used(counts))])
        after = nvml_read(bundle, env)
    finally:
        release(proc)
        child_stderr(run, stderr_path)
        if run.dry_run:
            write_fake_nvml(run.work, [])
    drop = free_of(before) - free_of(after)
    entry, how, note = match_process(processes_of(after), proc.pid, drop)
    note_pid_namespace(run, how)
    return {"nvml_free_drop_bytes": drop, "nvml_free_drop_mib": round(drop / MIB),
            "process_used_bytes": entry["used_bytes"] if entry else None, "matched_by": how,
            **({"note": note} if note else {})}


def real_usage(run: "Run", bundle: Path, env: Dict[str, str], guarded: Dict[str, str], limit: int) -> None:
    """The guard's view against the driver's: a guarded child fills its slice until the guard
    refuses, then holds; NVML (read here, unguarded) gives its real usedGpuMemory, context and
    all. Also measures a plain context's real size for the environment."""
    g = "guard"
    if run.left_s() < 30:
        run.not_run(g, [REAL_USAGE_CHECK], "the check's time budget ran out before this check")
        return
    run.note("\n===== guard vs driver: real usage of a filled slice")
    try:
        run.environment["cuda_context"] = context_size(run, bundle, env)
    except Exception as e:  # noqa: BLE001 - recorded; the check below still runs
        run.environment["cuda_context"] = {"error": f"{type(e).__name__}: {e}"}
    run.note(f"plain CUDA context: {json.dumps(run.environment['cuda_context'])}")
    acct = run.work / "accounting-real-usage"
    acct.mkdir(exist_ok=True)
    fill_env = dict(guarded, VRAMSLICE_ACCOUNTING_DIR=str(acct))
    counts = run.work / "fake-cuda-fill.counts"
    if run.dry_run:
        fill_env["FAKE_CUDA_SHARED_FILE"] = str(counts)
    stderr_path = run.work / "fill.stderr"
    proc = None
    try:
        proc, line = start_child([sys.executable, str(HERE / "guard_driver.py"), "fill", str(2 * limit)],
                                 fill_env, stderr_path)
        if line is None:
            run.check(g, REAL_USAGE_CHECK, False, "no answer", f"<= {mib(limit)}",
                      detail=f"CUDA init did not answer within {INIT_WAIT_S} s (the child was killed)")
            return
        run.note(f"guarded child: {line.strip()}")
        try:
            facts = json.loads(line)
            held = int(facts["held_bytes"])
        except (ValueError, KeyError, TypeError):
            run.check(g, REAL_USAGE_CHECK, False, "the guarded child failed", f"<= {mib(limit)}",
                      detail=line.strip()[:300] or "no output (see the log)")
            return
        if run.dry_run:
            write_fake_nvml(run.work, [(proc.pid, fake_used(counts))])
        reading = nvml_read(bundle, env)
        entry, how, note = match_process(processes_of(reading), proc.pid, held)
        note_pid_namespace(run, how)
        context = run.environment["cuda_context"].get("nvml_free_drop_bytes")
        if entry is None:
            run.check(g, REAL_USAGE_CHECK, False, f"pid {proc.pid}: not listed by NVML", f"<= {mib(limit)}",
                      detail=note, own_pid=proc.pid, guard_held_bytes=held)
            return
        used = entry["used_bytes"]
        if used is None:
            run.check(g, REAL_USAGE_CHECK, False, f"pid {entry['pid']}: NVML gives no memory figure",
                      f"<= {mib(limit)}", detail=note or "NVML_VALUE_NOT_AVAILABLE (MIG or a virtualised GPU?)",
                      own_pid=proc.pid, guard_held_bytes=held)
            return
        over = (used - limit) / MIB
        refused = facts.get("last_rc") == CUDA_ERROR_OUT_OF_MEMORY
        detail = "; ".join(x for x in (
            note,
            f"the guard refused (rc {facts.get('last_rc')}) with {mib(held)} allocated; its cuMemGetInfo: free "
            f"{mib(facts.get('guard_free', 0))} of {mib(facts.get('guard_total', 0))}",
            "" if refused else "the guard never refused: the child stopped at twice the limit",
            f"a plain context takes {mib(context)} (NVML)" if isinstance(context, int) else "") if x)
        run.check(g, REAL_USAGE_CHECK, refused and used <= limit,
                  f"NVML {mib(used)} (pid {entry['pid']}{', by size' if how == 'size' else ''}) vs limit "
                  f"{mib(limit)}: {f'{over:.0f} MiB over' if over > 0 else f'{-over:.0f} MiB under'}",
                  "real usage <= limit", detail=detail,
                  real_used_bytes=used, limit_bytes=limit, overshoot_mib=max(over, 0.0), margin_mib=-over,
                  guard_held_bytes=held, guard_free_bytes=facts.get("guard_free"), last_rc=facts.get("last_rc"),
                  matched_by=how, own_pid=proc.pid, nvml_pid=entry["pid"], context_bytes=context)
    except Exception as e:  # noqa: BLE001 - any failure is a reported FAIL, never a silent pass
        run.check(g, REAL_USAGE_CHECK, False, detail=f"{type(e).__name__}: {e}"[:300])
    finally:
        if proc is not None:
            release(proc)
            run.unwrapped_entry_points(g, "guard_driver.py fill", child_stderr(run, stderr_path))
        if run.dry_run:
            write_fake_nvml(run.work, [])


def smi_query(fields: str) -> str:
    """`nvidia-smi --query-gpu=FIELDS` as text (an error is recorded, never raised); reads only."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {e}"
    return out.stdout.strip() if out.returncode == 0 else f"error: exit {out.returncode}: {out.stderr.strip()[-200:]}"


def wait_json(path: Path, ready, timeout: float) -> Optional[dict]:
    """Poll a JSON file until `ready(doc)`; the last document read (or None)."""
    end, doc = time.monotonic() + timeout, None
    while time.monotonic() < end:
        try:
            doc = json.loads(path.read_text())
            if ready(doc):
                return doc
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    return doc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str, uuid: str) -> Optional[float]:
    m = re.search(rf'^{name}{{[^}}]*gpu="{re.escape(uuid)}"[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def log_events(path: Path) -> List[dict]:
    """The `fields` of each JSON log line the plugin wrote (other lines are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            fields = json.loads(line).get("fields")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(fields, dict):
            events.append(fields)
    return events


def stop(proc: subprocess.Popen, timeout: float = 10) -> Optional[int]:
    """SIGTERM, then SIGKILL after `timeout`; the exit status (None when it had to be killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def device_plugin(run: Run, bundle: Path, env: Dict[str, str]) -> Optional[dict]:
    """Group 1. Returns the Allocate answer (envs, mounts) for the guard groups, or None."""
    g = "plugin"
    work = run.work / "plugin"
    sockets, accounting = work / "device-plugins", work / "accounting"
    for d in (sockets, accounting):
        d.mkdir(parents=True, exist_ok=True)
    kubelet_report = work / "kubelet.json"
    guard = bundle / "lib" / "libvramslice_guard.so"
    config = work / "plugin.yaml"
    config.write_text(
        "backend: nvml\n"
        f"socketDir: {sockets}\n"
        f"podResourcesSocket: {work / 'pod-resources.sock'}\n"
        f"accountingRoot: {accounting}\n"
        "metricsAddr: 127.0.0.1:0\n"
        "pollInterval: 500ms\n"
        "unit: 1Gi\n"
        f"injection:\n  guardLibraryHostPath: {guard}\n")
    holder = subprocess.Popen([sys.executable, str(HERE / "guard_driver.py"), "hold", str(HOLDER_BYTES)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = readline_within(holder.stdout, INIT_WAIT_S) if holder.stdout else ""
    if line is None:
        holder.kill()
        run.check(g, "a plain process holds 1 GiB on the GPU (no guard)", False, "no answer", "ready rc=0",
                  detail=f"CUDA init did not answer within {INIT_WAIT_S} s (the holder was killed)")
    else:
        ready = line.strip()
        run.check(g, "a plain process holds 1 GiB on the GPU (no guard)", ready == "ready rc=0",
                  ready or "no answer", "ready rc=0")
    if run.dry_run:
        write_fake_nvml(run.work, [(holder.pid, HOLDER_BYTES)])
    plugin_env = {k: v for k, v in env.items() if k not in ("KUBERNETES_SERVICE_HOST", "NODE_NAME")}
    kubelet = subprocess.Popen([str(bundle / "bin" / "vramslice-gpu-check"), "kubelet", "--socket-dir", str(sockets),
                                "--pod-resources-socket", str(work / "pod-resources.sock"), "--report",
                                str(kubelet_report), "--allocate", str(LIMIT // GIB)],
                               env=env, stdout=run.log, stderr=run.log)
    time.sleep(0.3)
    plugin_log = work / "plugin.log"
    started = time.monotonic()
    with open(plugin_log, "w") as log:
        plugin = subprocess.Popen([str(bundle / "bin" / "vramslice-device-plugin"), "--config", str(config),
                                   "--no-publish", "--log-format", "json"], env=plugin_env, stdout=log,
                                  stderr=subprocess.STDOUT)
    allocation = None
    try:
        seen = wait_json(kubelet_report, lambda d: d.get("lists", 0) >= 1 and d.get("allocate"), 30) or {}
        regs = seen.get("registrations", [])
        ok = bool(regs) and regs[0]["resource_name"] == RESOURCE and regs[0].get("options") is not None
        run.check(g, "plugin registers with the test kubelet and is dialled back", ok,
                  f"{len(regs)} registration(s), first list after {seen.get('first_list_ms') or 0:.0f} ms",
                  f"{RESOURCE}, options answered", detail="" if ok else json.dumps(regs)[:300])
        try:
            reading = nvml_read(bundle, env)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            reading = {"gpus": [], "health_events": {}}
            run.check(g, "NVML reading", False, detail=str(e)[-300:])
        run.environment["gpus"] = [{k: v for k, v in gpu.items() if k != "processes"} for gpu in reading["gpus"]]
        advertised = seen.get("gpus", {})
        for gpu in reading["gpus"]:
            want = gpu["total_bytes"] // GIB
            got = advertised.get(gpu["uuid"], {})
            foreign = seen.get("unparsed_ids", [])
            run.check(g, f"units per GPU from real memory (GPU {gpu['index']})",
                      got.get("units") == want and got.get("healthy") == want and not foreign,
                      f"{got.get('units')} units ({got.get('healthy')} healthy) from {mib(gpu['total_bytes'])}",
                      f"floor(total / 1 GiB) = {want}",
                      detail=f"IDs that are not vramslice units: {foreign[:5]}" if foreign else "")
        names_ok = bool(reading["gpus"]) and {g_["uuid"] for g_ in reading["gpus"]} == set(advertised) and all(
            g_["model"] and g_["uuid"].startswith("GPU-") for g_ in reading["gpus"])
        run.check(g, "UUID and model", names_ok,
                  ", ".join(f"{g_['model']} {g_['uuid']}" for g_ in reading["gpus"]) or "no GPU read",
                  "advertised UUIDs = NVML's")
        listed = processes_of(reading)
        mine, how, note = match_process(listed, holder.pid, HOLDER_BYTES)
        nvml_pid = mine["pid"] if mine else None
        note_pid_namespace(run, how)
        run.check(g, "per-process usage (NVML)", mine is not None and (mine["used_bytes"] or 0) >= HOLDER_BYTES,
                  f"pid {nvml_pid}{' (matched by size)' if how == 'size' else ''}: {figure(mine['used_bytes'])}"
                  if mine else f"pid {holder.pid}: not listed", ">= 1024 MiB", detail=note, matched_by=how,
                  own_pid=holder.pid, nvml_pid=nvml_pid, nvml_pids=[p["pid"] for p in listed])
        subscribed = reading.get("health_events", {})
        run.check(g, "health events subscribed (critical XID, double-bit ECC)",
                  bool(subscribed) and all(subscribed.values()),
                  ", ".join(f"{u[:12]}…: {'yes' if v else 'no'}" for u, v in subscribed.items()) or "none",
                  "every GPU")
        time.sleep(1.5)  # two polls, so the plugin has read the holder
        events = log_events(plugin_log)
        # The plugin logs NVML's PID: the holder's own, or (another PID namespace) the one matched by size.
        look_for = nvml_pid if nvml_pid is not None else holder.pid
        stray = [e for e in events if "belongs to no pod" in e.get("message", "") and e.get("pid") == look_for]
        run.check(g, "plugin sees the process outside any pod", bool(stray),
                  f"watchdog: pid {look_for}{' (matched by size)' if how == 'size' else ''}, "
                  f"{mib(stray[0].get('used', 0))}" if stray else "not in the plugin log",
                  "logged with its usage", detail=note, matched_by=how, own_pid=holder.pid, nvml_pid=nvml_pid)
        addr = next((e["addr"] for e in events if e.get("message", "").startswith("serving /metrics") and "addr" in e),
                    None)
        metrics = ""
        if addr:
            try:
                metrics = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
            except OSError as e:
                metrics = f"error: {e}"
        for gpu in reading["gpus"]:
            used = metric(metrics, "vramslice_gpu_used_bytes", gpu["uuid"])
            close = used is not None and abs(used - gpu["used_bytes"]) <= 512 * MIB
            run.check(g, f"used memory in /metrics (GPU {gpu['index']})", close,
                      f"{mib(used) if used is not None else 'absent'} vs NVML {mib(gpu['used_bytes'])}",
                      "within 512 MiB of NVML", detail="" if metrics else "no /metrics address in the plugin log")
        allocation = seen.get("allocate") or None
        envs = (allocation or {}).get("envs", {})
        limit_file = next((m["host_path"] for m in (allocation or {}).get("mounts", [])
                           if m["container_path"] == envs.get("VRAMSLICE_LIMIT_FILE")), None)
        run.check(g, f"Allocate {LIMIT // GIB} units: limit env and limit file",
                  envs.get("VRAMSLICE_VRAM_LIMIT_BYTES") == str(LIMIT) and limit_file is not None
                  and Path(limit_file).exists(),
                  f"VRAMSLICE_VRAM_LIMIT_BYTES={envs.get('VRAMSLICE_VRAM_LIMIT_BYTES')}, limit file "
                  f"{'written' if limit_file and Path(limit_file).exists() else 'missing'}", f"{LIMIT}",
                  detail=(allocation or {}).get("error") or "")
        idle_s = 3.0 if run.dry_run else 10.0
        settle = max(0.0, 2.0 - (time.monotonic() - started))
        time.sleep(settle)
        cpu0, t0 = cpu_seconds(plugin.pid), time.monotonic()
        time.sleep(idle_s)
        cpu = (cpu_seconds(plugin.pid) - cpu0) / (time.monotonic() - t0) * 100
        rss = rss_mib(plugin.pid)
        run.check(g, "plugin idle CPU and RSS", cpu <= 2.0 and rss <= 64,
                  f"{cpu:.2f}% of a core, {rss:.1f} MiB RSS over {idle_s:.0f} s", "<= 2% CPU, <= 64 MiB",
                  cpu_percent=cpu, rss_mib=rss)
        if any("GPU health events unavailable" in e.get("message", "") for e in log_events(plugin_log)):
            run.check(g, "plugin log: health events", False, detail="the plugin logged 'GPU health events unavailable'")
    finally:
        code = stop(plugin)
        run.check(g, "plugin exits cleanly on SIGTERM", code == 0, f"exit {code}", "exit 0 within 10 s")
        stop(kubelet)
        release(holder)
        run.note("===== device plugin log\n" + plugin_log.read_text()[-20000:])
    return allocation


def unbroken(run: Run, group: str, what: str, step, *args):
    """`step(*args)`; an exception (something the real hardware answers that no fake did) is a
    FAIL of its group, recorded with its text, and the run goes on to the next group."""
    try:
        return step(*args)
    except Exception as e:  # noqa: BLE001 - one group's surprise must not end the whole run
        run.note(f"===== {what}: {type(e).__name__}: {e}")
        run.check(group, f"{what} ran to the end", False, f"{type(e).__name__}: {e}", "no exception")
        return None


def guard_env(bundle: Path, allocation: Optional[dict], accounting: Path) -> Dict[str, str]:
    """The guard's environment as the Allocate answer gives it to a container (its VRAMSLICE_*
    variables, container paths replaced by the mounts' host paths: the check runs outside a
    container), with the bundle's guard preloaded. Without an allocation (its check failed), a
    4 GiB limit and `accounting`, so the guard groups still run."""
    env = {"VRAMSLICE_VRAM_LIMIT_BYTES": str(LIMIT), "VRAMSLICE_ACCOUNTING_DIR": str(accounting)}
    if allocation and not allocation.get("error"):
        hosts = {m["container_path"]: m["host_path"] for m in allocation.get("mounts", [])}
        env = {k: hosts.get(v, v) for k, v in allocation.get("envs", {}).items() if k.startswith("VRAMSLICE_")}
    env["LD_PRELOAD"] = str(bundle / "lib" / "libvramslice_guard.so")
    return env


def torch_state(env: Dict[str, str]) -> Optional[str]:
    """None when torch with CUDA imports in a child; otherwise why not."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch, transformers; "
                              "print(torch.__version__, transformers.__version__, torch.cuda.is_available())"],
                             env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "importing torch took over 120 s"
    if out.returncode != 0:
        return "torch/transformers not importable: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    if not out.stdout.strip().endswith("True"):
        return f"torch {out.stdout.strip()}: CUDA is not available"
    return None


def compile_only(run: Run, group: str, files: List[str]) -> None:
    """Dry run: the programs that need torch must at least compile."""
    for name in files:
        out = subprocess.run([sys.executable, "-m", "py_compile", str(HERE / name)], capture_output=True, text=True)
        run.check(group, f"{name} compiles (py_compile)", out.returncode == 0, detail=out.stderr[-300:])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, help="seconds for everything (default 450, dry run 170)")
    ap.add_argument("--only", metavar="GROUPS",
                    help=f"run only these groups (comma-separated: {', '.join(report.GROUPS)}), e.g. to rerun "
                         "what failed in the device time left; the summary says the run was partial")
    args = ap.parse_args(argv)
    try:
        args.groups = report.parse_groups(args.only)
    except ValueError as e:
        ap.error(f"--only: {e}")
    bundle = args.bundle.resolve()
    for need in ("bin/vramslice-device-plugin", "bin/vramslice-gpu-check", "lib/libvramslice_guard.so",
                 "python/vramslice/__init__.py"):
        if not (bundle / need).exists():
            sys.exit(f"the bundle {bundle} has no {need}: build it with scripts/gpu-check.sh --build")
    # Outside $OUT: sockets and scratch files must not be among what comes back.
    if args.work:
        work = args.work.resolve()
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="vramslice-gpu-check-"))
    try:
        return checks(args, bundle, work)
    finally:
        for proc in _HELD:
            release(proc)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def checks(args: argparse.Namespace, bundle: Path, work: Path) -> int:
    """Every group in order; the exit status."""
    run = Run(args.out.resolve(), work, args.dry_run, args.budget or (170 if args.dry_run else 450), args.groups)
    want = set(args.groups)
    manifest = bundle / "manifest.json"
    run.environment.update({"python": sys.version.split()[0], "platform": platform.platform(),
                            "kernel": os.uname().release,  # gVisor reports its own (e.g. 4.4.0)
                            "libc": " ".join(platform.libc_ver()), "cpus": os.cpu_count(),
                            "env": {name: os.environ.get(name) for name in ENV_RECORDED},
                            "bundle": json.loads(manifest.read_text()) if manifest.exists() else None})
    drivers = fake_drivers(bundle, work) if args.dry_run else {}
    env = base_env(bundle, drivers)
    run.environment["nvml_keepalive"] = keep_driver_loaded(env)
    if args.dry_run:
        run.environment["nvidia_smi_state"] = "dry run: not queried"
    elif shutil.which("nvidia-smi"):
        run.environment["nvidia_smi"] = smi_query("name,uuid,memory.total,memory.used,driver_version")
        run.environment["nvidia_smi_state"] = smi_query("persistence_mode,clocks.sm,power.draw")
    else:
        run.environment["nvidia_smi_state"] = "nvidia-smi not found"
    py = sys.executable

    # Without the plugin group the guard checks run at the default 4 GiB limit (guard_env).
    allocation = None
    if "plugin" in want:
        allocation = unbroken(run, "plugin", "device plugin checks", device_plugin, run, bundle, env)

    g = "guard"
    acct = work / "accounting"
    acct.mkdir()
    genv = guard_env(bundle, allocation, acct)
    limit = genv.get("VRAMSLICE_VRAM_LIMIT_BYTES", str(LIMIT))  # what the checks hold the guard to
    guarded = dict(env, **genv, GPUCHECK_LIMIT_BYTES=limit)
    fresh = dict(genv, VRAMSLICE_ACCOUNTING_DIR=str(work / "accounting-latency"))
    (work / "accounting-latency").mkdir()
    plain = dict(env, GPUCHECK_LIMIT_BYTES=limit, GPUCHECK_GUARD_ENV=json.dumps(fresh))
    drv = str(HERE / "guard_driver.py")
    if g in want:
        run.program(g, [py, drv, "limits"], guarded, 60, [
            "driver: cuMemGetInfo total is the slice", "driver: allocation within the limit succeeds",
            "driver: allocation past the limit is refused", "nvml: memory info shows the slice"])
        run.program(g, [py, drv, "graphs"], guarded, 60, [
            "driver graphs: a memory node within the slice launches",
            "driver graphs: the graph pool's memory counts against the limit",
            "driver graphs: a memory node past the slice is refused at launch",
            "driver graphs: cuDeviceGraphMemTrim returns the memory to the slice"])
        run.program(g, [py, drv, "vmm"], guarded, 60, [
            "driver vmm: a released handle's memory stays while mapped (plain driver)",
            "driver vmm: cuMemRelease right after cuMemMap keeps the memory charged",
            "driver vmm: cuMemUnmap gives the memory back"])
        run.program(g, [py, drv, "legacy"], guarded, 60,
                    ["driver: the v1 ABI (cuMemAlloc, 32-bit pointers) is held to the limit"])
        run.program(g, [py, drv, "share"], guarded, 60, ["two processes, one account: the other's memory is counted"])
        unbroken(run, g, "guard vs driver checks", real_usage, run, bundle, env, guarded, int(limit))
        run.program(g, [py, drv, "latency"], plain, 120, ["driver: alloc/free latency added by the guard"])
    if "vllm" in want:
        run.program("vllm", [py, drv, "vllm"], guarded, 60,
                    ["vLLM-like start (driver): sizes to the slice, not the card"])
    if not want & {g, "vllm", "infer"}:
        return finish(run, args.dry_run)

    why = "dry run: the fake CUDA driver cannot run PyTorch" if args.dry_run else torch_state(env)
    run.environment["torch"] = why or "importable, CUDA available"
    torch_py = str(HERE / "guard_torch.py")
    if why:
        for mode, names in TORCH_CHECKS.items():
            group = "vllm" if mode == "vllm" else g
            if group in want:
                run.not_run(group, names, why)
        if "infer" in want:
            run.not_run("infer", [n for names in INFERENCE_CHECKS.values() for n in names], why)
        if args.dry_run:
            compile_only(run, g, ["guard_torch.py", "inference.py"])
        return finish(run, args.dry_run)
    if g in want:
        for label, conf in ALLOC_CONFS.items():
            run.program(g, [py, torch_py, "limits", label], dict(guarded, PYTORCH_CUDA_ALLOC_CONF=conf), 90,
                        [n for n in TORCH_CHECKS["limits"] if f"[{label}]" in n])
        run.program(g, [py, torch_py, "graphs"], dict(guarded, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync"),
                    90, TORCH_CHECKS["graphs"])
        run.program(g, [py, torch_py, "share"], guarded, 90, TORCH_CHECKS["share"])
        run.program(g, [py, torch_py, "throughput"], plain, 150, TORCH_CHECKS["throughput"])
    if "vllm" in want:
        run.program("vllm", [py, torch_py, "vllm"], guarded, 90, TORCH_CHECKS["vllm"])
    if "infer" in want:
        for mode, names in INFERENCE_CHECKS.items():
            acct_i = work / f"accounting-inference-{mode}"
            profiles = work / f"profiles-{mode}"
            acct_i.mkdir()
            profiles.mkdir()
            ienv = dict(env, LD_PRELOAD=genv["LD_PRELOAD"], VRAMSLICE_VRAM_LIMIT_BYTES=str(INFERENCE_LIMIT),
                        VRAMSLICE_ACCOUNTING_DIR=str(acct_i), VRAMSLICE_PROFILE_DIR=str(profiles))
            # Its own deadline inside what the run has left, so that it reports (its watchdog
            # fails what it could not finish) before the run's timeout kills it unheard.
            budget = max(10.0, min(75.0, run.left_s() - 10))
            run.program("infer", [py, str(HERE / "inference.py"), "--mode", mode, "--seconds", "45",
                                  "--budget", f"{budget:.0f}"], ienv, budget + 35, names)

    return finish(run, args.dry_run)


def finish(run: Run, dry_run: bool) -> int:
    """Write and print the results; the exit status."""
    verdict = report.overall(run.records, dry_run)
    run.flush()
    sys.stdout.write(report.render_table(run.records, verdict, run.groups))
    print(f"\nresults: {run.out / 'gpu-check.json'}, logs: {run.out / 'gpu-check.log'}")
    return 0 if verdict == PASS else 1


if __name__ == "__main__":
    sys.exit(main())
