"""Running the API inside the hub's event loop (uvicorn on a socket we bind ourselves, so port 0
gives a free port we can print), with its read pool (``hub.api.reads``) started and stopped
with it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from fastapi import FastAPI

from hub.api.reads import ReadPool

log = logging.getLogger(__name__)


class ApiServer:
    def __init__(self, app: FastAPI, host: str, port: int, reads: ReadPool | None = None) -> None:
        self._reads, self._app = reads, app
        self._socket = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # Whatever answer is still going (a client that never reads) is cut after this.
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._reads is not None:
            self._reads.start()
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))

    async def stop(self) -> None:
        # The screens' open live streams end first: the server waits for its answers to end.
        live = getattr(getattr(self._app.state, "context", None), "live", None)
        if live is not None:
            await live.close()
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close()
        if self._reads is not None:
            await asyncio.to_thread(self._reads.close)
