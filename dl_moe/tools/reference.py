"""Reference tables generated from the code, for the documentation site.

`mkdocs_hooks.py` replaces markers in the docs pages with these, so the configuration
and command-line references are rebuilt from the dataclasses and the argparse parsers
on every `make docs` and cannot drift from them.
"""

import contextlib
import dataclasses
import io
import os
import re

_ENTRY = re.compile(r"^(\w+):\s*(.*)$")


def field_docs(cls):
    """`{field: description}` from the `Attributes:` section of a class docstring.

    Args:
        cls: A class whose Google-style docstring has an `Attributes:` section.

    Returns:
        A dict of one-line descriptions (continuation lines joined).
    """
    lines = (cls.__doc__ or "").splitlines()
    docs, current, indent = {}, None, None
    in_section = False
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            in_section, indent = True, None
            continue
        if not in_section or not stripped:
            continue
        width = len(line) - len(line.lstrip())
        match = _ENTRY.match(stripped)
        if indent is None and match:
            indent = width
        if indent is None or width < indent:
            # Prose between groups of fields ("Router-specific fields ..."): not a field.
            current, indent = None, None
            continue
        if width == indent and match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] += " " + stripped
    return docs


def _default(field):
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return f"{field.default_factory.__name__}()"
    return "required"


def config_reference_markdown():
    """One Markdown table per config class: field, default (read from the code), meaning."""
    from dl_moe.config import ExpertConfig, GatingConfig, MoEConfig

    parts = []
    for cls in (MoEConfig, ExpertConfig, GatingConfig):
        docs = field_docs(cls)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        rows = ["| field | default | meaning |", "|---|---|---|"]
        for field in dataclasses.fields(cls):
            meaning = docs.get(field.name, "").replace("|", "\\|")
            rows.append(f"| `{field.name}` | `{_default(field)}` | {meaning} |")
        parts.append(f"### `{cls.__name__}`\n\n{summary}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def _help_text(parser_or_main, argv=None):
    """The `--help` output of an argparse parser, or of a `main(argv)` that prints it."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"
    try:
        if argv is None:
            return parser_or_main.format_help()
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parser_or_main(argv)
        return out.getvalue()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def cli_reference_markdown():
    """`dl-moe --help` and the `--help` of every subcommand, as Markdown."""
    from dl_moe.tools import cli

    parser = cli._parser()
    sections = [("dl-moe", _help_text(parser))]
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subparsers.choices.items():
        if name == "bench":  # the benchmark owns its options
            from dl_moe.tools.bench import main as bench_main

            sections.append(("dl-moe bench", _help_text(bench_main, ["--help"])))
        else:
            sections.append((f"dl-moe {name}", _help_text(sub)))
    return "\n\n".join(f"### `{title}`\n\n```text\n{text.rstrip()}\n```" for title, text in sections) + "\n"
