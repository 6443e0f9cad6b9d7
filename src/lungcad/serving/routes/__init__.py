"""One router per resource: service status, crop classification, whole-scan analysis, page."""

from lungcad.serving.routes import analyze, classify, page, service

ROUTERS = (service.router, classify.router, analyze.router, page.router)
ENDPOINTS = ("/", "/health", "/metrics", "/v1/classify", "/v1/analyze")

__all__ = ["ENDPOINTS", "ROUTERS"]
