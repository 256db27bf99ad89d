"""The one build step pyproject.toml cannot declare: presets.toml lives at the repository root (where users look
for it) and is copied into the package when a wheel is built. Editable installs and source checkouts read the root
file itself (hybridprune/presets.py)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file("presets.toml", str(Path(self.build_lib) / "hybridprune" / "presets.toml"))


setup(cmdclass={"build_py": BuildPy})
