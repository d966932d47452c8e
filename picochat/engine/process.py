"""The Engine protocol served by a LocalEngine in a child process: what the console runs.

In one process the console's UI thread and the engine thread take turns on the GIL: every torch
op hands it over, and winning it back waits for the UI's Python (a streamed Markdown repaint is
~15 ms of it). In its own process the engine loses nothing to the UI: decode tok/s in the console
went from 0.81 of headless to 0.99 (``benchmarks/console.py``, bf16).

The child is ``python -m picochat.engine.process`` (started fresh: nothing of the console's
threads or terminal is inherited) in a session of its own, so the terminal's Ctrl+C and hang-up
reach the console alone; its stdout and stderr go to ``engine.log`` in the cache dir, not onto
the console's screen. The two share one socket of pickled tuples:

- parent → child: ``("config", EngineConfig)`` first, then ``("call", id, method, args, kwargs)``
  · ``("cancel", request_id)`` · ``("close",)``
- child → parent: ``("progress", text, fraction)`` while loading, then ``("ready", info)`` or
  ``("failed", error)``; ``("reply", id, error, value, info)`` · ``("deltas", [Delta, ...])``

The child's engine thread only queues deltas; a forwarding thread sends all that have queued as
one message, and the parent's reader thread puts them into the Streams it handed out. The child
exits when the socket closes (the console quit or was killed). If the child dies, open streams
end with finish_reason "error" and later calls raise EngineClosedError, one line naming its exit
status.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from picochat.config import EngineConfig, SamplingParams, cache_dir
from picochat.engine.protocol import Delta, EngineInfo, MetricsSnapshot, Prompt, Stream, now, share_gil_promptly
from picochat.errors import EngineClosedError, PicochatError
from picochat.progress import ProgressFn

# the child runs at this niceness (``PICOCHAT_ENGINE_NICENESS`` overrides it): on a small machine
# the engine's threads keep every core busy while a reply streams, and at equal priority a key
# or a repaint of the console waited behind them (keystroke-to-screen tail, benchmarks/console.py)
ENGINE_NICENESS = 5
CALLS = frozenset({"submit", "metrics", "reconfigure", "count_prompt_tokens"})


def log_path() -> Path:
    return cache_dir() / "engine.log"


@dataclass
class _Call:
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class EngineProcess:
    """A LocalEngine built from ``config`` in a child process; returns once it is loaded and
    raises its PicochatError (one line) if loading fails."""

    def __init__(self, config: EngineConfig, progress: ProgressFn | None = None):
        parent_end, child_end = socket.socketpair()
        self._conn = Connection(parent_end.detach())
        log = log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        package_root = str(Path(__file__).resolve().parents[2])  # found also when run from a checkout
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path}
        with child_end, open(log, "wb") as output:
            # a session of its own: the terminal's Ctrl+C and hang-up go to the console alone
            self._process = subprocess.Popen(
                [sys.executable, "-m", "picochat.engine.process", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._calls: dict[int, _Call] = {}
        self._call_ids = itertools.count()
        self._request_ids = itertools.count()
        self._closed_reason: str | None = None
        try:
            self._send(("config", config))
            self._info = self._wait_until_loaded(progress)
        except BaseException:
            self._stop_process()
            raise
        self._reader = threading.Thread(target=self._read, name="picochat-engine-pipe", daemon=True)
        self._reader.start()

    def _wait_until_loaded(self, progress: ProgressFn | None) -> EngineInfo:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                raise EngineClosedError(f"the engine process exited while loading the model "
                                        f"({self._exit_description()})") from None
            if message[0] == "progress":
                if progress is not None:
                    progress(message[1], message[2])
            elif message[0] == "ready":
                return message[1]
            else:  # "failed"
                raise message[1]

    # ------------------------------------------------------------------ the Engine protocol
    @property
    def info(self) -> EngineInfo:
        return self._info

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
               arrival: float | None = None) -> Stream:
        request_id = request_id or f"req-{next(self._request_ids)}"
        stream = Stream(request_id, self.cancel)
        with self._lock:
            self._streams[request_id] = stream  # before the child can send its first delta
        try:
            self._call("submit", prompt, params, request_id, now() if arrival is None else arrival)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return stream

    def cancel(self, request_id: str) -> None:
        try:
            self._send(("cancel", request_id))
        except EngineClosedError:  # nothing runs any more
            pass

    def metrics(self) -> MetricsSnapshot:
        return self._call("metrics")

    def reconfigure(self, **changes) -> None:
        self._call("reconfigure", **changes)

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return self._call("count_prompt_tokens", prompt)

    def close(self) -> None:
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = "the engine is shut down"
        try:
            self._send(("close",))
        except EngineClosedError:
            pass
        self._stop_process()

    # ------------------------------------------------------------------ the pipe
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = _Call()
        with self._lock:
            if self._closed_reason is not None:
                raise EngineClosedError(self._closed_reason)
            call_id = next(self._call_ids)
            self._calls[call_id] = call
        self._send(("call", call_id, method, args, kwargs))
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.value

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the child is gone (the reader thread reports it)
            raise EngineClosedError(self._closed_reason or "the engine process is gone") from None

    def _read(self) -> None:
        """The reader thread: deltas into their streams, replies to their callers."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "deltas":
                    for delta in message[1]:
                        self._deliver(delta)
                else:  # "reply"
                    _, call_id, error, value, self._info = message
                    with self._lock:
                        call = self._calls.pop(call_id)
                    call.value, call.error = value, error
                    call.done.set()
        except (EOFError, OSError):
            pass
        self._fail_everything()

    def _deliver(self, delta: Delta) -> None:
        with self._lock:
            stream = self._streams.pop(delta.request_id) if delta.finished else self._streams.get(delta.request_id)
        if stream is not None:
            stream._put(delta)

    def _fail_everything(self) -> None:
        """The pipe closed: end every open stream and pending call with one line saying why."""
        unexpected = self._closed_reason is None
        exit_description = self._exit_description() if unexpected else ""
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = f"the engine process exited unexpectedly ({exit_description})"
            reason = self._closed_reason
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for stream in streams:
            stream._put(Delta(stream.request_id, "", (), finish_reason="error", error=reason))
        for call in calls:
            call.error = EngineClosedError(reason)
            call.done.set()

    def _exit_description(self) -> str:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return f"still running; its log: {log_path()}"
        status = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"{status}; its log: {log_path()}"

    def _stop_process(self) -> None:
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()


# ---------------------------------------------------------------------- the child process

def serve(conn: Connection) -> None:
    """The child: load the engine, then answer the parent's calls until the pipe closes."""
    _, config = conn.recv()
    try:  # the console's keys and repaints come first when both want a core
        os.nice(int(os.environ.get("PICOCHAT_ENGINE_NICENESS", ENGINE_NICENESS)))
    except (OSError, ValueError):
        pass
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    from picochat.engine.engine import LocalEngine

    try:
        engine = LocalEngine(config, progress=lambda text, fraction: send(("progress", text, fraction)))
    except PicochatError as e:
        send(("failed", e))
        return
    except Exception as e:  # a bug: its traceback goes to the log
        traceback.print_exc()
        send(("failed", EngineClosedError(f"the engine failed to start ({type(e).__name__}: {e}); "
                                          f"its log: {log_path()}")))
        return
    share_gil_promptly()  # the forwarding thread and the calls share the GIL with the engine thread
    outbox: queue.SimpleQueue[Delta] = queue.SimpleQueue()
    threading.Thread(target=_forward, args=(outbox, send), name="picochat-deltas", daemon=True).start()
    send(("ready", engine.info))
    try:
        while True:
            message = conn.recv()
            if message[0] == "call":
                _, call_id, method, args, kwargs = message
                value, error = _answer(engine, method, args, kwargs, outbox.put)
                send(("reply", call_id, error, value, engine.info))
            elif message[0] == "cancel":
                engine.cancel(message[1])
            else:  # "close"
                break
    except (EOFError, OSError):  # the console is gone
        pass
    finally:
        engine.close()


def _answer(engine: Any, method: str, args: tuple, kwargs: dict,
            forward: Callable[[Delta], object]) -> tuple[Any, BaseException | None]:
    """Run one call; (value, None) or (None, the error to raise in the parent)."""
    if method not in CALLS:
        return None, RuntimeError(f"unknown engine call {method!r}")
    try:
        value = getattr(engine, method)(*args, **kwargs)
    except PicochatError as e:
        return None, e
    except Exception as e:  # a bug: the parent raises it as one, the traceback is in the log
        traceback.print_exc()
        return None, RuntimeError(f"{type(e).__name__}: {e}")
    if method == "submit":
        value.redirect(forward)
        return None, None
    return value, None


def _forward(outbox: queue.SimpleQueue, send: Callable[[tuple], None]) -> None:
    """Send queued deltas to the parent, all that have queued as one message."""
    while True:
        deltas = [outbox.get()]
        while True:
            try:
                deltas.append(outbox.get_nowait())
            except queue.Empty:
                break
        try:
            send(("deltas", deltas))
        except (OSError, ValueError):  # the parent is gone; the call loop sees it too
            return


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
