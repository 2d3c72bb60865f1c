"""What every command line (`python -m lapflow_jax.main`, `.latents`, `.data.image_folder`) shares.

- Paths: `~` and relative paths in path flags and config fields become absolute once, at the
  entry point, against the directory the command runs in (Orbax refuses relative checkpoint
  paths, and a relative path would also change meaning in any code that changes directory).
  URLs (gs://, s3://, ...) and empty values are left as they are.
- Console: the run's own lines (progress, ETA, where files went) and every warning; other
  libraries' INFO lines (Orbax, absl, JAX, tfds) only with --verbose or absl's --verbosity / -v.
- Errors: a bad config, path or dataset ends with its message on one line and exit status 1;
  --verbose shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
import sys
from typing import Callable

import ml_collections
from absl import flags
from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Config fields naming a local or remote file or folder ("" = unset). tests/test_cli.py checks
# that every field of base_config() and configs/*.py named like a path is listed here.
CONFIG_PATH_FIELDS = (
    "data.data_dir", "data.folder", "data.latents_dir",
    "latent.autoencoder",
    "latent.source.data_dir", "latent.source.folder", "latent.source.latents_dir",
    "eval.reference_npz", "eval.fid_stats", "eval.inception_weights", "eval.samples_npz",
    "upsample.input",
)

VERBOSE_HELP = ("Show other libraries' INFO lines (Orbax, absl, JAX, tfds) and the full traceback of "
                "a bad config, path or dataset.")


def resolve_path(path: str | os.PathLike) -> str:
    """`~` and relative local paths -> absolute, against the current directory.

    "" stays "" (unset), and URLs (gs://bucket/x, any scheme://) are returned unchanged.
    """
    path = os.fspath(path)
    if not path or _URL.match(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
    """Makes every CONFIG_PATH_FIELDS entry of `config` absolute, in place.

    Fields a config does not have are skipped. Returns {field: (before, after)} of the changed ones.
    """
    changed = {}
    for field in CONFIG_PATH_FIELDS:
        *parents, name = field.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or not isinstance(node.get(name), str):
            continue
        before = node[name]
        after = resolve_path(before)
        if after != before:
            node[name] = after
            changed[field] = (before, after)
    return changed


# --------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------


def define_verbose_flag() -> None:
    """Defines the absl flag --verbose (once; the absl command lines call this at import)."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


class _OwnInfoOnly(logging.Filter):
    """Passes warnings and errors of any logger, INFO and below only from this package's code."""

    def filter(self, record: logging.LogRecord) -> bool:
        # absl's logger reports the calling file (it skips its own frames), so records logged
        # through absl.logging by Orbax and by us are told apart by where they come from.
        return record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE_DIR + os.sep)


_FILTER = _OwnInfoOnly()


def setup_console(verbose: bool) -> None:
    """Console lines: ours and every warning; everyone's INFO too when `verbose`.

    Inside an absl app an explicit --verbosity / -v counts as verbose: the person chose a level.
    Outside one (argparse command lines) INFO lines go to stderr in absl's format.
    """
    handler = absl_logging.get_absl_handler()
    if handler not in logging.root.handlers:
        handler = next((h for h in logging.root.handlers if getattr(h, "_lapflow_console", False)), None)
        if handler is None:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(absl_logging.PythonFormatter())
            handler._lapflow_console = True  # pylint: disable=protected-access
            logging.root.addHandler(handler)
        logging.root.setLevel(logging.INFO)
        absl_logging.get_absl_logger().setLevel(logging.NOTSET)
    elif "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        verbose = True
    if verbose:
        handler.removeFilter(_FILTER)
    else:
        handler.addFilter(_FILTER)


def is_verbose() -> bool:
    return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and bool(flags.FLAGS.verbose)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a bad config, path, dataset or weights file, with a clear message.

    Config and data checks raise ValueError (IncompatibleCheckpointError, TooManyBadRecordsError
    and BadRecordError are ValueErrors); missing files FileNotFoundError; missing packages
    ImportError. The project's other
    classes are looked up only if their module was imported (an error cannot be of a class that
    was never loaded), so that a command line never imports JAX just to report an error.
    """
    errors = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
              pickle.UnpicklingError,  # evaluation.torch_weights.UnsafeCheckpointError
              ImportError]  # a missing optional package; evaluate.py's name the extra that brings it
    for module, name in (("lapflow_jax.checkpoint", "CheckpointSaveError"), ("lapflow_jax.train", "NonFiniteError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def error_message(error: BaseException) -> str:
    """"<ErrorClass>: <message> (rerun with --verbose for the traceback)": the class says what kind
    of problem (e.g. IncompatibleCheckpointError, TooManyBadRecordsError), the message the rest."""
    return f"{type(error).__name__}: {error} (rerun with --verbose for the traceback)"


def one_line_errors(main: Callable[..., object], verbose: Callable[[], bool] = is_verbose):
    """Wraps a command line's main: a user error prints error_message() to stderr and returns 1.

    Anything else (a bug) keeps its traceback; so does every error when verbose() is true.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:  # pylint: disable=broad-except
            if verbose() or not isinstance(e, _user_errors()):
                raise
            absl_logging.flush()
            print(error_message(e), file=sys.stderr, flush=True)
            return 1

    return wrapped


def _innermost_message(error: BaseException) -> str:
    """The text of the innermost wrapped error, on one line (ml_collections wraps a KeyError, whose
    message holds a newline, in an AttributeError)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for app.run(main, flags_parser=parse_flags): a --config.<field> override
    that names no field (or has a value of the wrong type) ends with one line and exit status 1,
    before main runs, instead of ml_collections' traceback; --verbose among the arguments keeps it."""
    from absl import app  # pylint: disable=import-outside-toplevel

    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if any(arg in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for arg in argv[1:]):
            raise
        print(f"Bad --config override: {_innermost_message(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
