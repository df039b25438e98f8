"""Forwards and adapter changes of one model from several threads: a readers-writer lock per model.

A forward through the model-level entry points (``fastpeft.PeftModel.forward`` / ``generate``,
the forward of a model given the mixin by ``with_adapters``) holds its model's lock *shared*; a
change of the adapters (``load_adapter``, ``add_adapter``, ``delete_adapter``, ``set_adapter``,
enable/disable, merge, unload: the functions of :mod:`fastpeft.tuner`) holds it *exclusively*.
So each forward sees one consistent set of adapters, before or after a change and never half of
it, and a change never meets a forward inside a layer. A waiting change goes before forwards that
come after it (no starvation by a stream of forwards); a forward in progress finishes first.

The lock is re-entrant per thread (a forward hook that calls a forward; a change made from inside
a forward of the same thread proceeds once the *other* threads' forwards are done; a second thread
doing the same at that time gets a ``RuntimeError`` instead of a deadlock). A forward must not
wait for another thread's forward of the same model: with a change waiting, that deadlocks (new
forwards wait for the change, the change for the forward in progress). Locks are kept
in a weak table, not on the model, so models still copy and pickle. Compiled code takes no lock
(``torch.compile`` cannot trace one): a compiled model is one caller's.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch


class RWLock:
    """Shared (``reading``) / exclusive (``writing``) lock, re-entrant per thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> depth of its shared holds
        self._writer: int | None = None
        self._write_depth = 0
        self._writers_waiting = 0
        self._upgrader: int | None = None  # a thread waiting to change from inside its own forward

    @contextlib.contextmanager
    def reading(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                depth = self._readers[me] - 1
                if depth:
                    self._readers[me] = depth
                else:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                upgrading = me in self._readers
                if upgrading:
                    if self._upgrader is not None:  # both would wait for the other's forward forever
                        raise RuntimeError(
                            "two threads are changing the adapters of one model from inside their own forwards "
                            "(e.g. generate callbacks); make the change outside the forward"
                        )
                    self._upgrader = me
                self._writers_waiting += 1
                try:
                    while self._writer is not None or any(t != me for t in self._readers):
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                    if upgrading:
                        self._upgrader = None
                self._writer = me
            self._write_depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._cond.notify_all()


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_table_lock = threading.Lock()


def model_lock(model) -> RWLock:
    """The lock of ``model`` (created on first use)."""
    lock = _locks.get(model)
    if lock is None:
        with _table_lock:
            lock = _locks.get(model)
            if lock is None:
                lock = _locks[model] = RWLock()
    return lock


def reading(model, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``model``'s lock held shared: a model-level forward. While
    compiling, just the call (no lock code is traced)."""
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    with model_lock(model).reading():
        return fn(*args, **kwargs)


def changes(fn):
    """Decorator of a :mod:`fastpeft.tuner` function ``fn(model, ...)`` that changes adapters:
    it runs with ``model``'s lock held exclusively."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with model_lock(model).writing():
            return fn(model, *args, **kwargs)

    return wrapper
