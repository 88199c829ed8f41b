"""Where the libraries' own output goes during a stage: the run's log file, and the terminal only on request.

Ray (its Python loggers, its C++ core worker) and img2dataset (print() in its worker processes)
write to the process's file descriptors 1 and 2, not to a stream we hand them, so the capture
works at the file-descriptor level: fds 1 and 2 point at the log file for the duration of the
stage, and whoever renders progress gets the terminal back as a separate stream.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from . import storage
from .storage import Location


def _tee(read_fd: int, log: BinaryIO, terminal_fd: int) -> None:
    """Copy what the libraries write to both the log file and the terminal (--verbose)."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        try:
            while chunk := pipe.read(65536):
                log.write(chunk)
                log.flush()
                os.write(terminal_fd, chunk)
        except (OSError, ValueError):  # the stage ended while a child process still held the pipe
            return


@contextlib.contextmanager
def capture(log_path: Location, verbose: bool = False, terminal_fd: int = 1) -> Iterator[TextIO]:
    """Send fds 1 and 2 to log_path (and, verbose, also to the terminal's stderr); yields the terminal.

    The yielded stream is what the user sees on terminal_fd (1: stdout, 2: stderr) before the
    capture, for progress and notes during the stage. When that sys stream is not backed by its
    fd (a test's capture object), it is that object itself.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = _terminal(terminal_fd, saved[terminal_fd])
    try:
        tee = None
        with storage.open_append(log_path) as log:
            if verbose:
                read_fd, target = os.pipe()
                tee = threading.Thread(target=_tee, args=(read_fd, log, saved[2]), daemon=True)
                tee.start()
            else:
                target = log.fileno()
            streams = sys.stdout, sys.stderr
            try:
                for fd in (1, 2):
                    os.dup2(target, fd)
                # Python-level prints too, even where sys.stdout is not fd 1 (an embedding program, a test).
                sys.stdout, sys.stderr = (_on_fd(fd) for fd in (1, 2))
                yield terminal
            finally:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                sys.stdout, sys.stderr = streams
                for fd in (1, 2):
                    os.dup2(saved[fd], fd)
                if tee is not None:
                    os.close(target)  # the tee sees end-of-file once no process holds the write end
                    tee.join(timeout=5)
                if terminal not in (sys.stdout, sys.stderr):
                    terminal.close()
                for fd in saved.values():
                    os.close(fd)
    finally:
        if storage.exists(log_path) and not storage.size(log_path):
            storage.delete(log_path)  # nothing was said: no empty file beside the run record


def _on_fd(fd: int) -> TextIO:
    return io.TextIOWrapper(open(fd, "wb", closefd=False), encoding="utf-8", errors="replace", line_buffering=True)


def _terminal(fd: int, saved: int) -> TextIO:
    stream = sys.stdout if fd == 1 else sys.stderr
    try:
        backed_by_fd = stream.fileno() == fd
    except (AttributeError, io.UnsupportedOperation, ValueError):
        backed_by_fd = False
    if not backed_by_fd:
        return stream
    return os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", closefd=True)
