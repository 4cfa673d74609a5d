"""Build hook: install ``skilllens-lmeval.pth`` next to the packages (site-packages), so that
lm-eval's own ``lm_eval --model skilllens`` finds the model type and the offline tasks
(``skilllens_lmeval_hook.py`` says how; everything else is in pyproject.toml)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "skilllens-lmeval.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also puts :data:`PTH` at the top of the wheel. An editable install
    (setuptools >= 64, PEP 660) assembles its wheel from ``install``'s ``install_lib``, so the
    file goes there in editable mode."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.mkpath(target)
        self.copy_file(PTH, os.path.join(target, PTH), preserve_mode=False)

    def get_outputs(self, *args, **kwargs):
        outputs = list(super().get_outputs(*args, **kwargs))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
