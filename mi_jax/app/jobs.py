"""The page's jobs per session and the stops asked of them."""

from __future__ import annotations

import collections
import threading

STOPPED = "Stopped: the job was cancelled and its files removed."


class Stops:
    """The page's jobs per session and the stops asked of them, shared by the server's threads.

    Keyed by session and kept on the server: a job learns which request it is by order (the
    queue runs a session's jobs in the order their checks passed), not from a `gr.State`, which a
    queued job reads when its turn comes (by then the session may have asked again).

    `queued(session)` when a request passes its checks; `start(session)` when the next job begins;
    `stop(session)` marks the session's running job and its waiting ones; `stopped(job)` is asked
    by the job after every window; `end(session, job)` when it ends.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._running: dict[str, dict] = {}

    def queued(self, session: str) -> None:
        """A request of `session` passed its checks and waits for its turn."""
        with self._lock:
            self._waiting[session].append({"stopped": False})

    def start(self, session: str) -> dict | None:
        """The session's next job begins.

        Returns:
          The job's handle (for `stopped` and `end`), or None if it was stopped while it waited.
        """
        with self._lock:
            waiting = self._waiting[session]
            job = waiting.popleft() if waiting else {"stopped": False}
            if not waiting:
                del self._waiting[session]
            if job["stopped"]:
                return None
            self._running[session] = job
            return job

    def stop(self, session: str) -> str | None:
        """Marks the session's running job and its waiting ones as stopped.

        Returns:
          `"running"` (a job runs: it ends itself after its window and says so), `"queued"` (only
          waiting ones: they end without compute) or None (nothing to stop).
        """
        with self._lock:
            marked = None
            for job in self._waiting.get(session, ()):
                job["stopped"], marked = True, "queued"
            if session in self._running:
                self._running[session]["stopped"], marked = True, "running"
            return marked

    def stopped(self, job: dict) -> bool:
        """Whether a stop was asked of `job` (a handle from `start`)."""
        with self._lock:
            return job["stopped"]

    def end(self, session: str, job: dict) -> None:
        """`job` of `session` ended (finished, failed or stopped)."""
        with self._lock:
            if self._running.get(session) is job:
                del self._running[session]
