"""Errors a user can cause. The UI shows their message as is, never a traceback."""


class UserError(Exception):
    """A problem with what the user asked for; the message is one clear sentence."""


class ModelLoadError(UserError):
    """A model source that cannot be resolved or loaded."""


class RuntimeUnavailable(UserError):
    """A runtime the user asked for cannot run here; the message says why."""
