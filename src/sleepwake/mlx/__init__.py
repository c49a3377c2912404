"""The MLX backend (`--backend mlx`, `Memory(backend="mlx")`): the model runs on MLX arrays
(Apple silicon's Metal, or the CPU through `mlx-cpu` on Linux). The home, the ledger and the
edit files are the PyTorch backend's, so either backend reads a home the other wrote.

Import `sleepwake.mlx.memory` only after `sleepwake.backends.check_backend("mlx")`.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path


def _fast_blas() -> None:
    """On Linux, let mlx-cpu's matrix products run on the optimised BLAS inside PyTorch.

    The mlx-cpu wheel links the reference (netlib) BLAS, whose `cblas_sgemm` calls the
    Fortran `sgemm_`; libtorch_cpu exports an optimised `sgemm_`. Loaded into the global
    symbol scope before mlx is, it is the one those calls reach: a 240×576 by 576×1536
    product took 0.17 s before and 0.0045 s after on this project's 2-core CPU, with the
    same results to float32 rounding. Nothing changes where mlx was imported already."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return
    import torch

    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if lib.is_file():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


_fast_blas()
