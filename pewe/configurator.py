"""The one configurator: an entry script's tunables are the plain assignments at its top, each with a
one-line comment; the command line overrides them.

Accepted forms: ``--key=value``, ``--key value``, ``--key v1 v2 ...`` (list tunables, also
``--key=v1,v2``), a bare ``--flag`` (bool tunables). A value takes the type of its default; an int
default accepts a float; a ``None`` default takes a Python literal or else the string. Unknown keys
are refused with the closest known names.
"""
from __future__ import annotations

import ast
import difflib
import io
import sys
import tokenize
from types import SimpleNamespace

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(SystemExit):
    """Bad command line; exits with status 2 and the message."""

    def __init__(self, msg):
        super().__init__(2)
        self.msg = msg

    def __str__(self):
        return self.msg


def script_tunables(source: str) -> dict:
    """{name: comment} for the top-level ``name = value  # comment`` lines of a script, in order,
    up to its first function, class or ``if`` statement."""
    tree = ast.parse(source)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.AsyncFunctionDef)):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if not name.startswith("_") and not name.isupper():
                out[name] = comments.get(node.lineno, "")
    return out


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def convert(name, text, default):
    """``text`` as the type of ``default``."""
    try:
        if isinstance(default, bool):
            low = str(text).lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if isinstance(default, int):
            value = _literal(text)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            return value
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (list, tuple)):
            items = text if isinstance(text, list) else [t for t in str(text).split(",") if t != ""]
            proto = default[0] if default else None
            return [convert(name, t, proto) if proto is not None else _literal(t) for t in items]
        if default is None:
            return None if text in ("None", "none", "") else _literal(text)
        return str(text)
    except ValueError:
        kind = type(default).__name__
        raise ConfigError(f"--{name}: {text!r} is not a valid {kind} (default {default!r})") from None


def parse_overrides(defaults: dict, argv) -> dict:
    """The overridden values among ``defaults`` from ``argv``."""
    out, i, argv = {}, 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: use --name=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint}")
        default = defaults[key]
        i += 1
        if not eq:
            values = []
            while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2 and not _is_number(argv[i])):
                values.append(argv[i])
                i += 1
            if isinstance(default, (list, tuple)):
                value = values
            elif not values:
                if not isinstance(default, bool):
                    raise ConfigError(f"--{key} needs a value")
                value = "true"
            elif len(values) == 1:
                value = values[0]
            else:
                raise ConfigError(f"--{key} takes one value, got {values}")
        out[key] = convert(key, value, default)
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def with_defaults(defaults: dict, given: dict, error=ValueError, what="option") -> dict:
    """``defaults`` updated with ``given``; a name that is not among the defaults is refused."""
    out = dict(defaults)
    for k, v in given.items():
        if k not in defaults:
            raise error(f"unknown {what} {k!r}; expected one of {', '.join(defaults)}")
        out[k] = v
    return out


def help_text(prog, tunables: dict, defaults: dict) -> str:
    width = max(len(k) for k in tunables) + 2
    lines = [f"usage: {prog} [--name=value ...]", "", "options (default, meaning):"]
    for k, comment in tunables.items():
        lines.append(f"  --{k:<{width}} {defaults[k]!r}  {comment}")
    return "\n".join(lines)


def configure(script_globals: dict, script_file, argv=None) -> SimpleNamespace:
    """Read the tunables at the top of ``script_file``, apply ``argv`` (default ``sys.argv[1:]``)
    and return them as a namespace. ``--help`` prints them with their comments and exits."""
    argv = sys.argv[1:] if argv is None else argv
    with open(script_file, encoding="utf-8") as f:
        tunables = script_tunables(f.read())
    defaults = {k: script_globals[k] for k in tunables}
    if "-h" in argv or "--help" in argv:
        print(help_text(script_file, tunables, defaults))
        raise SystemExit(0)
    try:
        values = {**defaults, **parse_overrides(defaults, argv)}
    except ConfigError as e:
        print(f"{script_file}: {e}", file=sys.stderr)
        raise
    return SimpleNamespace(**values)
