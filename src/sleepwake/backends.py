"""Which array library runs the model: PyTorch (the default) or Apple's MLX (`sleepwake.mlx`).

Checked before anything loads or changes, so a wrong `--backend` or a missing MLX is an
error naming the problem, not a failure half-way through a command.
"""

from __future__ import annotations

import importlib.util

from sleepwake.errors import InvalidRequestError

BACKENDS = ("torch", "mlx")


def check_backend(backend: str | None) -> str:
    """`backend` ("torch" when None) if it is known and importable here; else an error."""
    backend = backend or "torch"
    if backend not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {backend!r}; the backends are {', '.join(BACKENDS)}")
    if backend == "mlx":
        missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
        if missing:
            raise InvalidRequestError(
                f"the MLX backend needs {' and '.join(m.replace('_', '-') for m in missing)}, which "
                "cannot be imported here: pip install 'mlx[cpu]' mlx-lm on Linux, mlx mlx-lm on macOS "
                "(Python 3.11 or newer)")
        try:
            import sleepwake.mlx  # noqa: F401  (first: it sets up mlx-cpu's BLAS before mlx loads)
            import mlx.core  # noqa: F401  (a wheel without its CPU or Metal library fails here)
        except ImportError as exc:
            raise InvalidRequestError(f"the MLX backend cannot load mlx here: {exc}") from None
    return backend
