"""Sleep: moving facts from MEMIT edits into LoRA adapters (nap, deep sleep, pressure)."""
