"""Turn a dotted name from a config into a Python object, only from allowlisted modules.

Why: a config that may name any importable object (`os.system`,
`subprocess.Popen`) is a way to run arbitrary code from a YAML file someone
sent you. A config names a class or function only where a field says so, and
that field resolves it here: the name must lie under one of the field's
allowlisted modules *before anything is imported*, contain no private
(`_`-prefixed) part, and resolve to an object of the expected kind.

Limitations:
1. Only module attributes (`pkg.mod.Name`), never nested attributes
   (`pkg.mod.Class.method`).
2. Importing an allowlisted module runs that module's import-time code; the
   allowlist is what makes that acceptable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from rlsync.errors import ConfigError


def resolve_allowed(name: str, *, key: str, modules: Sequence[str], check: Callable[[Any], bool] | None = None,
                    kind: str = "object") -> Any:
    """The object `name` (e.g. `torch.optim.AdamW`) if it lives directly in one of `modules`.

    `key` is the config key for error messages; `check` (e.g. "is an Optimizer
    subclass") must accept the object, `kind` describes it in the error.
    """
    allowed = ", ".join(modules)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: expected a dotted name under {allowed}, got {name!r}")
    module_name, _, attr = name.rpartition(".")
    parts = name.split(".")
    if not module_name or any(not p.isidentifier() or p.startswith("_") for p in parts):
        raise ConfigError(f"{key}: {name!r} is not a public dotted name like {modules[0]}.Name")
    if module_name not in modules:
        raise ConfigError(f"{key}: {name!r} is not allowed; a config may only name objects in {allowed}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name}: {exc}") from exc
    if not hasattr(module, attr):
        raise ConfigError(f"{key}: {module_name} has no {attr!r}")
    obj = getattr(module, attr)
    if check is not None and not check(obj):
        raise ConfigError(f"{key}: {name} is not a {kind}")
    return obj
