"""Errors and control-flow signals.

Errors say what went wrong, where, and what to do. Control flow that is not an error (stop, cancel)
derives from ``BaseException`` so that no component's ``except Exception`` can swallow it.
"""

from __future__ import annotations


class ElkscanError(Exception):
    """Base of every error elkscan reports to a user (one line, no traceback unless -v)."""


class ConfigError(ElkscanError):
    """A pipeline or component configuration is invalid.

    ``where`` is the YAML path (``engines[1].with.timeout``) and ``hint`` the fix, when known.
    """

    def __init__(self, message: str, where: str = "", hint: str = "") -> None:
        self.message, self.where, self.hint = message, where, hint
        text = f"{where}: {message}" if where else message
        super().__init__(f"{text} ({hint})" if hint else text)


class PluginError(ElkscanError):
    """An allowed plugin is missing, fails to import, or clashes with another one."""


class ComponentError(ElkscanError):
    """A component could not start (for example its engine library or daemon is missing)."""


class Stop(BaseException):
    """Raised inside a source or worker to end the session in an orderly way."""


class Cancelled(BaseException):
    """A job (e.g. a timed-out full-disk task) was cancelled; its remaining targets are dropped."""
