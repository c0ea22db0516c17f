"""The command line: a thin layer over the library. Each subcommand lives in gguf_experts/commands/<name>.py
(the command ``check-overlaps`` in ``check_overlaps.py``) and exposes NAME, HELP, ORDER, add_arguments(parser)
and run(args) -> int; they are discovered by file name, not listed here.

Only the module of the command being run is imported (start-up is paid on every call, often in a loop over
shards); the overview (``--help``, no command, or an unknown one) imports them all for their HELP and ORDER.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import pkgutil
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Protocol, Sequence, cast

from . import __version__
from .errors import GGUFExpertsError

PROG = "gguf-experts"


class Command(Protocol):
    """What a module of gguf_experts/commands/ is (mypy checks every one against it, see _REGISTRY below).
    Optional: ``ORDER: int`` (place in the overview, default 100) and ``DESCRIPTION: str`` (--help text)."""

    NAME: str  # the command name: the file name with - for _
    HELP: str  # one line for the overview

    def add_arguments(self, parser: argparse.ArgumentParser, /) -> None: ...

    def run(self, args: argparse.Namespace, /) -> int: ...


if TYPE_CHECKING:  # for mypy only: commands are imported one at a time at run time (start-up is paid per call);
    # tests/test_architecture.py checks that this lists every file in gguf_experts/commands/.
    from .commands import (
        cache_sim, capture, check_overlaps, convert, demo, diff, dump, forecast, join_trace, make_model, pin, pins,
        profile, prune, report, reuse, run, stats,
    )

    _REGISTRY: tuple[Command, ...] = (
        cache_sim, capture, check_overlaps, convert, demo, diff, dump, forecast, join_trace, make_model, pin, pins,
        profile, prune, report, reuse, run, stats,
    )


def command_modules() -> dict[str, str]:
    """Command name -> module name, from the files in gguf_experts/commands/ (nothing is imported)."""
    from . import commands

    return {info.name.replace("_", "-"): f"{commands.__name__}.{info.name}"
            for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")}


def _load(module: str) -> Command:
    return cast(Command, importlib.import_module(module))  # each is checked by mypy through _REGISTRY


def _commands(argv: Sequence[str]) -> list[Command]:
    """The command modules the parser needs: the one named first in argv, else all of them (sorted)."""
    names = command_modules()
    if argv and argv[0] in names:
        return [_load(names[argv[0]])]
    mods = [_load(m) for m in names.values()]
    mods.sort(key=lambda m: getattr(m, "ORDER", 100))
    return mods


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad option is one line on stderr (what, where, what to do) and exit 2, like
    every other bad input; --help still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        sys.exit(2)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for argv (default sys.argv[1:]): every command's only when argv names none."""
    parser = Parser(
        prog=PROG,
        description="Where every expert of a MoE GGUF lives, which experts a real llama.cpp run touches, "
        "and what that costs in bytes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for mod in _commands(sys.argv[1:] if argv is None else argv):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def error(msg: str) -> int:
    sys.stderr.write(f"{PROG}: error: {msg}\n")
    return 2


def run_reporting_warnings(fn: Callable[[], Any]) -> Any:
    """Run fn; each gguf-experts warning it raises (a recovered trace, another quantization) becomes one
    line on stderr, even when fn fails; other packages' warnings go on to Python's usual handling."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return fn()
    finally:  # outside the recording context: re-emitting inside it would append to `caught` forever
        for w in caught:
            if w.category.__module__.startswith("gguf_experts"):
                sys.stderr.write(f"{PROG}: warning: {w.message}\n")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


_AT_EXIT: list[Callable[[], None]] = []


def _close_llama_devnull() -> None:
    """llama-cpp-python opens /dev/null twice at import and never closes it; once warning filters have been
    touched (run_reporting_warnings), interpreter shutdown prints two 'ResourceWarning: unclosed file' lines
    after our output. Close them at exit (registered with atexit), when nothing can use them any more."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        fh = getattr(utils, name, None)
        if fh is not None and hasattr(fh, "close"):
            fh.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)  # a bad option: one line and SystemExit(2) (Parser.error)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # a command may re-run itself (capture --paging)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    if _close_llama_devnull not in _AT_EXIT:
        _AT_EXIT.append(_close_llama_devnull)
        atexit.register(_close_llama_devnull)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(run_reporting_warnings(lambda: args._run(args)) or 0)
    except GGUFExpertsError as e:
        return error(str(e))
    except FileNotFoundError as e:
        return error(f"{e.filename}: no such file; check the path")
    except IsADirectoryError as e:
        return error(f"{e.filename}: is a directory, expected a file")
    except PermissionError as e:
        return error(f"{e.filename}: permission denied")
    except BrokenPipeError:
        return 0
    except OSError as e:  # a failed write (disk full, I/O error): the output was not replaced
        where = f"{e.filename}: " if e.filename else ""
        return error(f"{where}{e.strerror or e}; nothing was replaced")
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
