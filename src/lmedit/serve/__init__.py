"""Web playground and JSON API over the public lmedit API (``lmedit serve``).

    >>> from lmedit.serve import serve
    >>> serve("gemma3-270m", host="127.0.0.1", port=7860)          # blocks; open http://127.0.0.1:7860/

    >>> from lmedit.serve import ServerState, create_app            # embed: e.g. in tests or another ASGI app
    >>> app = create_app(ServerState(lmedit.load_model("gemma3-270m")))

Needs the ``serve`` extra (FastAPI + uvicorn). See docs/serve.md for the page and the API.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerState", "create_app", "resolve_token", "serve"]


def _app_module():
    try:
        from lmedit.serve import app
    except ImportError as e:  # fastapi / uvicorn missing
        raise ImportError(
            f"lmedit serve needs FastAPI and uvicorn ({e}); install them: pip install 'lmedit[serve]' "
            "(or pip install fastapi uvicorn)"
        ) from None
    return app


def __getattr__(name: str) -> Any:
    if name == "ServerState":
        from lmedit.serve.state import ServerState

        return ServerState
    if name in ("create_app", "resolve_token", "serve"):
        return getattr(_app_module(), name)
    raise AttributeError(f"module 'lmedit.serve' has no attribute {name!r}")
