"""fot: the Focused Transformer (FoT) in JAX/Flax NNX."""

from fot.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "load_model", "FotModel"]


def __getattr__(name):  # keep `import fot` light: JAX loads only when a model is asked for
    if name == "FotModel":
        from fot.api import FotModel

        return FotModel
    if name == "load_model":
        from fot.convert import load_model

        return load_model
    raise AttributeError(name)
