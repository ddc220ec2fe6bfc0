"""Assemble the FastAPI application from its routers."""

from __future__ import annotations

from fastapi import FastAPI

from viewer_api.deps import Services
from viewer_api.routes import audit, health, metrics, pocket, qido, rendered, shares, stow, wado


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="pocketpacs",
        summary="Medical imaging cloud archive",
        version="0.1.0",
    )
    app.state.services = services
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(rendered.router)
    app.include_router(stow.router)
    app.include_router(audit.router)
    app.include_router(shares.router)
    app.include_router(pocket.router)
    app.add_exception_handler(pocket.PageError, pocket.page_error_handler)
    app.add_middleware(pocket.PocketHeaders)
    return app
