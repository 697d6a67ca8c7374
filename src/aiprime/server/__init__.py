"""The HTTP service (``aiprime serve``): FastAPI over ``KnowledgeBase``; see docs/service.md."""

from aiprime.server.app import create_app
from aiprime.server.security import ApiKeys, SecurityError

__all__ = ["ApiKeys", "SecurityError", "create_app"]
