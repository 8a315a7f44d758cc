"""Webhooks on the API side: checking a request's `webhook` fields and showing delivery status."""

from __future__ import annotations

from patchdiff_core.generation.spec import SpecError
from patchdiff_core.service import webhooks
from patchdiff_core.service.records import JobRecord
from patchdiff_core.service.settings import Settings

from .live_schemas import WebhookDelivery, WebhookView
from .schemas import GenerateRequest


def checked_webhook(req: GenerateRequest, settings: Settings) -> tuple[str | None, list[str] | None]:
    """(url, events) to store on the job, or (None, None); a refused target is a 422 naming the field."""
    if req.webhook is None:
        if req.webhook_events is not None:
            raise SpecError("webhook_events", "webhook_events needs a webhook URL")
        return None, None
    if settings.webhook_secret is None:
        raise SpecError("webhook", "webhooks are not enabled on this server (PATCHDIFF_WEBHOOK_SECRET is unset)")
    try:
        events = webhooks.check_events(req.webhook_events)
    except webhooks.WebhookRefused as exc:
        raise SpecError("webhook_events", str(exc)) from None
    try:
        webhooks.check_target(req.webhook, settings)
    except webhooks.WebhookRefused as exc:
        raise SpecError("webhook", str(exc)) from None
    return req.webhook, events


def webhook_view(record: JobRecord) -> WebhookView | None:
    if not record.webhook:
        return None
    deliveries = record.webhook_deliveries[-50:]
    return WebhookView(url=record.webhook, events=(record.webhook_events or "").split(","),
                       deliveries=[WebhookDelivery.model_validate(d) for d in deliveries])
