"""Reload a file when it changes on disk (watchdog), swapping one reference.

Readers call the holder to get the current snapshot; a session that took a
snapshot keeps it.  A file that fails to parse keeps the previous snapshot
and logs the error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

T = TypeVar("T")
log = logging.getLogger("odmr_bridge.watch")
# A file's new content is complete when it is closed after writing, or
# renamed, created or deleted in place.  Not every write (IN_MODIFY): the
# folder may hold a busy file (a log beside the watched one), and the kernel
# then sends nothing for it.
_CHANGES: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent,
                                          FileClosedEvent]


class Reloading(Generic[T]):
    """``holder()`` returns the current snapshot of *path*, parsed by *load*."""

    def __init__(self, path: str | Path, load: Callable[[Path], T]) -> None:
        self.path = Path(path).absolute()
        self._load = load
        self._value: T = load(self.path)
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def __call__(self) -> T:
        return self._value

    def reload(self) -> None:
        with self._lock:
            try:
                self._value = self._load(self.path)
            except Exception as exc:
                log.error("warning: %s: not reloaded, keeping the previous version: %s",
                          self.path, exc)
                return
        log.info("reloaded %s", self.path)

    def start(self, create_parent: bool = True) -> None:
        if not self.path.parent.is_dir():
            if not create_parent:
                log.warning("not watching %s: %s does not exist", self.path, self.path.parent)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = _PathHandler(self.path, self.reload)
        observer = Observer()
        observer.schedule(handler, str(self.path.parent), recursive=False,
                          event_filter=_CHANGES)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


class _PathHandler(FileSystemEventHandler):
    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        self.path = path
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = {event.src_path, getattr(event, "dest_path", "")}
        if str(self.path) in {p.decode() if isinstance(p, bytes) else p for p in paths}:
            self.on_change()
