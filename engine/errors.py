"""Errors a user can cause. The UI shows their message as is, never a traceback."""


class UserError(Exception):
    """A problem with what the user asked for; the message is one clear sentence."""


class ModelLoadError(UserError):
    """A model source that cannot be resolved or loaded."""


class RuntimeUnavailable(UserError):
    """A runtime the user asked for cannot run here; the message says why."""


def one_line(e: BaseException) -> str:
    """An exception as one line of at most ~300 characters, for a message that wraps it."""
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)
