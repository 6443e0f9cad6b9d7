"""How failures become HTTP answers, each ``{"detail": "..."}`` (see ``ErrorPublic``).

Full queue and shutdown -> 503 with ``Retry-After``; a model error -> 500 for the requests
of that batch only; timeout -> 504; a CT the reader refuses -> 400; a client that went
away gets no answer (logged as 499 in the metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from lungcad.errors import LungcadError
from lungcad.serving.batching import BatcherClosedError, BatchFailedError, QueueFullError
from lungcad.serving.deps import ClientDisconnectedError
from lungcad.serving.metrics import CLIENT_CLOSED_REQUEST

log = logging.getLogger(__name__)

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Register the mapping above on ``app``."""
    retry = {"Retry-After": str(retry_after_s)}

    def answer(status: int, headers: dict[str, str] | None = None) -> ExceptionHandler:
        async def handler(request: Request, exc: Exception) -> Response:
            return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

        return handler

    app.add_exception_handler(QueueFullError, answer(503, retry))
    app.add_exception_handler(BatcherClosedError, answer(503, retry))
    app.add_exception_handler(BatchFailedError, answer(500))
    app.add_exception_handler(LungcadError, answer(400))
    app.add_exception_handler(TimeoutError, _timeout)
    app.add_exception_handler(ClientDisconnectedError, _client_gone)


async def _timeout(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "no answer from the model in time"}, status_code=504)


async def _client_gone(request: Request, exc: Exception) -> Response:
    log.debug("client left before %s was answered", request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)
