"""Errors of the HTTP API beside Gradio's own: a request body that does not parse."""

from __future__ import annotations


async def malformed_request(request, exc):
    """A 422 for a request body that does not parse. FastAPI's default echoes the input back, and fails with a
    500 when the input holds NaN or infinity."""
    from fastapi.responses import JSONResponse

    problems = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()]
    return JSONResponse({"error": "malformed request", "problems": problems}, status_code=422)
