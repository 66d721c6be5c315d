"""/api/v1/templates: what sandboxes can be made of."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from api.deps import ClientDep, ServiceDep
from api.schemas import PreviewChange, PreviewPublic, TemplatePublic
from engine.model.templates import Template, load_all
from engine.units import format_duration

router = APIRouter(prefix="/api/v1/templates", tags=["templates"])


def public(t: Template) -> TemplatePublic:
    return TemplatePublic(
        name=t.name,
        description=t.description,
        base_image=t.base_image,
        services=list(t.services),
        cpu_limit=t.cpu_limit,
        memory_limit=f"{t.memory_limit // 2**20}Mi",
        pids_limit=t.pids_limit,
        ttl=format_duration(t.ttl),
        max_ttl=format_duration(t.max_ttl),
        expose=[{"container": e.container, "public": e.public} for e in t.expose],
    )


@router.get("", response_model=list[TemplatePublic])
async def list_templates(client: ClientDep, service: ServiceDep) -> list[TemplatePublic]:
    templates = await asyncio.to_thread(load_all, service.settings.templates_path)
    return [public(t) for t in templates.values()]


@router.get("/{name}", response_model=TemplatePublic, responses={404: {}})
async def get_template(name: str, client: ClientDep, service: ServiceDep) -> TemplatePublic:
    return public(await asyncio.to_thread(service.template, name))


@router.post("/{name}/preview", response_model=PreviewPublic, responses={404: {}})
async def preview_template(name: str, client: ClientDep, service: ServiceDep) -> PreviewPublic:
    """Dry run: what a sandbox of this template would create. Nothing is created."""
    template = await asyncio.to_thread(service.template, name)
    preview = await asyncio.to_thread(
        service.stacks.preview_template, template, service.settings.templates_path
    )
    return PreviewPublic(
        template=name,
        summary=preview.summary,
        changes=[
            PreviewChange(op=c.op, type=c.type, name=c.name, properties=list(c.properties))
            for c in preview.changes
        ],
    )
