"""DataLoader workers that decode images while a store is open for writing: they never hold the store, and
they end when the process that runs the DataLoader ends, killed or not (issue #10). And the start of any pool
worker that must end with the process that started it (`start_worker`: the sweep's `--jobs` workers).

This module imports no torch: a spawned worker unpickles its initializer before anything else, so one from here
runs within a second of the worker's start, not after the seconds that importing torch takes."""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1          # linux/prctl.h
PARENT_CHECK_SECONDS = 0.5


def worker_context():
    """The start method of the decoding workers while a store is open for writing.

    A forked worker inherits every descriptor of its parent, the store's flock and HDF5 handle included; after
    a kill -9 of the parent, orphaned workers kept the lock for seconds and an immediate resume was refused.
    forkserver workers fork from a clean server process started by exec, so they never hold the store (and,
    unlike spawn, they do not import torch each: the server imports it once per process, measured 4-6 s on 2
    busy cores, and each worker then starts in about 0.1 s). Opening the store only after the workers start
    would also work, but every extraction path would need to drop and retake the writer's lock around each
    DataLoader."""
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if getattr(getattr(main, "__spec__", None), "name", None) is None and main_file and not os.path.isfile(main_file):
        # a program read from stdin: forkserver and spawn workers must re-import __main__ and cannot. Forked
        # workers inherit the store's descriptors, but die_with ends them as soon as this process ends.
        return multiprocessing.get_context("fork")
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # what unpickling a worker's dataset imports (torch, PIL, torchvision's transforms, the dataset class), once
    context.set_forkserver_preload(["__main__", "embedstore.extract", "torchvision.transforms"])
    return context


def die_with(main_pid: int, _worker_id: int = 0) -> None:
    """DataLoader worker_init_fn (bind main_pid with functools.partial): end this worker when the process that
    runs the DataLoader dies. A forkserver worker's parent is the server, which lives as long as any worker
    does, so neither PR_SET_PDEATHSIG nor torch's parent-pid watchdog ever fires after a kill -9 of the main
    process: the workers (and the server) would live on forever. A daemon thread waits on a pidfd of the main
    process (Linux 5.3+; else polls it) and exits the worker when it is gone."""

    def watch():
        try:
            descriptor = os.pidfd_open(main_pid)
        except (AttributeError, OSError):  # no pidfd here, or the main process is already gone
            descriptor = None
        if descriptor is not None:
            select.select([descriptor], [], [])  # readable once the process has exited
        else:
            while _alive(main_pid):
                time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="die-with-main", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_worker(parent: int, threads: int | None = None) -> None:
    """A spawned pool worker's initializer (ProcessPoolExecutor(initializer=start_worker, initargs=(os.getpid(),
    threads))): end with `parent` however it dies, leave Ctrl-C to it, and use `threads` torch threads."""
    die_with_parent(parent)
    # Ctrl-C from a terminal reaches the whole process group; the parent handles it (and ends its pool). A parent
    # that blocks SIGINT while starting workers (heads/dispatch.py) has it held since this process began, so a
    # Ctrl-C during start-up is discarded here instead of printing a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if threads:
        import torch

        torch.set_num_threads(threads)


def die_with_parent(parent: int) -> None:
    """End this process when its parent `parent` dies, kill -9 included (no orphans holding memory): on Linux,
    prctl(PR_SET_PDEATHSIG, SIGKILL); everywhere, a daemon thread that watches os.getppid() (a dead parent's
    children are handed to another process). A parent already gone is noticed at once. For a directly started
    child only (a forkserver worker's parent is the server: see `die_with`)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:   # it died before prctl took effect: nobody will signal us
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
