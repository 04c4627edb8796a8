"""What the ASGI middlewares of the model server and the control plane share."""

from __future__ import annotations

from starlette.types import Message, Send


class StatusSend:
    """``send`` that remembers the status the app answered, for middlewares that record it once the app returns
    or raises (``status`` stays ``default`` when no response was started)."""

    def __init__(self, send: Send, default: int):
        self._send = send
        self.status = default

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)
