"""MEMIT: closed-form edits of MLP down-projections (paper §3.2, eq. 1–5)."""
