import subprocess
import sys

from torchlowbit.ops import schemas


def test_python_m_torchlowbit_reports_every_op_and_exits_zero():
    result = subprocess.run([sys.executable, "-m", "torchlowbit"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in schemas.SCHEMAS:
        assert f"lowbit::{name} " in result.stdout
    assert "CUDA extension:" in result.stdout
    assert result.stdout.rstrip().endswith("OK")
