"""What every ``workbench`` command prints through: the console, and one way to report an error.

Errors a user can cause (:class:`~workbench.errors.WorkbenchError`, and the kernels'
:class:`~kernels.errors.AttentionInputError`) end a command with ``error: <message>`` on
standard error and exit status 2, never with a traceback. The message is printed unwrapped, so
it reads the same (and tests can find it) whatever the terminal's width or the paths' length.
"""

from __future__ import annotations

import functools
from typing import Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from kernels.errors import AttentionInputError
from workbench.errors import WorkbenchError

#: Errors a user can cause; commands decorated with :func:`reports_errors` print them.
USER_ERRORS = (WorkbenchError, AttentionInputError)

console = Console()
_stderr = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable)


def fail(message: object) -> NoReturn:
    """Print ``error: message`` to standard error (unwrapped) and exit with status 2."""
    _stderr.print(f"[red]error:[/red] {escape(str(message))}")
    raise typer.Exit(2)


def reports_errors(command: F) -> F:
    """Decorate a CLI command so that the errors in :data:`USER_ERRORS` end it through
    :func:`fail` (typer reads the wrapped function's signature, so options keep working)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            fail(exc)

    return wrapper  # type: ignore[return-value]
