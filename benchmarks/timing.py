"""Timing shared by the benchmark scripts: medians of CUDA-event timings, the bandwidths they compare to, and
printing a result table."""

import math
import random
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


def _capture(fn, inputs):
    """A CUDA graph that calls fn(*inputs[i]) for every copy (repeated to >= 8 calls), and its number of calls."""
    n = len(inputs)
    calls = max(8, n)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(n, 3)):  # warm-up (cuBLAS handles, kernel attributes) outside the capture
            fn(*inputs[i])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*inputs[i % n])
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return graph, calls


def time_graphs(cases, reps: int) -> list[float]:
    """Median ms per call of each ``(fn, inputs)`` case, from CUDA-graph replays taken in turn, so that every case sees
    the same clocks and temperature (a long compute-bound run slows down as the GPU heats, which timing the cases one
    after the other charges to whichever runs later). The order is shuffled each round: a case's clocks also depend on
    the work just before it (H200, 8192x28672, m = 4096: bf16 F.linear 2.47 ms right after the int8 cases, 2.84-2.91
    right after NF4), which a fixed order charges to the same case every round."""
    graphs = [_capture(fn, inputs) for fn, inputs in cases]
    times = [[] for _ in graphs]
    order = list(range(len(graphs)))
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for i in order:
            graph, calls = graphs[i]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / calls)
    del graphs
    return [statistics.median(t) for t in times]


def time_cases(cases: dict, reps: int, eager: bool = False) -> dict:
    """Median ms per call of each named ``(fn, inputs)`` case: graph replays taken in turn (time_graphs), or single
    eager calls of every case where asked or where any of them cannot be captured."""
    if not eager:
        try:
            return dict(zip(cases, time_graphs(list(cases.values()), reps), strict=True))
        except Exception as error:  # noqa: BLE001  (e.g. a third-party kernel that cannot be captured)
            print(f"  graph timing failed ({error}); eager calls instead")
            torch.cuda.synchronize()
    return {name: time_ms(fn, inputs, reps) for name, (fn, inputs) in cases.items()}


def back_to_back_ms(fn, reps: int, calls: int = 20) -> float:
    """Milliseconds per call of ``calls`` calls of ``fn()`` issued back to back (host work overlaps the device's,
    as in a loop that does not wait for each call)."""
    return time_ms(lambda: [fn() for _ in range(calls)], reps=max(5, reps // 5)) / calls


def copies_for(nbytes: int) -> int:
    """How many copies of an input of ``nbytes`` to rotate so that every call reads from device memory."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, math.ceil(4 * l2 / max(nbytes, 1)))


def copy_bandwidth(reps: int) -> float:
    """TB/s of a 1 GiB device-to-device copy, counting bytes read and written. Eager calls: a captured copy becomes a
    graph memcpy node, which ran at 2.7 TB/s against 4.1 for the eager copy kernel on an H200."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * n / time_ms(lambda: dst.copy_(src), reps=reps) / 1e9


def fill_bandwidth(reps: int) -> float:
    """TB/s of a 1 GiB fill (bytes written only), eager calls as copy_bandwidth."""
    n = 1 << 30
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    return n / time_ms(lambda: dst.fill_(7), reps=reps) / 1e9


def emit(lines: list[str], out: str | None) -> None:
    """Print a result table, and write it to ``out`` when given."""
    print("\n".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
