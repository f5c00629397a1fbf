"""The MQTT agent of vllm-deploy; ``__version__`` is the project's one version number
(pyproject.toml reads it from here)."""

__version__ = "0.1.0"
