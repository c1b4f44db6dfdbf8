"""Flask inference service in the gunicorn style: several worker processes, one GPU, one
profile directory. Each worker loads its model copy lazily through vramslice (a job with a
declared need) and runs every request through @vramslice.guarded, whose need is learned per
batch size and shared by all workers through VRAMSLICE_PROFILE_DIR.

VRAMSLICE_DEMO_ADMISSION=0 turns vramslice off, to show what happens without it: workers load
duplicate models past the limit and requests die with out-of-memory errors."""

import fcntl
import os
import tempfile
import threading
import time

from flask import Flask, jsonify, request

import vramslice
from simdevice import OutOfMemoryError, SimDevice, mirror_usage

MIB = 1 << 20
LIMIT = int(os.environ.get("VRAMSLICE_VRAM_LIMIT_BYTES", str(1024 * MIB)))
MODEL_BYTES = int(os.environ.get("DEMO_MODEL_BYTES", str(300 * MIB)))
PER_ITEM_BYTES = int(os.environ.get("DEMO_PER_ITEM_BYTES", str(16 * MIB)))
LOAD_RETRY_SECONDS = 5.0
ADMISSION = os.environ.get("VRAMSLICE_DEMO_ADMISSION", "1") != "0"
PROFILE_DIR = os.environ.setdefault("VRAMSLICE_PROFILE_DIR", os.path.join(tempfile.gettempdir(), "vramslice-profiles"))
os.makedirs(PROFILE_DIR, exist_ok=True)

# Created at import, i.e. in the gunicorn master (preload_app), so every worker shares it.
DEVICE = SimDevice(LIMIT)

app = Flask(__name__)
_state = {"model": None, "runtime": None}
_lock = threading.Lock()


def runtime():
    """This worker's vramslice runtime (created after the fork: it owns threads)."""
    with _lock:
        if _state["runtime"] is None:
            rt = vramslice.configure(usage="manual", limit=LIMIT, queue_timeout=float(os.environ.get("DEMO_QUEUE_TIMEOUT", "2")))
            mirror_usage(DEVICE, rt)
            _state["runtime"] = rt
        return _state["runtime"]


class ModelNotLoaded(Exception):
    """This worker holds no model copy and could not load one now."""


def load_model():
    with _lock:
        if _state["model"] is not None:
            return _state["model"]
        if time.monotonic() < _state.get("retry_load_at", 0.0):
            raise ModelNotLoaded(_state["load_error"])
    if not ADMISSION:
        block = DEVICE.alloc(MODEL_BYTES)
    else:
        # One load at a time across workers (a lock file in the shared profile directory), so
        # each load's admission sees the copies other workers already loaded in live usage.
        # Admitted only when the weights fit below the high-water mark; otherwise this worker
        # gives up quickly, answers 503, and tries again later instead of pushing the GPU over.
        with open(os.path.join(PROFILE_DIR, "model-load.lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ModelNotLoaded("another worker is loading its model copy") from None
            load = vramslice.guarded(key="toy-model-load", need=MODEL_BYTES, runtime=runtime(),
                                     cleanup=None, timeout=0.2)
            try:
                block = load(lambda: DEVICE.alloc(MODEL_BYTES))()
            except (vramslice.QueueTimeout, vramslice.Refused) as e:
                with _lock:
                    _state["retry_load_at"] = time.monotonic() + LOAD_RETRY_SECONDS
                    _state["load_error"] = f"model not loaded on this worker: {e}"
                raise ModelNotLoaded(_state["load_error"]) from None
            runtime().set_usage(DEVICE.used())
    with _lock:
        _state["model"] = block
    return block


def forward(batch: int) -> float:
    with DEVICE.alloc(batch * PER_ITEM_BYTES):
        return float(sum(i * 0.5 for i in range(batch * 1000)))


def guarded_forward():
    return vramslice.guarded(
        key="toy-model-forward",
        params=lambda **p: {"batch": p["batch"]},
        runtime=runtime(),
        cleanup=None,
    )(lambda *, batch: forward(batch))


@app.post("/infer")
def infer():
    body = request.get_json(silent=True) or {}
    batch = body.get("batch")
    if not isinstance(batch, int) or not 1 <= batch <= 64:
        return jsonify(error="batch must be an integer between 1 and 64", kind="bad-request"), 400
    try:
        load_model()
        out = guarded_forward()(batch=batch) if ADMISSION else forward(batch)
    except (vramslice.QueueTimeout, vramslice.Refused, ModelNotLoaded) as e:
        return jsonify(error=str(e), kind="busy", pid=os.getpid()), 503
    except OutOfMemoryError as e:
        return jsonify(error=str(e), kind="out-of-memory", pid=os.getpid()), 507
    return jsonify(result=out, pid=os.getpid())


@app.get("/stats")
def stats():
    return jsonify(pid=os.getpid(), model_loaded=_state["model"] is not None,
                   device_used=DEVICE.used(), device_peak=DEVICE.peak(), limit=LIMIT)


@app.get("/metrics")
def metrics():
    return runtime().render_metrics(), 200, {"Content-Type": vramslice.METRICS_CONTENT_TYPE}
