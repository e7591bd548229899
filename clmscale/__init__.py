"""clmscale: Ray-distributed scaling-law sweeps for chemical language models.

The one import name of the project. The repository keeps its two halves at the top, as the design
has them, and pyproject.toml maps them under this package (setuptools' package-dir):

    clmscale.engine   engine/   the pipeline stages: prepare, sweep, analyze; `clmscale` is clmscale.engine.cli:app
    clmscale.fits     fits/     the statistics: fits, verdicts, the report
    clmscale.data     data/     the shipped MOSES subset and demo tasks, with their licences (data/README.md)
    clmscale.sweeps   sweeps/   the example sweep files; `clmscale demo` runs sweeps/demo.yaml
"""

from importlib.metadata import version

__version__ = version("clmscale")
