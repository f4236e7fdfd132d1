"""Signing in to the floor's screens, signing out, and who may open which page.

- ``GET /ui/login`` and ``POST /ui/login`` (a key, once per device) open a session
  (``hub.ui.sessions``): an HttpOnly, SameSite=Strict cookie, Secure when served over https.
- ``GET /ui/enter/{token}``: a one-time sign-in link (the demo prints two; an admin makes
  them on ``/ui/admin`` for a tablet or a wall screen, so nobody types a key there); its page
  asks, and its button (``POST``) signs the device in.
- ``POST /ui/logout`` ends the session.
- ``/ui/admin``: the signed-in devices, ended one by one, and one-time links for the keys
  configured (admins only).

A page asks for a signed-in caller with ``page_user(*roles)``: without a session the browser
is sent to the sign-in page (and back after it); with a role the page does not admit, a 403
page says so. Roles: ``hub.api.policy`` (``SCREEN_USERS``, ``STATION_USERS``,
``SCREEN_ADMINS``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from hub.api.deps import (
    CSRF_HEADER,
    SESSION_COOKIE,
    ApiContext,
    Caller,
    Context,
    identify,
    session_caller,
)
from hub.api.policy import SCREEN_ADMINS, SCREEN_USERS
from hub.settings import Role
from hub.ui.sessions import Opened, Sessions

router = APIRouter(prefix="/ui", include_in_schema=False)
HOME = "/ui/"


@cache
def templates() -> Jinja2Templates:
    """The pages' templates (made on first use, not at import)."""
    found = Jinja2Templates(directory=str(files("hub.ui") / "templates"))
    found.env.globals["CSRF_HEADER"] = CSRF_HEADER
    return found


def render(
    request: Request,
    name: str,
    caller: Caller | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    """Page ``name`` for ``caller`` (None: not signed in), with its CSRF token and role."""
    session = caller.session if caller is not None else None
    context = {
        "caller": caller,
        "role": caller.role if caller else None,
        "csrf": session.csrf if session else "",
        "is_admin": caller is not None and caller.role in SCREEN_ADMINS,
        **values,
    }
    return templates().TemplateResponse(request, name, context, status_code=status_code)


class SignInNeeded(Exception):
    def __init__(self, back_to: str) -> None:
        self.back_to = back_to


class PageRefused(Exception):
    def __init__(self, caller: Caller, why: str) -> None:
        self.caller, self.why = caller, why


def page_user(*roles: Role) -> Callable[..., Awaitable[Caller]]:
    """A page's dependency: the signed-in caller, if its role is one of ``roles``."""

    async def check(context: Context, request: Request) -> Caller:
        caller = await session_caller(context, request)
        if caller is None:
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise SignInNeeded(back)
        if caller.role not in roles:
            raise PageRefused(
                caller, f"a {caller.role} may not open this page (it is for: {', '.join(roles)})"
            )
        return caller

    check.__name__ = "page_user_" + "_".join(roles)
    return check


ScreenUser = Annotated[Caller, Depends(page_user(*SCREEN_USERS))]
ScreenAdmin = Annotated[Caller, Depends(page_user(*SCREEN_ADMINS))]


def install_access(app: FastAPI) -> None:
    """The handlers that turn a missing session into the sign-in page and a refused role into
    a 403 page (the API's routes answer problem+json instead)."""

    async def sign_in_first(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInNeeded)
        if request.headers.get("sec-fetch-site") == "cross-site":
            # A SameSite=Strict cookie is not sent on a navigation from another site (a link
            # in a mail or on the intranet): load the page again from here, where it is.
            return HTMLResponse(
                '<!doctype html><meta http-equiv="refresh" content="0"><title>mes-hub</title>'
            )
        return RedirectResponse(f"/ui/login?next={quote(exc.back_to)}", status_code=303)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageRefused)
        return render(request, "refused.html", exc.caller, status_code=403, why=exc.why)

    app.add_exception_handler(SignInNeeded, sign_in_first)
    app.add_exception_handler(PageRefused, refused)


def _local(next_path: str | None) -> str:
    """Where to go after signing in: a page of the screens only (no open redirect)."""
    if not next_path:
        return HOME
    parts = urlsplit(next_path)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui/") or "\\" in next_path:
        return HOME
    return next_path


def _signed_in(request: Request, opened: Opened, sessions: Sessions, to: str) -> Response:
    answer = RedirectResponse(to, status_code=303)
    answer.set_cookie(
        SESSION_COOKIE,
        opened.token,
        max_age=int(sessions.lifetime.total_seconds()),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return answer


def _sessions(context: ApiContext) -> Sessions:
    assert context.sessions is not None, "the screens are installed with their sessions"
    return context.sessions


def _same_origin(request: Request) -> bool:
    """A form posted from a page of this hub (or by a client that says nothing of where)."""
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site") in (None, "same-origin", "none")
    return origin == f"{request.url.scheme}://{request.url.netloc}"


@router.get("/login")
async def login_page(request: Request, context: Context, next: str | None = None) -> Response:
    caller = await session_caller(context, request)
    if caller is not None:
        return RedirectResponse(_local(next), status_code=303)
    return render(request, "login.html", None, next=_local(next), error=None)


@router.post("/login")
async def login(
    request: Request,
    context: Context,
    key: Annotated[str, Form(max_length=512)],
    next: Annotated[str, Form(max_length=2048)] = HOME,
) -> Response:
    if not _same_origin(request):
        return render(request, "login.html", None, 403, next=_local(next),
                      error="sign in from this hub's own page")  # fmt: skip
    caller = await identify(context, key.strip())
    if caller is None or caller.partner is not None:
        return render(request, "login.html", None, 401, next=_local(next),
                      error="that key is not valid")  # fmt: skip
    if caller.role not in SCREEN_USERS:
        return render(
            request, "login.html", None, 403, next=_local(next),
            error=f"a {caller.role} key cannot use the screens (they are for: "
            f"{', '.join(SCREEN_USERS)})",
        )  # fmt: skip
    sessions = _sessions(context)
    device = request.headers.get("user-agent", "")
    opened = await asyncio.to_thread(sessions.sign_in, caller.key_id, caller.role, device)
    return _signed_in(request, opened, sessions, _local(next))


@router.get("/enter/{token}")
async def enter_page(
    request: Request, context: Context, token: str, next: str | None = None
) -> Response:
    """A one-time link asks before it signs the device in: a mail or chat scanner that opens
    every link it sees must not use it up (or get the session)."""
    role = await asyncio.to_thread(_sessions(context).link_role, token)
    if role is None:
        return render(request, "login.html", None, 401, next=_local(next),
                      error="that sign-in link was used already or has expired")  # fmt: skip
    return render(request, "enter.html", None, token=token, link_role=role, next=_local(next))


@router.post("/enter/{token}")
async def enter(
    request: Request,
    context: Context,
    token: str,
    next: Annotated[str, Form(max_length=2048)] = HOME,
) -> Response:
    if not _same_origin(request):
        return render(request, "login.html", None, 403, next=_local(next),
                      error="sign in from this hub's own page")  # fmt: skip
    sessions = _sessions(context)
    device = request.headers.get("user-agent", "")
    opened = await asyncio.to_thread(sessions.redeem_link, token, device)
    if opened is None:
        return render(request, "login.html", None, 401, next=_local(next),
                      error="that sign-in link was used already or has expired")  # fmt: skip
    return _signed_in(request, opened, sessions, _local(next))


@router.post("/logout")
async def logout(request: Request, context: Context) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    caller = await session_caller(context, request)  # (checks the CSRF token)
    if caller is not None and token:
        await asyncio.to_thread(_sessions(context).end, token)
    answer = RedirectResponse("/ui/login", status_code=303)
    answer.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return answer


# --- the admin page -----------------------------------------------------------------------------


@router.get("/admin")
async def admin_page(request: Request, context: Context, caller: ScreenAdmin) -> Response:
    sessions = _sessions(context)
    listed = await asyncio.to_thread(sessions.listed)
    keys = sorted(sessions.known_keys.items(), key=lambda k: (k[1], k[0]))
    return render(
        request, "admin.html", caller, sessions=listed, keys=keys, now=datetime.now(UTC),
        link=None, mine=caller.session.id if caller.session else None,
    )  # fmt: skip


@router.post("/admin/sessions/{session_id}/end")
async def end_session(session_id: str, context: Context, caller: ScreenAdmin) -> Response:
    await asyncio.to_thread(_sessions(context).end_by_id, session_id)
    return RedirectResponse("/ui/admin", status_code=303)


@router.post("/admin/links")
async def new_link(
    request: Request,
    context: Context,
    caller: ScreenAdmin,
    key_id: Annotated[str, Form(max_length=64)],
    next: Annotated[str, Form(max_length=2048)] = HOME,
) -> Response:
    sessions = _sessions(context)
    role = sessions.known_keys.get(key_id)
    listed = await asyncio.to_thread(sessions.listed)
    keys = sorted(sessions.known_keys.items(), key=lambda k: (k[1], k[0]))
    values: dict[str, Any] = {"sessions": listed, "keys": keys, "now": datetime.now(UTC),
                              "mine": caller.session.id if caller.session else None}  # fmt: skip
    if role is None or role not in SCREEN_USERS:
        return render(request, "admin.html", caller, 422, link=None,
                      error="choose a configured key of a screen role", **values)  # fmt: skip
    token = await asyncio.to_thread(sessions.issue_link, key_id, role)
    base = f"{request.url.scheme}://{request.url.netloc}"
    link = f"{base}/ui/enter/{token}?next={quote(_local(next))}"
    return render(request, "admin.html", caller, link=link, link_role=role, **values)
