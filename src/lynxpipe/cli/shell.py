"""How the CLI meets the terminal: every failure is one `error:` line with exit code 2 (130 for
Ctrl-C), usage errors included; `--version`; help without a type beside every flag.

click and typer print usage errors as a boxed, multi-line panel and let unexpected exceptions
out as tracebacks. `LynxGroup.main` runs the command non-standalone and turns whatever comes
out into the one-line contract; a traceback is shown only with LYNXPIPE_DEBUG set.
"""

from __future__ import annotations

import os
import sys
import traceback
from importlib import metadata
from typing import Any

import click
import typer
from typer.core import TyperGroup, TyperOption

from lynxpipe.errors import DEBUG_ENV, LynxError


def print_error(message: str) -> None:
    """One red line on stderr, however many lines the message had."""
    typer.secho(f"error: {' '.join(str(message).split())}", fg="red", err=True)


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    try:
        return metadata.version("lynxpipe")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# typer >= 0.2x vendors click (`typer._click`): its usage errors derive from TyperException,
# older typer raises click's own
_USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException",
                                                      click.ClickException)})
_ABORTS = tuple({click.Abort, typer.Abort})


def _usage_line(exc: Exception) -> str:
    """A usage error as one line, naming the command and pointing at its --help."""
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    return f"{message}{where}"


class LynxGroup(TyperGroup):
    """The top-level command group, with the one-line error contract."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Run a command; in standalone mode map every outcome to an exit code."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _ABORTS:
            print_error("aborted")
            code = 130
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                code = 0  # the help was printed: what a bare command asks for
            else:
                print_error(_usage_line(exc))
                code = 2
        except LynxError as exc:
            print_error(str(exc))
            code = exc.exit_code
        except KeyboardInterrupt:
            print_error("interrupted")
            code = 130
        except Exception as exc:  # noqa: BLE001 - a bug: still one line, the trace on request
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            print_error(f"internal error ({type(exc).__name__}: {exc}); this is a bug in "
                        f"lynxpipe: please report it with the command line "
                        f"({DEBUG_ENV}=1 shows the traceback)")
            code = 70
        sys.exit(code if isinstance(code, int) else 0)


def _no_type_for_flags(self: TyperOption, ctx: click.Context) -> str | None:
    # typer 0.2x renders `<bool>` beside every on/off flag, which takes no value: show none
    if self.is_flag:
        return None
    return _display_type(self, ctx)  # type: ignore[misc]


_display_type = getattr(TyperOption, "display_type_rich", None)
if _display_type is not None:
    TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign]


def version_callback(value: bool) -> None:
    """`--version`: print it and stop."""
    if value:
        typer.echo(f"lynxpipe {version()}")
        raise typer.Exit()
