"""``--config`` files checked before any parser reads them: jsonargparse names the line of a malformed YAML
file but not the file ("<unicode string>"); these checks name both, in one line."""

from __future__ import annotations

from pathlib import Path

import yaml

#: the options that name a YAML file of options (LightningCLI's ``-c`` too)
CONFIG_OPTIONS = ("--config", "-c")


def config_files(argv: list[str]) -> list[str]:
    """The values of ``--config``/``-c`` (also ``--config=FILE``) in ``argv``, in order."""
    values = []
    for i, arg in enumerate(argv):
        if arg in CONFIG_OPTIONS and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_file(path: Path, option: str = "--config") -> None:
    """Parses ``path`` as YAML.

    Raises:
        ValueError: it is not valid YAML, or not a mapping of options; the message names the file, the
            line and column, and the problem.
    """
    try:
        loaded = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {str(path)!r} is not a text (YAML) file: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = str(err.problem or err.context)
        if err.context and err.problem and err.context_mark is not None:
            what += f" ({err.context} started at line {err.context_mark.line + 1})"
        raise ValueError(
            f"{option} {str(path)!r}: malformed YAML{where}: {what}; fix that line of the file"
        ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{option} {str(path)!r}: malformed YAML: {' '.join(str(err).split())}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(
            f"{option} {str(path)!r} holds a YAML {type(loaded).__name__}, not a mapping of options "
            "such as 'trainer: {max_steps: 100}'"
        )


def check_config_files(argv: list[str]) -> None:
    """:func:`check_config_file` on every ``--config`` of ``argv`` that is an existing file (a value that is
    no file, e.g. an inline YAML string, is left to the parser)."""
    for value in config_files(argv):
        path = Path(value).expanduser()
        if path.is_file():
            check_config_file(path)
