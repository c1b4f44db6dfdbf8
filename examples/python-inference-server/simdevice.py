"""A GPU stand-in shared by all worker processes of one server: a byte counter in shared memory
with a hard limit (as the guard enforces a container's limit), raising the same error text
PyTorch raises on CUDA out-of-memory. Create it in the master before the workers fork."""

import multiprocessing
import threading
import time


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, so vramslice classifies it the same way."""


class SimDevice:
    def __init__(self, limit: int):
        self.limit = limit
        self._used = multiprocessing.Value("Q", 0, lock=False)
        self._peak = multiprocessing.Value("Q", 0, lock=False)
        self._lock = multiprocessing.Lock()

    def used(self) -> int:
        return self._used.value

    def peak(self) -> int:
        return self._peak.value

    def alloc(self, nbytes: int) -> "Block":
        with self._lock:
            if self._used.value + nbytes > self.limit:
                raise OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes / 2**20:.1f} MiB "
                    f"({self._used.value / 2**20:.1f} MiB of {self.limit / 2**20:.1f} MiB in use)"
                )
            self._used.value += nbytes
            self._peak.value = max(self._peak.value, self._used.value)
        return Block(self, nbytes)

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self._used.value -= nbytes


class Block:
    def __init__(self, device: SimDevice, nbytes: int):
        self.device, self.nbytes, self._live = device, nbytes, True

    def free(self) -> None:
        if self._live:
            self._live = False
            self.device._free(self.nbytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
        return False


def mirror_usage(device: SimDevice, runtime, interval: float = 0.002) -> threading.Thread:
    """Report the shared device's usage to a vramslice runtime created with usage="manual"
    (with a real GPU the runtime reads the guard's accounting file or cuMemGetInfo itself)."""

    def loop():
        while True:
            runtime.set_usage(device.used())
            time.sleep(interval)

    t = threading.Thread(target=loop, name="vramslice-usage", daemon=True)
    t.start()
    return t
