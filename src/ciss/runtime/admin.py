"""Mutating endpoints of ``ciss serve``: reload, deploy, rollback (bearer token required).

They change ``deployed.json`` through the same library calls as the command line (so the gate
and the history are the same) and then make the slot look at it at once instead of waiting
for the watcher.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ciss.errors import CheckFailed, CissError
from ciss.runtime.bodies import HttpError
from ciss.runtime.slot import ModelSlot, SwapPolicy
from ciss.store import Store


def add_admin_routes(app, token: str | None, policy: SwapPolicy, slot: ModelSlot,
                     store: Store) -> None:
    """Register ``/admin/reload``, ``/admin/deploy`` and ``/admin/rollback`` on ``app``.

    Args:
        token: the bearer token they require; None disables them (403).
        policy: gate tolerances used by ``/admin/deploy``.
    """
    def authorise(request: Request) -> None:
        if not token:
            raise HttpError(403, "admin endpoints are disabled: start the server with "
                                 "--admin-token (or CISS_ADMIN_TOKEN)", "forbidden")
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise HttpError(401, "missing admin token: send 'Authorization: Bearer <token>'",
                            "unauthorised")
        if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            raise HttpError(403, "wrong admin token", "forbidden")

    def outcome_json(outcome) -> dict:
        cur = slot.current
        return {"outcome": outcome.outcome, "reason": outcome.reason, "serving_step": cur.step,
                "serving_engine": cur.engine}

    @app.post("/admin/reload")
    async def reload(request: Request):
        authorise(request)
        return outcome_json(await run_in_threadpool(slot.refresh, True))

    @app.post("/admin/deploy")
    async def admin_deploy(request: Request):
        authorise(request)
        try:
            doc = await request.json()
        except ValueError as exc:
            raise HttpError(400, f"body must be JSON like {{\"step\": 2}} ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("step", 0), int):
            raise HttpError(400, "body must be a JSON object with an integer 'step'")
        engine = doc.get("engine", slot.current.engine)

        def run():
            from ciss.runtime.deploy import deploy

            try:
                deploy(store, doc.get("step"), engine, bool(doc.get("force", False)),
                       policy.gate)
            except CheckFailed as exc:
                raise HttpError(409, str(exc), "gate_failed") from exc
            except CissError as exc:
                raise HttpError(400, str(exc)) from exc
            return slot.refresh(force=True)

        return outcome_json(await run_in_threadpool(run))

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request):
        authorise(request)

        def run():
            from ciss.runtime.deploy import rollback

            try:
                rollback(store)
            except CissError as exc:
                raise HttpError(409, str(exc), "conflict") from exc
            return slot.refresh(force=True)

        return outcome_json(await run_in_threadpool(run))
