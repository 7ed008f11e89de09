"""refdpo: preference optimization with the reference policy as a first-class, swappable object.

The Python API (README: "Python API"), imported on first use so that `import refdpo` stays light:

    from refdpo import TrainConfig, train, ScoreConfig, score, EvalConfig, evaluate
"""

__version__ = "0.1.0"

_API = {
    "TrainConfig": "refdpo.commands.train_config", "train": "refdpo.commands.train",
    "ScoreConfig": "refdpo.commands.score", "score": "refdpo.commands.score",
    "EvalConfig": "refdpo.commands.evaluate", "evaluate": "refdpo.commands.evaluate",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'refdpo' has no attribute {name!r}")
