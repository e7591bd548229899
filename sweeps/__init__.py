"""The example sweep files, a package only so that an installed clmscale can find them
(importlib.resources.files("clmscale.sweeps")): `clmscale demo` with no argument runs demo.yaml.
"""
