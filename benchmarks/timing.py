"""Timing shared by the benchmark scripts: medians of CUDA-event timings, the bandwidths they compare to, and
printing a result table."""

import math
import statistics

import torch


def time_ms(fn, inputs=((),), reps: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of single calls ``fn(*inputs[i % len(inputs)])``, an event pair around each."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn, reps: int, calls: int = 20) -> float:
    """Milliseconds per call of ``calls`` calls of ``fn()`` issued back to back (host work overlaps the device's,
    as in a loop that does not wait for each call)."""
    return time_ms(lambda: [fn() for _ in range(calls)], reps=max(5, reps // 5)) / calls


def copies_for(nbytes: int) -> int:
    """How many copies of an input of ``nbytes`` to rotate so that every call reads from device memory."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, math.ceil(4 * l2 / max(nbytes, 1)))


def copy_bandwidth(reps: int) -> float:
    """TB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * n / time_ms(lambda: dst.copy_(src), reps=reps) / 1e9


def fill_bandwidth(reps: int) -> float:
    """TB/s of a 1 GiB fill (bytes written only)."""
    n = 1 << 30
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    return n / time_ms(lambda: dst.fill_(7), reps=reps) / 1e9


def emit(lines: list[str], out: str | None) -> None:
    """Print a result table, and write it to ``out`` when given."""
    print("\n".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
