"""What every ``workbench`` command shares: the console, one way to report an error, and one
parser of comma-separated option values.

Errors a user can cause (:class:`~workbench.errors.WorkbenchError`, and the kernels'
:class:`~kernels.errors.AttentionInputError`) end a command with ``error: <message>`` on
standard error and exit status 2, never with a traceback. The message is printed unwrapped, so
it reads the same (and tests can find it) whatever the terminal's width or the paths' length.
Command-line usage errors (an option value that is not a number or out of its range, an
unknown option) print the same way, through :class:`ReportingGroup`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from kernels.errors import AttentionInputError
from workbench.errors import WorkbenchError

#: Errors a user can cause; commands decorated with :func:`reports_errors` print them.
USER_ERRORS = (WorkbenchError, AttentionInputError)

console = Console()
_stderr = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable)
T = TypeVar("T")


def fail(message: object) -> NoReturn:
    """Print ``error: message`` to standard error (unwrapped) and exit with status 2."""
    _stderr.print(f"[red]error:[/red] {escape(str(message))}")
    raise typer.Exit(2)


def check_output_folder(path: Path | None, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be one: ``path`` or its nearest
    existing parent is a file (:class:`WorkbenchError`)."""
    if path is None:
        return
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                inside = "" if folder == path else f" (in {option} {path})"
                raise WorkbenchError(f"{folder}{inside} is a file, not a folder: choose another {option}")
            return


def parse_list(
    text: str | None, item: Callable[[str], T] = str, option: str = "the option", kind: str = "values"
) -> tuple[T, ...]:
    """``"a, b,c"`` -> ``(item("a"), item("b"), item("c"))`` (empty items are skipped; ``None``
    gives ``()``). A value ``item`` refuses with ``ValueError`` raises :class:`WorkbenchError`:
    ``<option> must be comma-separated <kind>, got '<text>'``."""
    parts = [t.strip() for t in (text or "").split(",") if t.strip()]
    try:
        return tuple(item(t) for t in parts)
    except ValueError:
        raise WorkbenchError(f"{option} must be comma-separated {kind}, got {text!r}") from None


def token_count(text: str) -> int:
    """``"512"`` -> 512, ``"16k"`` -> 16384 (k = 1024); ``ValueError`` for anything else."""
    return int(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)


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


#: click's usage error as typer raises it (typer 0.29 vendors its own copy of click).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class ReportingGroup(TyperGroup):
    """A typer command group whose usage errors, in its own options or in any subcommand's,
    end like every other user error: ``error: <message> (see `<command> --help`)``, unwrapped,
    exit status 2 (typer would draw a box that wraps at the terminal's width)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        with _usage_errors_reported():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        with _usage_errors_reported():
            return super().invoke(ctx)


@contextmanager
def _usage_errors_reported() -> Iterator[None]:
    try:
        yield
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group or command: its help, as usual
            raise
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        fail(f"{exc.format_message()}{where}")
