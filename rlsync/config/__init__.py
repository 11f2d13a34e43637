"""Typed configs from YAML: dataclass trees, strict keys, `key=value` overrides.

Owns: the loader, the allowlist of names a config may give, and the shipped
configs by name (`shipped`: `rlsync ls`, `rlsync run NAME`). May import:
`rlsync.errors` only; each component's config dataclass lives with its component.
"""

from rlsync.config.loader import apply_overrides, from_dict, load_config, parse_overrides, to_dict

__all__ = ["apply_overrides", "from_dict", "load_config", "parse_overrides", "to_dict"]
