"""Package discovery from the source tree (the rest of the metadata is in pyproject.toml).

Every folder with an ``__init__.py`` under fedtune/, server/ and client/ is a package; server/
and client/ install as ``fedtune.server`` and ``fedtune.client`` (the folder mapping is
``[tool.setuptools.package-dir]`` in pyproject.toml), never as top-level ``server`` / ``client``.
"""

from setuptools import find_packages, setup

MAPPED = {"server": "fedtune.server", "client": "fedtune.client"}


def packages() -> list[str]:
    found = find_packages(".", include=["fedtune", "fedtune.*"])
    for folder, name in MAPPED.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


setup(packages=packages())
