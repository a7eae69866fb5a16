"""Installing the course into a live Colab kernel without breaking it.

Colab's runtime already holds torch (a CUDA build), numpy, pandas, matplotlib, pyarrow and the
kernel itself (ipykernel, ipython, tornado, pyzmq, jupyter-client). Replacing any of those
under a running kernel can crash it, so the lessons' setup cell installs
``requirements-colab.txt`` (only what the lessons import beyond Colab's stack; a test lints
it) instead of ``requirements.txt`` (the full local/CI environment). A package that was
already imported and changed on disk keeps running its old code until the runtime restarts,
so the cell compares versions before and after and asks for a restart only then::

    before = installed_versions()
    %pip install -q -r requirements-colab.txt
    print(restart_notice(before))
"""

from __future__ import annotations

import sys
from importlib import metadata


def installed_versions() -> dict[str, str]:
    """``{distribution: version}`` for every distribution with a module imported in this process."""
    imported = {name.partition(".")[0] for name in list(sys.modules)}
    versions = {}
    for module, distributions in metadata.packages_distributions().items():  # top-level module -> its dists
        if module in imported:
            for dist in distributions:
                try:
                    versions[dist] = metadata.version(dist)
                except metadata.PackageNotFoundError:
                    pass
    return versions


def changed_since(before: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Imported distributions whose installed version differs from ``before``: ``{name: (old, new)}``."""
    changed = {}
    for name, old in before.items():
        try:
            new = metadata.version(name)
        except metadata.PackageNotFoundError:
            new = "removed"
        if new != old:
            changed[name] = (old, new)
    return changed


def restart_notice(before: dict[str, str]) -> str:
    """What to tell the learner after the install: restart only if an imported package changed."""
    changed = changed_since(before)
    if not changed:
        return "Set-up done: nothing this kernel had imported changed, no restart needed."
    listed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in sorted(changed.items()))
    return (f"RESTART NEEDED: the install changed packages this kernel had already imported ({listed}). "
            "Runtime > Restart session, then run the notebook again from the top (the install is then a no-op).")
