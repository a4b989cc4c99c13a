"""Pytest fixtures that point the real Hugging Face clients at a `LocalHubServer`.

- ``local_hub`` (session scope): one server on ``127.0.0.1``, started once and stopped at the end of the session.
  Repos persist across tests, so give each test its own repo names (or call ``local_hub.reset()``).
- ``hub_env`` (function scope): sets ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_DISABLE_XET=1``,
  ``HF_HUB_DISABLE_TELEMETRY=1`` and a fresh ``HF_HOME`` under ``tmp_path``, and patches what the already
  imported ``huggingface_hub`` / ``transformers`` / ``peft`` / ``diffusers`` modules computed from the environment at
  import time (``huggingface_hub.constants.ENDPOINT``, the cache paths, the module-level ``HfApi`` instance, ...).
  Everything is undone by ``monkeypatch`` after the test. It yields the server.

Wiring, from the project's ``tests/conftest.py``::

    from tests.hub_fixtures import hub_env, local_hub  # noqa: F401
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub.utils._http
import pytest

from tests.hub_server import LocalHubServer

DUMMY_TOKEN = "hf_dummy"

# Packages whose modules may hold by-name copies of `huggingface_hub.constants` values
# (e.g. `from huggingface_hub.constants import HF_HUB_CACHE`), the project's own package included.
_CLIENT_PACKAGES = ("huggingface_hub", "transformers", "peft", "diffusers", "peft_cvae")


@pytest.fixture(scope="session")
def local_hub() -> Iterator[LocalHubServer]:
    with LocalHubServer(username="user") as hub:
        yield hub


@pytest.fixture
def hub_env(local_hub: LocalHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHubServer]:
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    environment = {
        "HF_ENDPOINT": local_hub.url,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "NO_PROXY": _extend_csv(os.environ.get("NO_PROXY"), "127.0.0.1"),
        "no_proxy": _extend_csv(os.environ.get("no_proxy"), "127.0.0.1"),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_CO_STAGING",
        "HF_OIDC_RESOURCE",  # would make `get_token()` try an OIDC exchange instead of using HF_TOKEN
    ):
        monkeypatch.delenv(name, raising=False)

    _patch_huggingface_hub(monkeypatch, local_hub.url, hf_home)
    _patch_client_libraries(monkeypatch, hf_home)
    yield local_hub
    huggingface_hub.utils._http.close_session()


def _extend_csv(current: str | None, item: str) -> str:
    items = [part.strip() for part in (current or "").split(",") if part.strip()]
    return ",".join([*items, item] if item not in items else items)


def _patch_huggingface_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Rebind the values `huggingface_hub.constants` computed from the environment when it was imported."""
    import huggingface_hub
    import huggingface_hub.hf_api
    import huggingface_hub.utils._http
    from huggingface_hub import constants

    new_values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "default_cache_path": str(hf_home / "hub"),
        "default_assets_cache_path": str(hf_home / "assets"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "default_xet_cache_path": str(hf_home / "xet"),
        "HF_XET_CACHE": str(hf_home / "xet"),
    }
    for name, new_value in new_values.items():
        if hasattr(constants, name):
            _rebind_everywhere(monkeypatch, name, getattr(constants, name), new_value)

    flags = {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "_staging_mode": False,
    }
    for name, value in flags.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    host = urlsplit(endpoint).hostname
    if hasattr(constants, "HF_URL_HOSTS") and host:
        monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host}))
    http = huggingface_hub.utils._http
    if hasattr(http, "_HUB_ORIGINS") and hasattr(http, "_url_origin"):
        monkeypatch.setattr(http, "_HUB_ORIGINS", frozenset(http._HUB_ORIGINS | {http._url_origin(endpoint)}))

    # `huggingface_hub.create_repo`, `upload_folder`, ... are bound methods of a module-level `HfApi()` that read
    # `constants.ENDPOINT` once, at import time.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    # The shared httpx client is created lazily; drop it so that it is rebuilt with the current environment
    # (proxies, NO_PROXY) and no connection to a previous server is reused.
    http.close_session()


def _patch_client_libraries(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """Reset what transformers / diffusers cached from the environment, if they are imported."""
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        if hasattr(transformers_hub, "_hf_api"):
            # A shared `HfApi` created lazily: its endpoint is frozen when it is first built.
            monkeypatch.setattr(transformers_hub, "_hf_api", None)
        if hasattr(transformers_hub, "HF_MODULES_CACHE"):
            _rebind_everywhere(
                monkeypatch, "HF_MODULES_CACHE", transformers_hub.HF_MODULES_CACHE, str(hf_home / "modules")
            )
    diffusers_constants = sys.modules.get("diffusers.utils.constants")
    if diffusers_constants is not None:
        if hasattr(diffusers_constants, "HUGGINGFACE_CO_RESOLVE_ENDPOINT"):
            _rebind_everywhere(
                monkeypatch,
                "HUGGINGFACE_CO_RESOLVE_ENDPOINT",
                diffusers_constants.HUGGINGFACE_CO_RESOLVE_ENDPOINT,
                os.environ["HF_ENDPOINT"],
            )
        if hasattr(diffusers_constants, "HF_MODULES_CACHE"):
            _rebind_everywhere(
                monkeypatch, "HF_MODULES_CACHE", diffusers_constants.HF_MODULES_CACHE, str(hf_home / "modules")
            )
    for module_name in (
        "diffusers.utils.hub_utils",
        "diffusers.loaders.lora_base",
        "diffusers.models.attention_dispatch",
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)


def _rebind_everywhere(monkeypatch: pytest.MonkeyPatch, name: str, old_value: Any, new_value: Any) -> None:
    """Set ``name`` to ``new_value`` in every loaded client module where it still holds ``old_value``.

    Modules that did ``from huggingface_hub.constants import NAME`` hold their own reference, which patching
    `huggingface_hub.constants` alone would not reach. Only string values are compared (by equality), so that
    unrelated attributes are never touched by accident.
    """
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in _CLIENT_PACKAGES:
            continue
        current = getattr(module, name, None) if name in getattr(module, "__dict__", {}) else None
        if isinstance(current, str) and current == old_value:
            monkeypatch.setattr(module, name, new_value)
