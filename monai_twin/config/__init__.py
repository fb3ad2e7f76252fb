from __future__ import annotations

from .deviceconfig import get_config_values, get_optional_config_values, print_config

__all__ = ["get_config_values", "get_optional_config_values", "print_config"]
