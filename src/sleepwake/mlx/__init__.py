"""The MLX backend (`--backend mlx`, `Memory(backend="mlx")`): the model runs on MLX arrays
(Apple silicon's Metal, or the CPU through `mlx-cpu` on Linux). The home, the ledger and the
edit files are the PyTorch backend's, so either backend reads a home the other wrote.

Import `sleepwake.mlx.memory` only after `sleepwake.backends.check_backend("mlx")`.
"""
