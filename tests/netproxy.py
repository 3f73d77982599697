"""A TCP proxy on loopback that a test can break: cut every connection at once, cut the first one after so
many bytes, or blackhole the open ones (nothing forwarded, connections left open)."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target` (127.0.0.1 unless told).

    `cut_after`: the first connection is cut after that many client-to-server bytes. `cut()` drops the
    connections open now; `wedge()` makes them forward nothing while staying open (a blackholed link).
    """

    def __init__(self, target: int, port: int = 0, cut_after: int | None = None,
                 target_host: str = "127.0.0.1") -> None:  # fmt: skip
        self.target, self.cut_after, self.target_host = target, cut_after, target_host
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.upstream_bytes = 0
        self.wedged: set[int] = set()
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection((self.target_host, self.target), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                number = self.connections
                self._open.append((client, server))
            limit = self.cut_after if number == 1 else None
            threading.Thread(target=self._pipe, args=(client, server, number, limit, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, number, None, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, number: int, limit: int | None,
              is_upstream: bool) -> None:  # fmt: skip
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    break
                if number in self.wedged:
                    continue
                sink.sendall(data)
                sent += len(data)
                if is_upstream:
                    with self._lock:
                        self.upstream_bytes += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wedge(self) -> None:
        """Blackhole every connection open now; later ones are forwarded as usual."""
        self.wedged.update(range(1, self.connections + 1))

    def cut(self) -> int:
        """Close every connection open now (a link that went down); return how many there were."""
        with self._lock:
            pairs, self._open = self._open, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        return len(pairs)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self.cut()
        self._thread.join(timeout=5)
