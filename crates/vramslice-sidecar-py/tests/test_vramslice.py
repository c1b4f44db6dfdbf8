"""Tests of the vramslice Python package (native module + wrapper), no GPU needed: the runtime
is given usage="manual" and the tests play the device by calling set_usage."""

import asyncio
import contextvars
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest

import vramslice

GIB = 1 << 30


def make(tmp_path=None, **kw):
    opts = dict(limit="10Gi", usage="manual", sample_interval=0.002)
    if tmp_path is not None:
        opts["profile_dir"] = str(tmp_path)
    opts.update(kw)
    return vramslice.Runtime(**opts)


def wait_until(what, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def test_an_explicit_limit_only_lowers_the_containers(monkeypatch):
    # The container's limit (here from the environment, as the device plugin sets it) is what
    # the guard enforces: a larger explicit limit must not admit more than that.
    monkeypatch.setenv("VRAMSLICE_VRAM_LIMIT_BYTES", str(GIB))
    rt = make(limit="4Gi", queue_timeout=3600)
    with pytest.raises(vramslice.Refused, match=r"needs 2\.0 GiB, limit 1\.0 GiB"):
        with vramslice.job("big", need="2Gi", runtime=rt):
            pass
    lower = make(limit="512Mi", queue_timeout=3600)
    with pytest.raises(vramslice.Refused, match=r"limit 512\.0 MiB"):
        with vramslice.job("big", need="1Gi", runtime=lower):
            pass


def test_never_fits_is_refused_at_once():
    rt = make(limit="4Gi", queue_timeout=3600)
    with pytest.raises(vramslice.Refused, match=r"needs 6\.0 GiB, limit 4\.0 GiB"):
        with vramslice.job("llama-70b", need="6Gi", runtime=rt):
            pass
    assert issubclass(vramslice.Refused, vramslice.VramsliceError)


def test_job_reserves_and_returns_memory():
    rt = make()
    with vramslice.job("whisper", need="2Gi", runtime=rt) as j:
        assert j.reserved == 2 * GIB
        assert rt.stats()["running"] == 1
        assert rt.stats()["reserved"] == 2 * GIB
    assert rt.stats()["running"] == 0


def test_first_run_then_learned_peak(tmp_path):
    rt = make(tmp_path)
    with vramslice.job("whisper", params={"batch": 8}, runtime=rt) as j:
        assert j.permit.source == "first-run"
        assert j.reserved == 8 * GIB
        rt.set_usage(3 * GIB)
        wait_until("peak sampled", lambda: rt.stats()["live"] == 3 * GIB)
    rt.set_usage(0)
    assert rt.learned_peak("whisper", {"batch": 8}) == 3 * GIB
    with vramslice.job("whisper", params={"batch": 8}, runtime=rt) as j:
        assert j.permit.source == "profile"
        assert 3 * GIB < j.reserved <= int(3 * GIB * 1.2) + 1
    # persisted under the documented, language-independent name
    name = vramslice.profile_file_name("whisper", {"batch": 8})
    record = json.loads((tmp_path / name).read_text())
    assert record == {"version": 1, "key": "whisper", "params": {"batch": "8"}, "peak_bytes": 3 * GIB}


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def test_profile_hash_is_the_documented_one():
    canonical = b"vramslice-profile-v1\n7:whisper\n5:batch\n1:8\n3:seq\n3:448\n"
    expected = f"{fnv1a64(canonical):016x}.json"
    assert vramslice.profile_file_name("whisper", {"seq": 448, "batch": 8}) == expected


def test_oom_in_a_with_block_raises_the_peak_and_propagates():
    rt = make()
    with pytest.raises(RuntimeError, match="out of memory"):
        with vramslice.job("m", need="1Gi", runtime=rt):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert rt.learned_peak("m") > GIB
    assert "vramslice_sidecar_oom_errors_total 1" in rt.render_metrics()
    # other errors record nothing
    with pytest.raises(ValueError):
        with vramslice.job("n", need="1Gi", runtime=rt):
            raise ValueError("bad input")
    assert rt.learned_peak("n") is None


def test_guarded_retries_with_cleanup_and_backoff():
    rt = make(backoff=0.01, oom_retries=3)
    calls, cleanups, starts = [], [], []

    @vramslice.guarded(
        key=lambda **p: f"llm-{p['size']}",
        need="1Gi",
        params=lambda **p: {"ctx": p["ctx"]},
        cleanup=lambda: cleanups.append(1),
        runtime=rt,
    )
    def generate(prompt, *, size, ctx):
        starts.append(time.monotonic())
        calls.append(rt.stats()["reserved"])
        if len(calls) < 3:
            raise RuntimeError("CUDA_ERROR_OUT_OF_MEMORY")
        return prompt.upper()

    assert generate("hi", size="7b", ctx=4096) == "HI"
    assert len(calls) == 3 and len(cleanups) == 2
    assert calls[0] == GIB and calls[2] > calls[1] > calls[0]
    assert starts[1] - starts[0] >= 0.01 and starts[2] - starts[1] >= 0.02
    assert rt.learned_peak("llm-7b", {"ctx": 4096}) is not None
    text = rt.render_metrics()
    assert "vramslice_sidecar_retries_total 2" in text
    assert "vramslice_sidecar_oom_errors_total 2" in text


def test_guarded_gives_up_and_does_not_retry_other_errors():
    rt = make(backoff=0.001, oom_retries=1)
    attempts = []

    @vramslice.guarded(key="m", need="1Gi", runtime=rt, cleanup=None)
    def always_oom():
        attempts.append(1)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        always_oom()
    assert len(attempts) == 2

    @vramslice.guarded(key="m", need="1Gi", runtime=rt)
    def bad():
        attempts.append(2)
        raise KeyError("x")

    with pytest.raises(KeyError):
        bad()
    assert attempts.count(2) == 1


def test_async_job_and_async_guarded():
    rt = make(backoff=0.001)

    @vramslice.guarded(key="a", need="1Gi", runtime=rt, cleanup=None)
    async def infer(x):
        infer.calls += 1
        if infer.calls == 1:
            raise RuntimeError("CUDA out of memory")
        await asyncio.sleep(0)
        return x * 2

    infer.calls = 0

    async def main():
        async with vramslice.job("b", need="2Gi", runtime=rt) as j:
            assert j.reserved == 2 * GIB
            assert rt.stats()["running"] == 1
        return await infer(21)

    assert asyncio.run(main()) == 42
    assert infer.calls == 2
    assert rt.stats()["running"] == 0


def test_a_cancelled_async_job_gives_up_its_place_in_line():
    # Regression: the wait ran on in its thread after the task was cancelled, holding the head
    # of the FIFO line until its timeout (5 s here, so a regression fails rather than hangs).
    rt = make(queue_timeout=5)
    held = rt.admit("a", "7Gi")

    async def main():
        async def waiter():
            async with vramslice.job("b", need="5Gi", runtime=rt):
                pass

        task = asyncio.create_task(waiter())
        await asyncio.to_thread(wait_until, "b queued", lambda: rt.stats()["queued"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_until, "b gone", lambda: rt.stats()["queued"] == 0, 2.0)
        # A job that fits beside the held one is admitted at once, not stuck behind b.
        async with vramslice.job("c", need="1Gi", runtime=rt, timeout=1.0) as c:
            return c.reserved

    assert asyncio.run(main()) == GIB
    held.release()
    assert rt.stats()["running"] == 0


def test_cancel_flag_raises_cancelled_error_from_a_blocking_admit():
    rt = make(queue_timeout=3600)
    held = rt.admit("a", "7Gi")
    cancel = vramslice._native.Cancel()
    threading.Timer(0.05, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError, match="gave up waiting"):
        rt.admit("b", "5Gi", cancel=cancel)
    assert time.monotonic() - started < 2.0 and cancel.is_set()
    assert rt.stats()["queued"] == 0
    held.release()


def test_one_job_object_is_not_entered_twice_at_once():
    rt = make()
    shared = vramslice.job("a", need="1Gi", runtime=rt)
    with shared:
        with pytest.raises(RuntimeError, match="already entered"):
            with shared:
                pass
        assert rt.stats()["running"] == 1
    assert rt.stats()["running"] == 0
    with shared:  # once it has exited it may be entered again
        assert shared.reserved == GIB
    with pytest.raises(vramslice.Refused):
        with vramslice.job("huge", need="100Gi", runtime=rt):
            pass
    refused_then_ok = vramslice.job("b", need="100Gi", runtime=rt)
    with pytest.raises(vramslice.Refused):
        with refused_then_ok:
            pass
    refused_then_ok.need = "1Gi"
    with refused_then_ok:  # a failed admission releases the claim
        pass


def test_keywords_out_of_range_are_refused_like_the_environment():
    for kw, name in [({"peak_margin": 0.0}, "peak_margin"), ({"high_water": 0.0}, "high_water"),
                     ({"queue_timeout": 2 * 86400}, "queue_timeout")]:
        with pytest.raises(vramslice.ConfigError, match=f"Python keyword {name}"):
            make(**kw)


def test_params_are_written_as_rust_writes_them():
    # A profile learned from Python and one learned from Rust or C must share a key.
    name = vramslice.profile_file_name
    assert name("m", {"fast": True, "temp": 1.0}) == name("m", {"fast": "true", "temp": "1"})
    assert name("m", {"temp": 0.5, "batch": 8}) == name("m", {"temp": "0.5", "batch": "8"})
    assert name("m", {"fast": False}) != name("m", {"fast": "False"})


def test_waiters_do_not_hold_the_gil_and_admit_in_order():
    rt = make()
    first = rt.admit("a", "5Gi")
    order = []

    def worker(i):
        p = rt.admit(f"j{i}", "5Gi")
        order.append(i)
        p.release()

    threads = []
    for i in range(3):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        wait_until("queued", lambda: rt.stats()["queued"] == i + 1)
    first.complete()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2]


def test_queue_timeout():
    rt = make(limit="4Gi", queue_timeout=0.05)
    held = rt.admit("a", "3Gi")
    with pytest.raises(vramslice.QueueTimeout, match=r"needs 2\.0 GiB, .* free, 0 jobs queued"):
        rt.admit("b", "2Gi")
    patient = make(limit="4Gi", queue_timeout=3600)
    held_too = patient.admit("a", "3Gi")
    with pytest.raises(vramslice.QueueTimeout):  # the job's own timeout wins
        with vramslice.job("c", need="2Gi", runtime=patient, timeout=0.01):
            pass
    held_too.release()
    held.release()
    assert not held.active


def test_memory_freed_by_another_process_admits():
    rt = make()
    rt.set_usage(9 * GIB)  # another worker holds 9 GiB
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("p", rt.admit("w", "2Gi")))
    t.start()
    wait_until("queued", lambda: rt.stats()["queued"] == 1)
    rt.set_usage(GIB)
    t.join(10)
    assert result["p"].reserved == 2 * GIB


def test_profiles_shared_by_worker_processes(tmp_path):
    script = textwrap.dedent(
        """
        import sys, vramslice
        rt = vramslice.Runtime(limit="10Gi", usage="manual", profile_dir=sys.argv[1])
        seed = int(sys.argv[2])
        for i in range(40):
            p = rt.admit("model", "1Gi", {"batch": i % 2})
            rt.set_usage(((seed * 7919 + i * 104729) % 997 + 1) << 20)
            p.complete()
            rt.set_usage(0)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(seed)])
        for seed in range(4)
    ]
    for p in procs:
        assert p.wait(60) == 0
    for batch in (0, 1):
        expected = max(
            ((seed * 7919 + i * 104729) % 997 + 1) << 20
            for seed in range(4)
            for i in range(40)
            if i % 2 == batch
        )
        rt = make(tmp_path)
        assert rt.learned_peak("model", {"batch": batch}) == expected
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match='usage="gpu"'):
        vramslice.Runtime(limit="1Gi", usage="gpu")
    with pytest.raises(ValueError, match="not a quantity"):
        vramslice.Runtime(limit="lots", usage="manual")
    with pytest.raises(vramslice.ConfigError, match="accounting"):
        vramslice.Runtime(limit="1Gi", usage="accounting")
    assert vramslice.parse_bytes("1.5Gi") == 3 * GIB // 2


def test_configure_sets_the_process_runtime():
    rt = vramslice.configure(limit="2Gi", usage="manual")
    assert vramslice.runtime() is rt
    with vramslice.job("m", need="1Gi") as j:
        assert j.reserved == GIB
    assert "vramslice_sidecar_limit_bytes 2147483648" in rt.render_metrics()


def test_cleanup_runs_after_the_failed_attempts_frames_are_gone():
    # Regression: cleanup ran inside the `except` block, while the exception's traceback still
    # held the failed attempt's frame and its tensors, so it could free nothing.
    rt = make(backoff=0.001, oom_retries=1)
    freed, seen = [], []

    class Tensor:
        def __del__(self):
            freed.append(1)

    @vramslice.guarded(key="t", need="1Gi", runtime=rt, cleanup=lambda: seen.append(len(freed)))
    def step():
        activations = Tensor()  # noqa: F841 - held by the frame until it is gone
        if not seen:
            raise RuntimeError("CUDA out of memory")
        return "ok"

    assert step() == "ok"
    assert seen == [1]


def test_cleanup_after_the_last_attempt_frees_what_its_frames_held():
    # Regression: when the retries were spent, cleanup ran while the propagating error's
    # traceback still held the failed call's frames and their tensors.
    rt = make(backoff=0.001, oom_retries=1)
    freed, seen = [], []

    class Tensor:
        def __del__(self):
            freed.append(1)

    def load(batch):
        weights = Tensor()  # noqa: F841 - held by this frame, deeper than the guarded call
        raise RuntimeError(f"CUDA out of memory with batch {batch}")

    @vramslice.guarded(key="t", need="1Gi", runtime=rt, cleanup=lambda: seen.append(len(freed)))
    def step(batch):
        activations = Tensor()  # noqa: F841
        load(batch)

    with pytest.raises(RuntimeError, match="out of memory with batch 8") as failed:
        step(8)
    # Two attempts: after the first, its frames were gone (2 freed); after the last, too (4).
    assert seen == [2, 4]
    names = [frame.name for frame in traceback.extract_tb(failed.value.__traceback__)]
    assert names[-2:] == ["step", "load"], "the traceback keeps where it failed"

    @vramslice.guarded(key="a", need="1Gi", runtime=rt, cleanup=lambda: seen.append(len(freed)))
    async def astep():
        activations = Tensor()  # noqa: F841
        await asyncio.sleep(0)
        raise RuntimeError("CUDA out of memory")

    seen.clear()
    with pytest.raises(RuntimeError):
        asyncio.run(astep())
    # Before 3.13 a coroutine's frame is left as it is (clearing a suspended one would close
    # it), so the last attempt's tensor stays until the error is dropped.
    assert seen == ([5, 6] if sys.version_info >= (3, 13) else [5, 5])
    assert rt.stats()["running"] == 0


def hold_while_waiters_queue(rt, waiters, timeout, default_threads=None):
    """A 6 GiB job holds while `waiters` more queue behind it, then uses a thread of the loop's
    default executor (`default_threads` of them when given) and ends; every waiter must then be
    admitted and end within `timeout` seconds."""

    async def main():
        if default_threads is not None:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(default_threads))

        async def holder():
            async with vramslice.job("h", need="6Gi", runtime=rt):
                await asyncio.to_thread(wait_until, "waiters queued", lambda: rt.stats()["queued"] == waiters)
                await asyncio.to_thread(time.sleep, 0.01)

        async def waiter(i):
            async with vramslice.job(f"w{i}", need="6Gi", runtime=rt):
                await asyncio.sleep(0)

        h = asyncio.create_task(holder())
        await asyncio.to_thread(wait_until, "h admitted", lambda: rt.stats()["running"] == 1)
        queued = [asyncio.create_task(waiter(i)) for i in range(waiters)]
        await asyncio.wait_for(asyncio.gather(h, *queued), timeout)

    asyncio.run(main())
    assert rt.stats()["running"] == 0


def test_async_waiters_do_not_take_the_default_executors_threads():
    # Regression: waits ran in the loop's default executor; waiters filled it, the admitted
    # job's own asyncio.to_thread call never got a thread, and nothing was ever released.
    hold_while_waiters_queue(make(queue_timeout=5), waiters=3, timeout=4, default_threads=2)


def test_reclaim_runs_when_the_head_cannot_fit_while_nothing_runs():
    calls = []

    def reclaim():
        calls.append(1)
        rt.set_usage(3 * GIB)  # the allocator cache went back to the driver

    rt = make(queue_timeout=5, reclaim=reclaim)
    rt.set_usage(7 * GIB)  # weights and cache, with no job running
    started = time.monotonic()
    with vramslice.job("request", need="4Gi", runtime=rt) as j:
        assert j.reserved == 4 * GIB
    assert time.monotonic() - started < 2
    assert calls == [1]
    assert "vramslice_sidecar_reclaims_total 1" in rt.render_metrics()
    quiet = make(queue_timeout=0.05, reclaim=False)
    quiet.set_usage(7 * GIB)
    with pytest.raises(vramslice.QueueTimeout, match="0 jobs queued, 0 running"):
        quiet.admit("request", "4Gi")
    with pytest.raises(TypeError, match="reclaim must be a callable"):
        make(reclaim=3)


def test_an_async_jobs_reclaim_hook_sees_the_tasks_context():
    # The wait runs on a pool thread; the hook it may run belongs to the awaiting task (a
    # request id, a tracing span), as with asyncio.to_thread.
    request = contextvars.ContextVar("request", default=None)
    seen = []

    def reclaim():
        seen.append(request.get())
        rt.set_usage(3 * GIB)

    rt = make(queue_timeout=5, reclaim=reclaim)
    rt.set_usage(7 * GIB)

    async def serve(request_id):
        request.set(request_id)
        async with vramslice.job("request", need="4Gi", runtime=rt) as j:
            return j.reserved

    assert asyncio.run(serve("req-42")) == 4 * GIB
    assert seen == ["req-42"]


def test_a_signal_ends_a_blocking_admit_on_the_main_thread():
    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop()

    rt = make(queue_timeout=30)
    held = rt.admit("a", "7Gi")
    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        started = time.monotonic()
        with pytest.raises(Stop):
            rt.admit("b", "5Gi")
        assert time.monotonic() - started < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert rt.stats()["queued"] == 0
    held.release()


def test_auto_usage_without_a_driver_warns(monkeypatch):
    monkeypatch.delenv("VRAMSLICE_ACCOUNTING_DIR", raising=False)
    monkeypatch.setenv("VRAMSLICE_SIDECAR_LIBCUDA", "/nonexistent/libcuda.so.1")
    with pytest.warns(RuntimeWarning, match="falls back to usage reported with set_usage"):
        rt = vramslice.Runtime(limit="1Gi", usage="auto")
    assert rt.usage_kind == "manual"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_process_runtime():
    parent = vramslice.configure(limit="2Gi", usage="manual")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            fresh = vramslice._runtime is None
            child = vramslice.configure(limit="2Gi", usage="manual")
            with vramslice.job("m", need="1Gi") as j:
                ok = fresh and j.reserved == GIB and vramslice.runtime() is child
            os.write(write, b"ok" if ok else b"stale")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write, repr(exc).encode()[:200])
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 256)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert vramslice.runtime() is parent


def test_releases_do_not_queue_behind_waiters(monkeypatch):
    # Waiters fill the admission pool; the admitted job's release must still run.
    monkeypatch.setattr(vramslice, "_ADMISSION_THREADS", 2)
    monkeypatch.setattr(vramslice, "_pools", {})
    hold_while_waiters_queue(make(queue_timeout=5), waiters=2, timeout=3)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_or_exit_in_the_reclaim_hook_ends_the_wait(stop):
    def reclaim():
        raise stop

    rt = make(queue_timeout=5, reclaim=reclaim)
    rt.set_usage(7 * GIB)
    started = time.monotonic()
    with pytest.raises(stop):
        rt.admit("request", "4Gi")
    assert time.monotonic() - started < 2
    assert rt.stats()["queued"] == 0


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_in_a_reclaim_hook_that_freed_the_memory_still_ends_the_call(stop):
    # Regression: the hook freed the memory and then raised; the look that ran it admitted the
    # job, the interrupt stayed parked, and a later wait on this thread raised it instead.
    def reclaim():
        rt.set_usage(0)
        raise stop

    rt = make(queue_timeout=5, reclaim=reclaim)
    rt.set_usage(7 * GIB)
    with pytest.raises(stop):
        rt.admit("request", "4Gi")
    assert rt.stats()["running"] == 0, "the permit went back with the interrupt"
    # Nothing is left parked for the next call.
    rt.admit("next", "1Gi").release()


def test_the_metrics_address_from_the_environment_is_served(monkeypatch):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("VRAMSLICE_METRICS_ADDR", f"127.0.0.1:{port}")
    first = make(limit="2Gi")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "vramslice_sidecar_limit_bytes 2147483648" in text
    # A later runtime with the same address takes the endpoint over (as configure() replaces
    # the process-wide runtime), instead of failing on a port already open.
    second = make(limit="3Gi")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "vramslice_sidecar_limit_bytes 3221225472" in text
    del first, second
    # Another process of the server holds the address (workers inherit the variable): the
    # runtime works, unserved, with a warning.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("VRAMSLICE_METRICS_ADDR", "127.0.0.1:%d" % taken.getsockname()[1])
        with pytest.warns(RuntimeWarning, match="is in use"):
            rt = make(limit="1Gi")
        with vramslice.job("m", need="512Mi", runtime=rt) as j:
            assert j.reserved == GIB // 2


def test_metrics_are_openmetrics_and_say_so():
    # Regression: the example served this text as text/plain; version=0.0.4, where Prometheus
    # reads the counters' _total samples untyped.
    text = make().render_metrics()
    assert text.rstrip().endswith("# EOF")
    assert "# TYPE vramslice_sidecar_oom_errors counter" in text
    assert "vramslice_sidecar_oom_errors_total 0" in text
    assert vramslice.METRICS_CONTENT_TYPE.startswith("application/openmetrics-text; version=1.0.0")
    app = open(os.path.join(os.path.dirname(__file__), "../../../examples/python-inference-server/app.py")).read()
    assert "vramslice.METRICS_CONTENT_TYPE" in app


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_after_a_cuda_runtime_is_warned():
    # usage="cuda" calls cuInit when the runtime is made; a gunicorn --preload master doing so
    # leaves its workers with CUDA that is undefined after fork. The child is told why.
    code = textwrap.dedent("""
        import os, sys, warnings
        import vramslice
        class Fake:
            usage_kind = "cuda"
        vramslice._runtime = Fake()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if vramslice._runtime is None else 3)
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """)
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "forked after a runtime with usage='cuda'" in out.stderr
    # With warnings as errors the warning raises in the hook: the child is reset all the same.
    strict = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True,
                            text=True, timeout=60)
    assert strict.returncode == 0, strict.stderr
    manual = code.replace('usage_kind = "cuda"', 'usage_kind = "manual"')
    out = subprocess.run([sys.executable, "-W", "always", "-c", manual], capture_output=True, text=True, timeout=60)
    assert "forked after" not in out.stderr


def test_giving_up_leaves_a_suspended_task_of_a_shared_error_alone():
    # An inference batcher raises one out-of-memory error and sets it on every waiting future:
    # its traceback then holds the batcher's own frame, suspended while a guarded call gives
    # up. Clearing that frame would close the batcher's coroutine.
    rt = make(backoff=0.001, oom_retries=0)

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        proceed = asyncio.Event()

        async def batcher():
            try:
                raise RuntimeError("CUDA out of memory")
            except RuntimeError as exc:
                fut.set_exception(exc)
            await proceed.wait()
            return "batcher alive"

        @vramslice.guarded(key="b", need="1Gi", runtime=rt, cleanup=None)
        async def request():
            return await fut

        running = asyncio.create_task(batcher())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            await request()
        proceed.set()
        return await asyncio.wait_for(running, 5)

    assert asyncio.run(main()) == "batcher alive"


def test_peak_scope_is_a_keyword_and_a_wrong_one_is_named():
    make(peak_scope="container")
    make(peak_scope="process")
    with pytest.raises(ValueError, match=r"peak_scope=\"pod\": expected process or container"):
        make(peak_scope="pod")


def test_the_next_job_is_measured_from_the_settled_level():
    # Regression: the next job was admitted (its start usage read) before the finished job's
    # cache was emptied, and its peak was learned too low.
    rt = make()
    order = []
    first = vramslice.job("a", need="6Gi", runtime=rt,
                          settle=lambda: (order.append(("settle", rt.stats()["queued"])), rt.set_usage(0)))
    first.__enter__()
    learned = {}

    def second():
        with vramslice.job("b", runtime=rt, settle=None):
            order.append(("b admitted", rt.stats()["live"]))
            rt.set_usage(3 * GIB)
            wait_until("b sampled", lambda: rt.stats()["live"] == 3 * GIB)
        learned["b"] = rt.learned_peak("b")

    t = threading.Thread(target=second)
    t.start()
    wait_until("b queued", lambda: rt.stats()["queued"] == 1)
    rt.set_usage(2 * GIB)  # a's blocks, cached when it ends
    wait_until("a sampled", lambda: rt.stats()["live"] == 2 * GIB)
    first.__exit__(None, None, None)
    t.join(10)
    assert order == [("settle", 1), ("b admitted", 0)]
    assert rt.learned_peak("a") == 2 * GIB
    assert learned["b"] == 3 * GIB


def test_settle_is_skipped_beside_another_job_and_its_failure_is_a_warning():
    rt = make()
    calls = []
    with vramslice.job("a", need="1Gi", runtime=rt, settle=lambda: calls.append("a")):
        with vramslice.job("b", need="1Gi", runtime=rt, settle=lambda: calls.append("b")):
            pass
    assert calls == ["a"], "b ended beside a; a ended alone"

    def broken():
        raise ValueError("no cache here")

    with pytest.warns(RuntimeWarning, match="settle callback failed: ValueError"):
        with vramslice.job("c", need="1Gi", runtime=rt, settle=broken):
            pass
    assert rt.stats()["running"] == 0 and rt.stats()["reserved"] == 0


def test_an_out_of_memory_is_recognised_through_a_wrapping_error_and_library_messages():
    class OutOfMemoryError(RuntimeError):
        pass

    def wrapped(inner, how="from"):
        try:
            raise inner
        except Exception as exc:  # noqa: BLE001
            try:
                if how == "none":
                    raise ValueError("engine failed") from None
                if how == "during":  # a fallback's own failure, not caused by the OOM
                    raise ValueError("bad prompt")
                if how == "cancel":
                    raise asyncio.CancelledError()
                raise ValueError("engine failed") from exc
            except (ValueError, asyncio.CancelledError) as outer:
                return outer

    assert vramslice.is_out_of_memory(wrapped(OutOfMemoryError("CUDA out of memory")))
    assert vramslice.is_out_of_memory(wrapped(RuntimeError("CUDA error: CUDNN_STATUS_ALLOC_FAILED")))
    assert not vramslice.is_out_of_memory(wrapped(OutOfMemoryError("x"), how="none"))
    assert not vramslice.is_out_of_memory(wrapped(OutOfMemoryError("x"), how="during"))
    assert not vramslice.is_out_of_memory(wrapped(OutOfMemoryError("x"), how="cancel"))
    assert not vramslice.is_out_of_memory(wrapped(KeyError("prompt")))
    assert vramslice.is_out_of_memory(
        RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"))
    loop = RuntimeError("a")
    loop.__cause__ = RuntimeError("b")
    loop.__cause__.__cause__ = loop
    assert not vramslice.is_out_of_memory(loop)


def test_settle_must_be_a_plain_function():
    async def settle():
        pass

    with pytest.raises(TypeError, match="settle must be a plain function"):
        vramslice.job("a", settle=settle)
    with pytest.raises(TypeError, match="settle must be a function or None, not str"):
        vramslice.job("a", settle="empty_cache")


def test_a_job_inside_another_job_of_the_runtime_runs_within_its_reservation():
    # Admitting the inner job would wait for memory only the outer job returns: a queue
    # timeout every time. It runs within the outer reservation instead, measured with it.
    rt = make(limit="1Gi", queue_timeout=0.3)
    with vramslice.job("outer", need="800Mi", runtime=rt) as outer:
        with vramslice.job("inner", need="800Mi", runtime=rt) as inner:
            assert inner.nested and inner.reserved == 0
            assert rt.stats()["running"] == 1
        assert not outer.nested and outer.reserved == 800 << 20
    assert rt.stats()["running"] == 0 and rt.stats()["reserved"] == 0
    # Another runtime is another account: its job is admitted as usual.
    other = make(limit="1Gi")
    with vramslice.job("outer", need="800Mi", runtime=rt):
        with vramslice.job("elsewhere", need="100Mi", runtime=other) as j:
            assert not j.nested and j.reserved == 100 << 20
    # A new thread is not inside the job: it waits in line as any other caller.
    with vramslice.job("outer", need="800Mi", runtime=rt):
        with ThreadPoolExecutor(1) as pool:
            with pytest.raises(vramslice.QueueTimeout):
                pool.submit(lambda: vramslice.job("thread", need="800Mi", runtime=rt).__enter__()).result()


def test_guarded_functions_calling_each_other_are_admitted_once():
    rt = make(limit="1Gi", queue_timeout=0.3)
    calls = []

    @vramslice.guarded("inner", need="800Mi", runtime=rt)
    def inner():
        calls.append(("inner", rt.stats()["running"]))
        return "done"

    @vramslice.guarded("outer", need="800Mi", runtime=rt)
    def outer():
        calls.append(("outer", rt.stats()["running"]))
        return inner()

    assert outer() == "done"
    assert calls == [("outer", 1), ("inner", 1)]

    @vramslice.guarded("ainner", need="800Mi", runtime=rt)
    async def ainner():
        return rt.stats()["running"]

    @vramslice.guarded("aouter", need="800Mi", runtime=rt)
    async def aouter():
        async with vramslice.job("ablock", need="800Mi", runtime=rt) as j:
            assert j.nested
        return await ainner()

    assert asyncio.run(aouter()) == 1
    assert rt.stats()["running"] == 0


def test_an_async_job_whose_runtime_cannot_be_made_can_be_entered_again(monkeypatch):
    # The runtime's error must surface each time, not "already entered" after the first.
    monkeypatch.setattr(vramslice, "runtime", lambda: (_ for _ in ()).throw(vramslice.ConfigError("bad")))
    j = vramslice.job("m", need="1Mi")

    async def enter():
        async with j:
            pass

    for _ in range(2):
        with pytest.raises(vramslice.ConfigError, match="bad"):
            asyncio.run(enter())


def test_a_job_exited_in_another_context_still_returns_its_memory():
    # A framework resuming a generator in a copied context exits the job there: the mark is
    # dropped in that context and the permit returned, with no error of the context variable.
    rt = make(limit="1Gi")
    j = vramslice.job("streamed", need="800Mi", runtime=rt)
    j.__enter__()
    contextvars.copy_context().run(j.__exit__, None, None, None)
    assert rt.stats()["running"] == 0 and rt.stats()["reserved"] == 0
    with vramslice.job("next", need="800Mi", runtime=rt) as nxt:
        assert not nxt.nested and nxt.reserved == 800 << 20


def test_a_task_that_outlives_its_job_is_admitted_on_its_own():
    rt = make(limit="1Gi", queue_timeout=2)

    async def main():
        go = asyncio.Event()

        async def later():
            await go.wait()
            async with vramslice.job("later", need="800Mi", runtime=rt) as j:
                return j.nested, j.reserved

        async with vramslice.job("outer", need="800Mi", runtime=rt):
            task = asyncio.create_task(later())  # inherits the context, and the mark
        go.set()
        return await task

    assert asyncio.run(main()) == (False, 800 << 20)
