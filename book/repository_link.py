"""The repository button and the Binder/Colab launch buttons, only for an address that exists.

The book does not write its address down (a written one goes stale or, before publication, points
nowhere). It is read when the site is built: ``$PATCHCORE_BOOK_REPOSITORY`` if a publisher sets it,
else the checkout's ``git remote get-url origin``. Only a GitHub repository counts, because Binder and
Colab open notebooks from GitHub; an SSH remote is turned into its https address. Without one the
site has neither button: sphinx-book-theme would link every page to whatever ``repository_url`` says.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

ENV = "PATCHCORE_BOOK_REPOSITORY"
GITHUB = re.compile(r"(?:https://|ssh://git@|git@)github\.com[/:]([\w.-]+)/([\w.-]+?)(?:\.git)?/?")


def github_address(remote: str) -> str | None:
    """``https://github.com/owner/name`` for a GitHub remote (https or SSH form), else None."""
    match = GITHUB.fullmatch(remote.strip())
    return f"https://github.com/{match[1]}/{match[2]}" if match else None


def origin(folder: Path) -> str:
    """The checkout's ``origin`` remote, or "" outside a git checkout or without one."""
    try:
        return subprocess.run(["git", "remote", "get-url", "origin"], cwd=folder, capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def book_address(folder: Path) -> str | None:
    """The publisher's setting first, then the git remote."""
    return github_address(os.environ.get(ENV) or origin(folder))


def link_repository(app: Sphinx, config: Config) -> None:
    """Turn the buttons on for a real address; otherwise drop the launch menu (it needs one)."""
    options = config.html_theme_options
    address = book_address(Path(app.confdir))
    if address:
        options.update(repository_url=address, use_repository_button=True)
    else:
        options.pop("launch_buttons", None)
        options.pop("repository_url", None)
        options["use_repository_button"] = False


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", link_repository, priority=400)  # before the theme reads its options
    return {"parallel_read_safe": True, "parallel_write_safe": True}
