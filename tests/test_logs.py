"""Token redaction covers the access logs of uvicorn, hypercorn and gunicorn (their default names)."""

from __future__ import annotations

import logging

import pytest

from hubwire.logs import install_redaction

SECRET = "s3cr3t-token-value"


@pytest.mark.parametrize(
    "name", ["uvicorn.access", "uvicorn.error", "hypercorn.access", "hypercorn.error", "gunicorn.access"]
)
def test_access_logs_never_show_tokens(name: str, caplog: pytest.LogCaptureFixture) -> None:
    install_redaction()
    logger = logging.getLogger(name)
    with caplog.at_level(logging.INFO, logger=name):
        # uvicorn logs a tuple of arguments, hypercorn and gunicorn a dict of "atoms"
        logger.info('%s - "GET %s"', "127.0.0.1", f"/hub?id={SECRET}&x=1")
        logger.info("%(h)s %(r)s", {"h": "127.0.0.1", "r": f"GET /hub?access_token={SECRET} HTTP/1.1"})
    assert len(caplog.records) == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text
    assert text.count("[redacted]") == 2
