"""``python -m torchlowbit``: a diagnostics report of the install; exit code 0 when it is healthy."""

import platform
import sys

import torch

import torchlowbit
from torchlowbit.ops import CUDA_EXTENSION_LOADED, CUDA_EXTENSION_STATUS, CUDA_REFERENCE_OPS, schemas
from torchlowbit.ops.registry import has_kernel


def _kernel_table() -> tuple[list[str], list[str]]:
    """Rows of the op table, and the ops that lack a required kernel."""
    width = max(map(len, schemas.SCHEMAS)) + len("lowbit::") + 2
    rows = [f"{'op':<{width}}{'CPU':<10}{'CUDA':<11}Meta/fake"]
    broken = []
    for name in schemas.SCHEMAS:
        cpu, meta = has_kernel(name, "CPU"), has_kernel(name, "Meta")
        cuda = "reference" if name in CUDA_REFERENCE_OPS else "native" if has_kernel(name, "CUDA") else "-"
        op = f"lowbit::{name}"
        rows.append(f"{op:<{width}}{'yes' if cpu else 'MISSING':<10}{cuda:<11}{'yes' if meta else 'MISSING'}")
        if not (cpu and meta):
            broken.append(name)
    return rows, broken


def main() -> int:
    print(f"torchlowbit {torchlowbit.__version__} ({torchlowbit.__file__})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"  cuda:{index} {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    if torch.cuda.is_available() and not CUDA_EXTENSION_LOADED:
        print("  note: CUDA tensors run the PyTorch reference kernels (slow) until the extension is built")
    print(f"CUDA extension: {'loaded' if CUDA_EXTENSION_LOADED else 'not loaded'} ({CUDA_EXTENSION_STATUS})")
    rows, broken = _kernel_table()
    print("\n".join(rows))
    if broken:
        print(f"UNHEALTHY: ops without a CPU or fake kernel: {', '.join(broken)}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
