"""vramslice: run inference jobs inside the container's GPU memory limit.

A job (a model load or a request) is admitted when the memory it needs fits below the
high-water mark of the limit, waits in a FIFO queue otherwise, and is refused at once when it
can never fit. Its real peak is measured and remembered (shared across worker processes through
``VRAMSLICE_PROFILE_DIR``), so later runs reserve what they really use. Out-of-memory errors are
retried with backoff after a cleanup callback.

    import vramslice

    with vramslice.job("whisper-large", need="6Gi"):
        model = load_model()

    async with vramslice.job("whisper-large", params={"batch": 8}):
        await transcribe(...)

    @vramslice.guarded(key=lambda **p: "whisper", params=lambda **p: {"batch": p["batch"]})
    def transcribe(audio, *, batch):
        ...

Configuration comes from the ``VRAMSLICE_*`` environment, or from :func:`configure`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import inspect
import os
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from ._native import (
    METRICS_CONTENT_TYPE,
    Cancel as _Cancel,
    ConfigError,
    NativePermit as Permit,
    NativeRuntime as Runtime,
    QueueTimeout,
    Refused,
    UsageError,
    VramsliceError,
    message_is_out_of_memory,
    parse_bytes,
    profile_file_name,
)

__all__ = [
    "METRICS_CONTENT_TYPE",
    "ConfigError",
    "Permit",
    "QueueTimeout",
    "Refused",
    "Runtime",
    "UsageError",
    "VramsliceError",
    "configure",
    "default_cleanup",
    "empty_cache",
    "guarded",
    "is_out_of_memory",
    "job",
    "parse_bytes",
    "profile_file_name",
    "runtime",
]

Need = Union[int, str, None]
Params = Optional[Mapping[str, Any]]

_lock = threading.Lock()
_runtime: Optional[Runtime] = None

# Threads that wait for admission for asyncio tasks, and threads that give memory back: pools of
# their own. In the loop's default executor, waiters would take the threads that the jobs they
# wait for need (``asyncio.to_thread``), and nothing would ever be released; for the same reason
# releases never queue behind waiters. Threads start on demand; beyond this many, waits queue
# for a thread here, never in the default executor.
_ADMISSION_THREADS = 256
_RELEASE_THREADS = 4
_pools_lock = threading.Lock()
_pools: Dict[str, ThreadPoolExecutor] = {}


def _pool(name: str, threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"vramslice-{name}")
        return pool


def _admission_pool() -> ThreadPoolExecutor:
    return _pool("admission", _ADMISSION_THREADS)


def _release_pool() -> ThreadPoolExecutor:
    return _pool("release", _RELEASE_THREADS)


def _forget_after_fork() -> None:
    # A forked child (gunicorn --preload, multiprocessing with fork) inherits the parent's
    # runtime without its sampler thread, with CUDA handles that are not valid in the child and
    # locks another thread may have held at the fork. It makes its own on first use.
    global _runtime, _lock, _pools, _pools_lock
    inherited = _runtime
    _runtime = None
    _lock = threading.Lock()
    _pools = {}
    _pools_lock = threading.Lock()
    if inherited is not None and inherited.usage_kind == "cuda":
        # Its cuInit happened in the parent: CUDA in a forked child (without exec) is undefined
        # after that, for this child's own runtime and for the application's CUDA alike. (Said
        # after the reset: with warnings turned into errors, the reset must still have run.)
        warnings.warn(
            "vramslice: this process was forked after a runtime with usage='cuda' initialised "
            "CUDA in its parent; CUDA may fail or hang here. Create the runtime in each worker "
            "(after the fork), or use usage='accounting' (the default under vramslice's guard)",
            RuntimeWarning,
            stacklevel=2,
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def configure(**options: Any) -> Runtime:
    """Create the process-wide runtime with these options (see ``Runtime``) and return it.

    Options: ``limit`` (bytes or "8Gi"), ``profile_dir``, ``accounting_dir``, ``usage``
    ("auto", "accounting", "cuda", "manual"), ``high_water``, ``first_run_fraction``,
    ``peak_margin``, ``queue_max``, ``queue_timeout`` (s), ``oom_retries``, ``backoff`` (s),
    ``sample_interval`` (s), ``peak_scope`` ("process", "container"). Unset options come from
    the ``VRAMSLICE_*`` environment.
    """
    global _runtime
    rt = Runtime(**options)
    with _lock:
        _runtime = rt
    return rt


def runtime() -> Runtime:
    """The process-wide runtime, created from the environment on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a GPU out-of-memory error (PyTorch's ``OutOfMemoryError``,
    ``CUDA_ERROR_OUT_OF_MEMORY`` or a CUDA library's failed allocation in a message, ...), or
    an error raised explicitly from one (a framework wrapping it: ``raise X from oom``). An error
    merely raised while one was handled (``__context__``: a fallback's own failure, a
    cancellation) is not one, nor is anything that is not an ``Exception`` (cancellation,
    ``KeyboardInterrupt``, ``SystemExit``)."""
    if not isinstance(exc, Exception):
        return False
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen and len(seen) < 32:
        seen.add(id(current))
        if type(current).__name__ in ("OutOfMemoryError", "CudaOutOfMemoryError"):
            return True
        if message_is_out_of_memory(str(current)):
            return True
        current = current.__cause__
    return False


def default_cleanup() -> None:
    """Release cached GPU memory: ``gc.collect()`` and, when PyTorch is loaded,
    ``torch.cuda.empty_cache()``."""
    gc.collect()
    empty_cache()


def empty_cache() -> None:
    """Give PyTorch's cached, unused GPU blocks back to the driver (``torch.cuda.empty_cache()``,
    when PyTorch is loaded); the default ``settle`` of :class:`job` and :func:`guarded`."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - settling must never mask the job's outcome
            pass


# The runtimes that hold a job in the current thread or task (a context variable: a task
# inherits its creator's, a new thread starts with none). A job entered inside another job of
# the same runtime runs within that job's reservation: admitting it would wait on memory only
# the outer job can return, until the queue timeout, every time.
# It holds the jobs, not their runtimes: a task or thread that inherited the context counts as
# inside only while the job is (its `_holding` is cleared on exit, in every copy at once).
_HELD: "contextvars.ContextVar[Tuple[job, ...]]" = contextvars.ContextVar("vramslice_held", default=())


def _holds(rt: Runtime) -> bool:
    return any(held._holding is rt for held in _HELD.get())


def _settle(permit: Permit, settle: Optional[Callable[[], None]]) -> None:
    # The job's final reading first, then the cache release, and only then (when the permit
    # ends) the next job's admission, whose start usage no longer holds this job's cache. Beside
    # another job still being measured nothing is learned from the release: it is skipped.
    if settle is None or permit.end_measurement():
        return
    try:
        settle()
    except Exception as exc:  # noqa: BLE001 - the permit must still end
        warnings.warn(f"vramslice: the settle callback failed: {exc!r}", RuntimeWarning, stacklevel=3)


class job:  # noqa: N801 - reads as a function at the call site
    """Run a block under admission: ``with job(key, need=..., params=...)`` or ``async with``.

    On normal exit the measured peak is recorded; on an out-of-memory exception the peak is
    raised (and the exception propagates: a ``with`` block cannot be re-run, use
    :func:`guarded` for retries); on any other exception the memory is returned and nothing
    recorded. ``classify`` decides what counts as out-of-memory; ``timeout`` (seconds)
    overrides the runtime's admission timeout for this job.

    ``settle`` runs when the block exits while no other job of the runtime is being measured
    (one that only settles does not count), after the
    job's final reading and before its memory goes back to the line: it should give back what
    the job left cached (default :func:`empty_cache`, PyTorch's cache). A caching allocator's
    blocks count as used until then, so a next job reusing them would show no growth and its
    peak would be learned too low. With jobs one at a time this costs a device synchronisation
    and fresh allocations for the next job; ``settle=None`` skips it (for small, frequent jobs
    whose needs are declared or already learned). One ``job`` object holds one permit
    at a time: entering it again before it exits (from another thread or task) raises
    ``RuntimeError``; make one ``job(...)`` per use.

    A job entered inside another job of the same runtime, in the same thread or task (a
    :func:`guarded` function calling another), runs within the outer job's reservation: it is
    not admitted again (``reserved`` is 0, ``nested`` is true) and nothing is measured or
    learned for it; the outer job's peak includes its memory.
    """

    def __init__(
        self,
        key: str,
        need: Need = None,
        params: Params = None,
        *,
        runtime: Optional[Runtime] = None,
        classify: Callable[[BaseException], bool] = is_out_of_memory,
        timeout: Optional[float] = None,
        settle: Optional[Callable[[], None]] = empty_cache,
    ) -> None:
        if settle is not None and not callable(settle):
            raise TypeError(f"vramslice.job: settle must be a function or None, not {type(settle).__name__}")
        if settle is not None and inspect.iscoroutinefunction(settle):
            raise TypeError("vramslice.job: settle must be a plain function (it runs on a worker thread), "
                            "not a coroutine function")
        self.key = key
        self.timeout = timeout
        self.settle = settle
        self.need = need
        self.params = dict(params) if params else None
        self._runtime = runtime
        self._classify = classify
        self.permit: Optional[Permit] = None
        self.nested = False
        self._holding: Optional[Runtime] = None
        self._held: Optional[contextvars.Token] = None
        self._in_use = False
        self._lock = threading.Lock()

    def _claim(self) -> None:
        with self._lock:
            if self._in_use:
                raise RuntimeError(
                    f"vramslice.job({self.key!r}) is already entered: a job object holds one permit "
                    "at a time, make one job(...) per use"
                )
            self._in_use = True

    def _unclaim(self) -> None:
        with self._lock:
            self._in_use = False

    def _rt(self) -> Runtime:
        return self._runtime if self._runtime is not None else runtime()

    @property
    def reserved(self) -> int:
        """Bytes reserved for the job (0 before admission)."""
        return self.permit.reserved if self.permit is not None else 0

    def _outcome(self, exc: Optional[BaseException]) -> str:
        if exc is None:
            return "complete"
        return "out_of_memory" if self._classify(exc) else "release"

    def _hold(self, rt: Runtime) -> None:
        self._holding = rt
        self._held = _HELD.set(_HELD.get() + (self,))

    def _let_go(self) -> None:
        # Not inside any more, in every context that inherited the mark; then the mark itself
        # goes, where the job was entered. Exited in another context (a generator a framework
        # resumes in a copied context, a teardown on another task) the token cannot be reset
        # there: this context's copy drops the job instead.
        self._holding = None
        self.nested = False
        held, self._held = self._held, None
        if held is None:
            return
        try:
            _HELD.reset(held)
        except ValueError:
            _HELD.set(tuple(j for j in _HELD.get() if j is not self))

    def _finish(self, outcome: str) -> None:
        permit, self.permit = self.permit, None
        self._unclaim()
        if permit is not None:
            try:
                _settle(permit, self.settle)
            finally:
                getattr(permit, outcome)()

    def __enter__(self) -> "job":
        self._claim()
        try:
            rt = self._rt()
            if _holds(rt):
                self.nested = True
                return self
            self.permit = rt.admit(self.key, self.need, self.params, self.timeout)
            self._hold(rt)
        except BaseException:
            self._unclaim()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._let_go()
        finally:
            self._finish(self._outcome(exc))
        return False

    async def __aenter__(self) -> "job":
        self._claim()
        cancel = _Cancel()
        try:
            rt = self._rt()
            if _holds(rt):
                self.nested = True
                return self
            loop = asyncio.get_running_loop()
            # In the task's context, as asyncio.to_thread does: the reclaim hook may run on
            # this thread and read it (a request id, a tracing span).
            waiting = contextvars.copy_context()
            self.permit = await loop.run_in_executor(
                _admission_pool(),
                waiting.run,
                rt.admit,
                self.key,
                self.need,
                self.params,
                self.timeout,
                cancel,
            )
        except BaseException as exc:
            self._unclaim()
            if isinstance(exc, asyncio.CancelledError):
                # The thread still waits in line: have it give up its place now, not at its
                # timeout (a permit it got meanwhile is dropped with it, returning the memory).
                cancel.set()
            raise
        self._hold(rt)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self._let_go()
        # Giving the memory back reads usage and may write the profile (a lock and an fsync):
        # off the event loop. The error itself stays here: the pool's thread would hold it, and
        # the failed frames in its traceback, past the retry's cleanup.
        outcome = self._outcome(exc)
        try:
            finishing = asyncio.get_running_loop().run_in_executor(
                _release_pool(), contextvars.copy_context().run, self._finish, outcome
            )
        except RuntimeError:  # the pool is shut down: the interpreter is exiting
            self._finish(outcome)
            return False
        await asyncio.shield(finishing)
        return False


def _resolve(value: Any, kwargs: Dict[str, Any]) -> Any:
    return value(**kwargs) if callable(value) else value


def _call_kwargs(fn: Callable, args: tuple, kwargs: dict) -> Dict[str, Any]:
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    return dict(bound.arguments)


_GENERATOR_LIKE = (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
                   | inspect.CO_ITERABLE_COROUTINE)


def _clear_frames(tb) -> None:
    if sys.version_info >= (3, 13):
        # Clearing a running or suspended frame raises there, and clear_frames skips it.
        traceback.clear_frames(tb)
        return
    # Before 3.13, clearing a suspended generator's or coroutine's frame closes it: a shared
    # error (a batcher sets one on every waiting future) can carry another task's frame that
    # still waits. Such frames are left alone, finished ones too (they cannot be told apart).
    while tb is not None:
        if not tb.tb_frame.f_code.co_flags & _GENERATOR_LIKE:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # a frame still running: the caller's
                pass
        tb = tb.tb_next


def _drop_failed_frames(exc: BaseException) -> None:
    """Clear the local variables of the frames the failed call left in ``exc``'s traceback (and
    in the exceptions chained to it), keeping their files and lines: the tensors they held can
    then be freed while the error still propagates. Frames still running (the caller's) or
    suspended (another task's) are left alone; before Python 3.13, so are all frames of
    coroutines and generators."""
    seen = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        _clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def guarded(
    key: Union[str, Callable[..., str], None] = None,
    *,
    need: Union[Need, Callable[..., Need]] = None,
    params: Union[Params, Callable[..., Params]] = None,
    retries: Optional[int] = None,
    cleanup: Optional[Callable[[], None]] = default_cleanup,
    classify: Callable[[BaseException], bool] = is_out_of_memory,
    runtime: Optional[Runtime] = None,
    timeout: Optional[float] = None,
    settle: Optional[Callable[[], None]] = empty_cache,
) -> Callable:
    """Decorate a function (sync or async) so each call runs under admission with
    out-of-memory retry.

    ``key``, ``need`` and ``params`` may be values or callables receiving the call's arguments
    by name (``key=lambda **p: f"whisper-{p['size']}"``); ``key`` defaults to the function's
    qualified name. On out-of-memory: the peak is raised, ``cleanup`` runs, the runtime's
    backoff is waited and the call retried, at most ``retries`` times (default: the runtime's
    ``oom_retries``); then the last error propagates. ``timeout`` (seconds) overrides the
    runtime's admission timeout for these calls; ``settle`` is :class:`job`'s.

    When the last attempt fails with out-of-memory, the local variables of the frames it left in
    the error's traceback are cleared (files and lines stay), so that ``cleanup`` frees its
    tensors before the error reaches the caller, who may hold it for a while (before Python
    3.13, not those of coroutine frames, which cannot be cleared safely there).
    """

    def decorate(fn: Callable) -> Callable:
        default_key = f"{fn.__module__}.{fn.__qualname__}"

        def plan(args: tuple, kwargs: dict):
            named = _call_kwargs(fn, args, kwargs)
            rt = runtime if runtime is not None else globals()["runtime"]()
            k = _resolve(key, named) if key is not None else default_key
            limit = retries if retries is not None else rt.oom_retries
            return rt, str(k), _resolve(need, named), _resolve(params, named), limit

        def recover(rt: Runtime, attempt: int) -> float:
            # Called after the `except` block ended: the failed attempt's frames (and the
            # tensors in them) were only reachable from the exception's traceback, so cleanup
            # can free them now; inside the block it could not.
            if cleanup is not None:
                cleanup()
            rt.note_retry()
            return rt.backoff(attempt)

        def give_up(exc: BaseException) -> None:
            # The error propagates with its traceback, which holds the last attempt's frames:
            # cleanup can only free their tensors once those frames are cleared.
            if classify(exc):
                _drop_failed_frames(exc)
                if cleanup is not None:
                    cleanup()

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args, **kwargs):
                rt, k, n, p, limit = plan(args, kwargs)
                if _holds(rt):
                    # Inside another job of the runtime: its reservation covers this call, and
                    # its retry (not this one's) handles running out of memory.
                    return await fn(*args, **kwargs)
                attempt = 0
                while True:
                    try:
                        async with job(k, n, p, runtime=rt, classify=classify, timeout=timeout, settle=settle):
                            return await fn(*args, **kwargs)
                    except BaseException as exc:  # noqa: BLE001
                        if not classify(exc) or attempt >= limit:
                            give_up(exc)
                            raise
                    await asyncio.sleep(recover(rt, attempt))
                    attempt += 1

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            rt, k, n, p, limit = plan(args, kwargs)
            if _holds(rt):
                return fn(*args, **kwargs)
            attempt = 0
            while True:
                try:
                    with job(k, n, p, runtime=rt, classify=classify, timeout=timeout, settle=settle):
                        return fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001
                    if not classify(exc) or attempt >= limit:
                        give_up(exc)
                        raise
                time.sleep(recover(rt, attempt))
                attempt += 1

        return wrapper

    return decorate
