"""sleepwake: a language model whose memory lives in its weights.

Facts are written into MLP down-projections at once by MEMIT (wake) and later
moved into LoRA adapters during nap and deep sleep.
"""

from sleepwake.facts import Fact

__version__ = "0.1.0"

__all__ = ["Assistant", "Fact", "Memory", "MemoryConfig", "__version__"]


def __getattr__(name: str):
    # Memory pulls in torch and transformers; import it lazily so that
    # `import sleepwake` and the CLI's --help stay fast.
    if name == "Memory":
        from sleepwake.memory import Memory

        return Memory
    if name == "Assistant":
        from sleepwake.talk import Assistant

        return Assistant
    if name == "MemoryConfig":
        from sleepwake.config import MemoryConfig

        return MemoryConfig
    raise AttributeError(name)
