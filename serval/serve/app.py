"""The FastAPI app: a `Service` on `app.state`, the error handlers, the metrics middleware, the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serval import __version__
from serval.serve.config import ServerConfig
from serval.serve.errors import add_error_handlers
from serval.serve.metrics import Metrics, Observe
from serval.serve.pages import router as pages
from serval.serve.routes import router
from serval.serve.schemas import SafeJSONResponse
from serval.serve.service import Service, ShedLoad


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.service.start()
    yield
    # uvicorn has already let in-flight requests finish (graceful shutdown) when this runs
    await app.state.service.stop()


def create_app(predictor, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `predictor` (a `serval.inference.Predictor`) with `config`'s limits."""
    config = config or ServerConfig()
    app = FastAPI(
        title="serval",
        version=__version__,
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,  # a NaN becomes null, never a 500
        # /docs is serve.pages's, with Swagger UI from the package (FastAPI's loads it from a CDN)
        docs_url=None,
        redoc_url=None,
        description=(
            f"Speech emotion recognition: {len(predictor.classes)} emotion classes "
            f"({', '.join(predictor.classes)}) and {len(predictor.dimensions)} dimensional scores"
            f"{' (' + ', '.join(predictor.dimensions) + ')' if predictor.dimensions else ''}."
        ),
    )
    app.state.config = config
    app.state.metrics = Metrics()
    app.state.service = Service(predictor, config, app.state.metrics)
    add_error_handlers(app)
    # the last added runs first: Observe counts every request, ShedLoad refuses before routing
    app.add_middleware(ShedLoad, service=app.state.service)
    app.add_middleware(Observe, metrics=app.state.metrics)
    app.include_router(router)
    app.include_router(pages)
    return app
