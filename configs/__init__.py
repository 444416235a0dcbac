"""The Hydra configs, shipped in the package as data (`importlib.resources.files("densepred.configs")`)."""
