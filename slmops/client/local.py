"""A small typed, asynchronous client of the local server (``slmops serve``) for the edge agent: the slot table,
warm loads and unloads, one-shot chats (golden prompts), ``/api/ps`` and the ``/metrics`` text.

Answers map to the slmops error tree with the server's one-line message: the statuses of
:data:`slmops.client.errors.BY_STATUS`, 500 as :class:`EngineError` (the server's engine failed: for the agent, a
model that does not load or answer), anything else and no answer at all as :class:`SourceError`.

    async with LocalClient("http://127.0.0.1:11434", api_key) as local:
        await local.load("slot/smollm2-b:2")
        await local.put_slot("smollm2", "slot/smollm2-b:2", "smollm2:2")
"""

from __future__ import annotations

from typing import Any, Self
from urllib.parse import quote

import httpx

from slmops.api.slots import SlotInfo, SlotRequest, SlotsResponse
from slmops.client import errors
from slmops.types import errors as e


class LocalClient:
    def __init__(self, base_url: str, api_key: str = "", *, timeout: float = 300.0,
                 transport: httpx.AsyncBaseTransport | None = None, verify: bool | str = True):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                       transport=transport, verify=verify)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- slots -----------------------------------------------------------------------------------------------
    async def slots(self) -> list[SlotInfo]:
        return SlotsResponse.model_validate_json((await self._call("GET", "/api/slots")).content).slots

    async def put_slot(self, served: str, model: str, release: str | None) -> SlotInfo:
        body = SlotRequest(model=model, release=release).model_dump()
        r = await self._call("PUT", "/api/slots/" + quote(served, safe="/:"), json=body)
        return SlotInfo.model_validate_json(r.content)

    async def delete_slot(self, served: str) -> None:
        await self._call("DELETE", "/api/slots/" + quote(served, safe="/:"))

    # -- models ------------------------------------------------------------------------------------------------
    async def load(self, model: str, keep_alive: str | float | None = None) -> None:
        """Load ``model`` now (Ollama's preload: a generate request without a prompt)."""
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        await self._call("POST", "/api/generate", json=body)

    async def unload(self, model: str) -> None:
        """Unload ``model`` once its running requests finish (keep_alive 0); the stored model stays."""
        await self._call("POST", "/api/generate", json={"model": model, "keep_alive": 0})

    async def chat(self, model: str, prompt: str, max_tokens: int) -> str:
        """One greedy answer to ``prompt`` (temperature 0), at most ``max_tokens`` tokens."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
                "options": {"temperature": 0, "num_predict": max_tokens}}
        return str((await self._call("POST", "/api/chat", json=body)).json()["message"]["content"])

    async def ps(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/api/ps")).json().get("models", []))

    async def metrics(self) -> str:
        return (await self._call("GET", "/metrics")).text

    # -- the one way a request is made -------------------------------------------------------------------------
    async def _call(self, method: str, path: str, json: Any = None) -> httpx.Response:
        try:
            r = await self._http.request(method, path, json=json)
        except httpx.HTTPError as err:
            raise e.SourceError(f"cannot reach the local server at {self.base_url} ({type(err).__name__}); start "
                                "`slmops serve` with the same SLMOPS_HOME or pass --serve-url") from None
        if r.status_code < 400:
            return r
        message = errors.message_of(r)
        if r.status_code == 500:
            raise e.EngineError(message)
        cls = errors.BY_STATUS.get(r.status_code)
        if cls is None or r.status_code == 429:
            raise e.SourceError(f"local server at {self.base_url} answered {r.status_code}: {message}")
        raise cls(message)


__all__ = ["LocalClient"]
