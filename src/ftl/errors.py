"""Errors that speak the user's language: where (file, key, line) and what was expected."""


class FtlError(Exception):
    """Base for every error ftl reports to a user without a traceback."""


class RecipeError(FtlError):
    """A recipe file, profile or override is invalid."""


class DataError(FtlError):
    """A data source or one of its rows is invalid."""


class LaunchError(FtlError):
    """A launch would not run as asked (wrong world size, missing launcher, ...)."""
