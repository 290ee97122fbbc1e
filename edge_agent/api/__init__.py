"""The box's inference API (FastAPI): ``create_app`` is its factory; routes live in ``routes``."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from edge_agent.api.request_ids import install_request_ids
from edge_agent.api.routes import health, router
from edge_agent.api.settings import ApiSettings
from edge_agent.audit import AuditLog
from edge_agent.clinic import clinic_router
from edge_agent.serving import DiagnosisService, InferenceHook, MicroBatcher, ResultHook, ServedModel
from edge_agent.store import LocalStore
from firmware.profile import InputSection, ServingSection
from protocol.jobs import Job

__all__ = ["ApiSettings", "create_app"]


def create_app(
    settings: ApiSettings,
    served: ServedModel,
    store: LocalStore,
    audit: AuditLog,
    *,
    accept: InputSection | None = None,
    serving: ServingSection | None = None,
    service: DiagnosisService | None = None,
    on_inference_request: list[InferenceHook] | None = None,
    on_result: list[ResultHook] | None = None,
    extra_routers: Sequence[APIRouter] = (),
    job: Job = Job.CLASSIFY,
) -> FastAPI:
    """Build the inference app.

    Pass ``service`` to share one batcher with the DICOM SCP; otherwise one is built from
    ``accept`` (the profile's ``input``) and ``serving`` (its ``serving``).

    ``on_inference_request`` is the list of callbacks run on every diagnose request (the
    trainer pauses on it); the same list object is kept, so callbacks added later count.
    ``on_result`` callbacks get ``(latency_s, outcome)`` per request (e.g. the agent's
    ``AgentMetrics.observe_inference``); ``extra_routers`` mounts e.g. its ``/metrics`` router.
    The app starts the batcher when it starts and stops it when it stops, unless it was given
    a ``service`` (then whoever built the service owns the batcher).
    """
    own = service is None
    if service is None:
        service = DiagnosisService(
            served, MicroBatcher.from_profile(serving, settings.retry_after_s), store, audit,
            accept or InputSection(), on_inference_request=on_inference_request, on_result=on_result,
            timeout_s=settings.request_timeout_s,
        )
    else:
        if on_inference_request is not None:
            service.on_inference_request = on_inference_request
        if on_result is not None:
            service.on_result = on_result
    svc = service

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.batcher.start()
        try:
            yield
        finally:
            if own:
                svc.batcher.stop()

    app = FastAPI(title=settings.title, version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.job = Job(job)  # the box's job (its profile's): /v1/diagnose answers 409 unless it serves classifiers
    app.state.service = svc
    app.state.on_inference_request = svc.on_inference_request  # the trainer appends its pause here
    install_request_ids(app)
    app.include_router(health)
    app.include_router(router, tags=["diagnosis"])
    app.include_router(clinic_router())  # the clinician's page; its data comes from the routes above
    for r in extra_routers:
        app.include_router(r)
    _truthful_openapi(app, served)
    return app


def _truthful_openapi(app: FastAPI, served: ServedModel) -> None:
    """Make ``/openapi.json`` list the labels the served model takes (they change with the model)."""
    plain = app.openapi
    cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        classes = tuple(served.current().classes) if served.ready else ()
        if classes not in cache:
            app.openapi_schema = None  # FastAPI caches one schema: rebuild it for these classes
            schema = copy.deepcopy(plain())
            label = schema["components"]["schemas"]["FindingIn"]["properties"]["label"]
            if classes:
                label["enum"] = list(classes)
            cache[classes] = schema
        app.openapi_schema = cache[classes]
        return cache[classes]

    app.openapi = openapi  # type: ignore[method-assign]
