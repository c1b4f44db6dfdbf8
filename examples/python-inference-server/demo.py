"""Start the Flask app under gunicorn (4 workers, one simulated 1 GiB GPU, one profile
directory) with and without vramslice, send the same load, and print what clients saw.
Loopback only; bounded in requests and time.

    python demo.py [--requests 300] [--clients 16]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run(admission: bool, args) -> dict:
    port = free_port()
    profiles = tempfile.mkdtemp(prefix="vramslice-demo-")
    env = dict(os.environ, DEMO_BIND=f"127.0.0.1:{port}", DEMO_WORKERS=str(args.workers),
               VRAMSLICE_DEMO_ADMISSION="1" if admission else "0", VRAMSLICE_PROFILE_DIR=profiles)
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                              cwd=HERE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                call(base + "/stats", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.1)
        outcomes = {"ok": 0, "out-of-memory": 0, "busy-final": 0, "busy-retried": 0, "other": 0}
        latencies = []

        def one(i):
            t = time.monotonic()
            for attempt in range(args.busy_retries + 1):
                status, body = call(base + "/infer", {"batch": [1, 2, 4, 8, 16][i % 5]})
                if status == 503 and attempt < args.busy_retries:
                    outcomes["busy-retried"] += 1
                    time.sleep(0.01)
                    continue
                break
            latencies.append(time.monotonic() - t)
            key = {200: "ok", 507: "out-of-memory", 503: "busy-final"}.get(status, "other")
            outcomes[key] += 1

        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        elapsed = time.monotonic() - started
        # Ask every worker for its state (a few calls land on each).
        workers = {}
        for _ in range(args.workers * 20):
            _, s = call(base + "/stats")
            workers[s["pid"]] = s
        latencies.sort()
        return {
            "mode": "vramslice" if admission else "no vramslice",
            **outcomes,
            "models_loaded": sum(1 for w in workers.values() if w["model_loaded"]),
            "workers_seen": len(workers),
            "device_peak_mib": max(w["device_peak"] for w in workers.values()) / 2**20,
            "limit_mib": next(iter(workers.values()))["limit"] / 2**20,
            "throughput_rps": round(args.requests / elapsed, 1),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        }
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(profiles, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--busy-retries", type=int, default=20, help="client retries of a 503 (as a load balancer would)")
    args = p.parse_args()
    for admission in (True, False):
        print(json.dumps(run(admission, args)))


if __name__ == "__main__":
    main()
