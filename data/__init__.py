"""The shipped data: a MOSES subset and the demo tasks (FreeSolv, solubility), with their licences.

A package only so that an installed clmscale can find the files (importlib.resources, clmscale.data);
see README.md here for their sources and make_vendored.py for how they were cut.
"""
