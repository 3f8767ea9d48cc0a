"""Turn (recipe, profile) into the launcher command that starts `python -m ftl run` on every rank."""
