"""Assemble the FastAPI application from its routers."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from storage.index import IndexUnavailable
from viewer_api.deps import Services, index_unavailable
from viewer_api.recent_answers import AnswerFromMemory, RecentAnswers
from viewer_api.routes import audit, health, metrics, pocket, qido, rendered, shares, stow, wado


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="pocketpacs",
        summary="Medical imaging cloud archive",
        version="0.1.0",
    )
    app.state.services = services
    # Rendered images and pocket film first: the most frequent requests, and FastAPI tries
    # each route in order (a cached image's request spent a fifth of its time finding its
    # route, a phone's a tenth).
    app.include_router(rendered.router)
    app.include_router(pocket.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(stow.router)
    app.include_router(audit.router)
    app.include_router(shares.router)
    app.add_exception_handler(pocket.PageError, pocket.page_error_handler)
    # A database gone or a connection cut, wherever a route met it: 503, retry.
    app.add_exception_handler(IndexUnavailable, index_unavailable)
    app.add_exception_handler(SQLAlchemyError, index_unavailable)
    app.add_middleware(pocket.PocketHeaders)
    # Answers routes give again from memory; `served` puts them in front of everything.
    app.state.recent_answers = RecentAnswers(getattr(services, "audit", None))
    return app


def served(app: FastAPI) -> AnswerFromMemory:
    """The ASGI application to serve: `app`, with its recent answers given before FastAPI
    sees the request (its own middleware stack cost a fifth of such an answer), then its
    rendered images (`rendered.RenderedLane`)."""
    return AnswerFromMemory(rendered.RenderedLane(app, app), app.state.recent_answers)
