"""The test tokens, and a real jetpipe web server (uvicorn on a free port, in a thread of the test process)
for API and browser tests."""

from __future__ import annotations

from pipeline.web.server import BackgroundWebServer

#: Tokens the web tests configure: name -> (role, token).
TOKENS = {"ada": ("operator", "operator-token-0123456789"), "vic": ("viewer", "viewer-token-0123456789"),
          "svc": ("service", "service-token-0123456789")}
#: Tokens limited to projects: name -> (role, token, projects joined by "+").
SCOPED = {"lab": ("operator", "lab-a-operator-token-0123", "lab-a"),
          "labview": ("viewer", "lab-a-b-viewer-token-0123", "lab-a+lab-b")}
TOKENS_SETTING = ",".join([f"{name}:{role}:{token}" for name, (role, token) in TOKENS.items()]
                          + [f"{name}:{role}:{token}:{projects}" for name, (role, token, projects) in SCOPED.items()])


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {(TOKENS.get(name) or SCOPED[name])[1]}"}


def WebServer(settings, runtime) -> BackgroundWebServer:  # noqa: N802 - reads like the class it returns
    """A web server on a free port. Unless the settings say otherwise, jobs made through it may name local
    files anywhere (PIPELINE_IMAGE_ROOTS=/: the tests' images live in temporary directories);
    tests/test_image_policy.py tests the policy itself."""
    from pipeline.ops.devstack import free_port

    if not settings.image_roots:
        settings = settings.with_overrides(image_roots="/")
    return BackgroundWebServer(settings, runtime, port=free_port())
