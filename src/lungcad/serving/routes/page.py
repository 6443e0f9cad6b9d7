"""``GET /``: the upload page (plain HTML and JavaScript, no external assets)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["page"])


@cache
def index_html() -> str:
    return (resources.files("lungcad.serving") / "static" / "index.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(index_html())
