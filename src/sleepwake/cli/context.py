"""What every command handler gets: the parsed options, the output streams, and the
memory home, its holder and the model, each loaded only when the handler asks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from sleepwake.errors import HomeBusyError, StoreError

PROG = "sleepwake"


class UsageError(Exception):
    """A malformed command line (exit code 2)."""


class Context:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.quiet: bool = bool(args.quiet)
        # Progress bars only where a person is watching.
        self.progress = not self.quiet and err.isatty()

    @property
    def home(self) -> Path:
        """The --user's memory: the home itself for the default user, else home/users/NAME."""
        from sleepwake.users import user_home

        return user_home(self.root, getattr(self.args, "user", None))

    @property
    def root(self) -> Path:
        """The memory home (--home): every user's, under one lock."""
        if self.args.home:
            home = Path(self.args.home).expanduser()
        else:
            from sleepwake.config import default_home

            home = default_home()
        if home.exists() and not home.is_dir():
            raise StoreError(f"memory home {home} exists and is not a directory; give --home a directory")
        return home

    def remote(self) -> Any:
        """The running server that holds this home, as a `Remote`, or None when no other
        process holds it. Held by another process that serves no API: `HomeBusyError`."""
        from sleepwake.homelock import holder

        held = holder(self.root)
        if held is None or held.pid == os.getpid():
            return None
        if not held.url:
            raise HomeBusyError(f"memory home {self.root} is in use by {held.describe()}; wait for it to end "
                                "or stop it, then try again", held)
        from sleepwake.remote import Remote

        return Remote(held, user=getattr(self.args, "user", None))

    def _check_free(self) -> None:
        """Before the model loads (seconds): the home must not be another live process's."""
        from sleepwake.homelock import holder

        held = holder(self.root)
        if held is not None and held.pid != os.getpid():
            hint = ("; 'inject', 'forget', 'nap', 'sleep' and 'status' work through it, other commands "
                    "need it stopped" if held.url else "; wait for it to end or stop it, then try again")
            raise HomeBusyError(f"memory home {self.root} is in use by {held.describe()}{hint}", held)

    def say(self, text: str) -> None:
        """A result line on stdout."""
        print(text, file=self.out)

    def status(self, text: str) -> None:
        """A status line on stderr (not with --quiet)."""
        if not self.quiet:
            print(text, file=self.err, flush=True)

    def _quiet_libraries(self) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        if not self.progress and "tqdm" not in sys.modules:
            # transformers' GGUF conversion bar ignores its own progress switch;
            # tqdm reads TQDM_* defaults when it is first imported.
            os.environ.setdefault("TQDM_DISABLE", "1")
        if self.quiet:
            import warnings

            warnings.filterwarnings("ignore")

    def memory(self) -> Any:
        """Load the model and the memory home (the slow part: seconds)."""
        self._quiet_libraries()
        from sleepwake.sources import resolve_model

        resolve_model(self.args.model)  # a wrong --model fails here, before torch is imported
        backend = self.backend()
        device_map = self.device_map() if backend == "torch" else None
        device = self.device() if backend == "torch" and device_map is None else None
        quantize = self.quantize()
        self._check_free()
        self.status(f"sleepwake: loading {self.args.model or 'the default model'} (memory: {self.home}) …")
        from dataclasses import replace

        from sleepwake.config import MemoryConfig
        from sleepwake.memory import Memory

        config = MemoryConfig().with_memit(chat_edit=False) if self.args.raw_only else None
        if config is None and self.args.chat_edit_limit is not None:
            config = MemoryConfig().with_memit(chat_edit_max_facts=self.args.chat_edit_limit)
        if getattr(self.args, "consolidation", None):
            config = replace(config or MemoryConfig(), consolidation=self.args.consolidation)
        return Memory(self.args.model, home=self.root, config=config, device=device, progress=self.progress,
                      user=getattr(self.args, "user", None), quantize=quantize, backend=backend,
                      device_map=device_map)

    def backend(self) -> str:
        """--backend, importable here, without another backend's options; else a usage error,
        before anything loads."""
        from sleepwake.backends import check_backend
        from sleepwake.errors import InvalidRequestError

        try:
            backend = check_backend(getattr(self.args, "backend", None))
        except InvalidRequestError as exc:
            raise UsageError(f"--backend {self.args.backend}: {exc}") from None
        if backend == "mlx":
            for option in ("quantize", "device", "device_map"):
                value = getattr(self.args, option, None)
                if value is not None and (value != "auto" or option == "device_map"):
                    raise UsageError(f"--{option.replace('_', '-')} is for the torch backend; --backend mlx loads "
                                     "float32 on MLX's own device (Metal, or the CPU)")
        return backend

    def device(self) -> Any:
        """--device as a torch device; CUDA without a GPU is a usage error, before anything loads."""
        from sleepwake.errors import InvalidRequestError
        from sleepwake.models import resolve_device

        try:
            return resolve_device(self.args.device or "auto")
        except InvalidRequestError as exc:
            raise UsageError(f"--device {self.args.device}: {exc}") from None

    def device_map(self) -> Any:
        """--device-map as `from_pretrained` takes it (a strategy, or a JSON object of module
        names to devices), not with a --device other than auto; else a usage error, before
        anything loads."""
        from sleepwake.errors import InvalidRequestError
        from sleepwake.placement import check_device_map

        value = getattr(self.args, "device_map", None)
        if value is None:
            return None
        if self.args.device not in (None, "auto"):
            raise UsageError(f"--device {self.args.device} and --device-map {value}: give one of them "
                             "(a device map places every part of the model)")
        try:
            return check_device_map(json.loads(value) if value.lstrip().startswith("{") else value)
        except (InvalidRequestError, ValueError) as exc:
            raise UsageError(f"--device-map {value}: {exc}") from None

    def quantize(self) -> str | None:
        """--quantize, with bitsandbytes importable; else a usage error, before anything loads."""
        from sleepwake.errors import InvalidRequestError
        from sleepwake.quantize import check_scheme

        try:
            return check_scheme(self.args.quantize)
        except InvalidRequestError as exc:
            raise UsageError(f"--quantize {self.args.quantize}: {exc}") from None

    def store(self) -> Any:
        """The memory ledger alone, read-only, without loading the model's weights (fast):
        it changes nothing, and works beside a process that holds the home.

        The model is still resolved and fingerprinted, so a wrong --model or a home
        that belongs to another model is reported as it would be by `memory()`.
        """
        self._quiet_libraries()
        from sleepwake.sources import fingerprint, resolve_model
        from sleepwake.store import Store

        source = resolve_model(self.args.model)
        return Store(self.home, fingerprint(source, self.args.quantize), source.name, read_only=True)
