"""Recipe schema, YAML loading, profiles, dotted overrides and validation errors."""

from ftl.config.load import load_recipe, redacted_dict, resolved_dict, save_resolved
from ftl.config.schema import Recipe

__all__ = ["Recipe", "load_recipe", "redacted_dict", "resolved_dict", "save_resolved"]
