"""pomona: train, tune, evaluate and serve EfficientNet classifiers for apple varieties.

    from pomona import load_run
    run = load_run("runs/g1")
    run.predict(["a.jpg"]).top_k(3)

`import pomona` is cheap; `from pomona import load_run` (from `pomona.inference.loaded`) imports PyTorch, which takes
a few seconds (about 5 s on 2 busy cores).
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load_run"]


def __getattr__(name: str):
    if name == "load_run":
        from .inference.loaded import load_run

        return load_run
    raise AttributeError(f"module 'pomona' has no attribute {name!r}")
