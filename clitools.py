"""The one convention of the three command lines (dynamicid-curate, dynamicid-train, dynamicid-infer).

- Usage and input errors (a bad flag, a missing or unreadable file, a ValueError/OSError from the work): one
  line `error: ...` naming the flag or file, exit code 2. The work's messages name Python arguments
  (`image_encoder=DIR`); those of the command's own options are shown as its flags (`--image-encoder DIR`). Flags are checked by their Click types (`AtLeast`)
  while parsing, so before anything is loaded or written.
- Ctrl-C: one line saying how to resume (each command's `interrupted=` text), exit code 130; SIGTERM (`timeout`,
  `docker stop`, systemd, job schedulers) the same, exit code 143.
- Progress bars (`progress_options()`) redraw in place on a terminal; on a pipe or file each redraw is a line of
  its own, at most every `PIPED_PROGRESS_INTERVAL` seconds, so a log holds readable lines, not one long line.
- Anything else is a bug: one line, exit code 1; the traceback only with `--verbose`, which every command
  takes and which also lets the face libraries' native log lines through (`VERBOSE_ENV`).

Use `@click.group(cls=ToolGroup)`; its commands are `ToolCommand`s. Imports only Click, so it stays cheap.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

VERBOSE_ENV = "DYNAMICID_VERBOSE"  # "1": native library logs and tracebacks are shown (inherited by workers)
INPUT_ERRORS = (ValueError, OSError)  # raised by the work for bad input; anything else is a bug


PIPED_PROGRESS_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal


class LineWriter:
    """tqdm's redraws (`\\r` + bar + padding) as one line each, for a stderr that is not a terminal."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_options() -> dict[str, Any]:
    """Keyword arguments for tqdm (and diffusers' `set_progress_bar_config`): none on a terminal."""
    if sys.stderr.isatty():
        return {}
    return {"file": LineWriter(sys.stderr), "mininterval": PIPED_PROGRESS_INTERVAL}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def quiet_libraries() -> None:
    """Keep the terminal to the tool's own lines: library info logs off (MediaPipe's C++ start-up lines remain).
    Call before the model libraries are first used; diffusers and transformers are imported here."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


class InputError(click.ClickException):
    """A problem with the user's input: one line `error: ...`, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True)


class AtLeast(click.ParamType):
    """An int (or float) flag with a lower bound; the message names the flag: `--workers must be >= 1, got 0`."""

    def __init__(self, minimum: float, kind: type = int):
        self.minimum = minimum
        self.kind = kind
        self.name = "integer" if kind is int else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = (click.INT if self.kind is int else click.FLOAT).convert(value, param, ctx)
        if number < self.minimum:
            self.fail(f"must be >= {self.minimum}, got {number}", param, ctx)
        return number


def _usage_line(error: click.UsageError) -> str:
    param = error.param if isinstance(error, click.BadParameter) else None
    if param is not None and error.message and not isinstance(error, click.MissingParameter):
        flag = max(param.opts, key=len) if param.param_type_name == "option" else param.human_readable_name
        message = f"{flag} {error.message}" if error.message.startswith("must") else f"{flag}: {error.message}"
    else:
        message = error.format_message()
    command = error.ctx.command_path if error.ctx is not None else ""
    return f"{one_line(message)} (see {command} --help)"


def flags_for_arguments(message: str, command: click.Command | None) -> str:
    """`name=` of an API argument that is one of the command's options, as the option's flag: `image_encoder=DIR`
    -> `--image-encoder DIR` (the API names its arguments; a command line user knows the flags)."""
    for param in getattr(command, "params", ()):
        if isinstance(param, click.Option) and param.name:
            message = re.sub(rf"(?<![\w-]){param.name}=", f"{max(param.opts, key=len)} ", message)
    return message


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        os.environ[VERBOSE_ENV] = "1"


class ToolCommand(click.Command):
    """A command with `--verbose` and a line telling how to resume after Ctrl-C."""

    def __init__(self, *args: Any, interrupted: str = "nothing was finished; rerun the command", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.interrupted = interrupted
        self.params.append(
            click.Option(
                ["--verbose"],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_set_verbose,
                help="Show library log lines and the traceback of internal errors.",
            )
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same cleanup runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread for the block (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _close_progress_bars() -> None:
    """Bars an exception left open would redraw below its message when collected: finish them first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class ToolGroup(click.Group):
    """Runs its commands under the convention above."""

    command_class = ToolCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, InputError):
            _close_progress_bars()
            raise
        except click.UsageError as error:
            raise InputError(_usage_line(error)) from error
        except click.ClickException as error:
            _close_progress_bars()
            raise InputError(error.format_message()) from error
        except KeyboardInterrupt as error:
            _close_progress_bars()
            command = self.get_command(ctx, ctx.invoked_subcommand or "")
            what = "terminated" if isinstance(error, Terminated) else "interrupted"
            click.echo(f"{what}: {getattr(command, 'interrupted', 'rerun the command')}", err=True)
            ctx.exit(143 if isinstance(error, Terminated) else 130)
        except INPUT_ERRORS as error:
            _close_progress_bars()
            raise InputError(
                flags_for_arguments(str(error), self.get_command(ctx, ctx.invoked_subcommand or ""))
            ) from error
        except Exception as error:  # a bug: say so on one line, the traceback only when asked
            _close_progress_bars()
            if verbose():
                traceback.print_exc()
            click.echo(
                f"error: internal error {type(error).__name__}: {one_line(str(error))[:300]}"
                + ("" if verbose() else " (rerun with --verbose for the traceback)"),
                err=True,
            )
            ctx.exit(1)
