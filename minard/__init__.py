"""minard: online monitoring for a SNO+-style neutrino detector.

Pure decoding and aggregation live in modules named for their concept
(``zdab``, ``pmt``, ``orca``, ``wire``); processes that talk to sockets and
Redis import them.
"""

__version__ = "0.1.0"



def __getattr__(name: str):
    """``minard.app`` is the website (``gunicorn minard:app``), built on first access.

    Lazy so that importing minard (the CLI, the decoders) never imports Flask.
    """
    if name == "app":
        from minard.web import create_app

        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
