"""mkdocs hook: fills the generated reference sections of the docs pages.

`<!-- dl_moe:config-reference -->` becomes the configuration tables (fields, defaults
and docstrings read from the dataclasses) and `<!-- dl_moe:cli-reference -->` the
`--help` of every `dl-moe` subcommand (read from the argparse parsers).
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
MARKERS = {
    "<!-- dl_moe:config-reference -->": "config_reference_markdown",
    "<!-- dl_moe:cli-reference -->": "cli_reference_markdown",
}


def on_config(config):
    # The package of this checkout (mkdocs restores sys.path after loading hooks).
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return config


def on_page_markdown(markdown, page, config, files):
    if not any(marker in markdown for marker in MARKERS):
        return markdown
    from dl_moe.tools import reference

    for marker, function in MARKERS.items():
        markdown = markdown.replace(marker, getattr(reference, function)())
    return markdown
