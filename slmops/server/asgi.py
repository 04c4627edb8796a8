"""What the ASGI middlewares of the model server and the control plane share."""

from __future__ import annotations

from starlette.types import Message, Send


class StatusSend:
    """``send`` that remembers the status the app answered, for middlewares that record it once the app returns
    or raises (``status`` stays ``default`` when no response was started), and adds ``headers`` to every answer."""

    def __init__(self, send: Send, default: int, headers: tuple[tuple[bytes, bytes], ...] = ()):
        self._send = send
        self.status = default
        self.headers = headers

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.headers:
                message["headers"] = [*message.get("headers", ()), *self.headers]
        await self._send(message)
