"""Typed configs from YAML: dataclass trees, strict keys, `key=value` overrides."""

from rlsync.config.loader import apply_overrides, from_dict, load_config, parse_overrides, to_dict

__all__ = ["apply_overrides", "from_dict", "load_config", "parse_overrides", "to_dict"]
