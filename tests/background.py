"""Subprocesses that tests check, started as soon as the session's tests are collected.

The CPU suite runs in one process and keeps about one core busy (small models: mostly Python); a test
that runs a script in a child process (the examples, a compile for sm_90) would otherwise leave the
other core idle while it waits. A module lists such children in `BACKGROUND = {test name: Job(...)}`;
`tests/conftest.py` starts those of the selected tests, one after another in a worker thread, and the
test calls `job.result()`: the finished run (or the one in progress, waited for; or, when it was not
started yet, it runs now in the test). The child's command, environment and working directory are the
ones the test would use; its exit status and output are checked by the test exactly as before.
"""
import os
import subprocess
import threading


class Job:
    def __init__(self, args, timeout: float, env_update=None, cwd=None):
        self.args, self.timeout, self.env_update, self.cwd = list(args), timeout, env_update or {}, cwd
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._env = self._cwd = None
        self._proc = None
        self._completed = None
        self._error = None

    def _snapshot(self):
        """The environment and directory of now (the main thread's, before any test patches them)."""
        if self._env is None:
            self._env, self._cwd = {**os.environ, **self.env_update}, self.cwd or os.getcwd()

    def _claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def _run(self):
        """subprocess.run(args, capture_output=True, text=True, timeout=...), killable by `stop`."""
        try:
            self._snapshot()
            with subprocess.Popen(self.args, cwd=self._cwd, env=self._env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) as proc:
                self._proc = proc
                try:
                    stdout, stderr = proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise
                self._completed = subprocess.CompletedProcess(self.args, proc.returncode, stdout, stderr)
        except BaseException as err:  # noqa: BLE001  (handed to the test, which raises it)
            self._error = err
        finally:
            self._done.set()

    def result(self) -> subprocess.CompletedProcess:
        if self._claim():  # not started in the background: run it here
            self._run()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._completed

    def stop(self):
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()


_started: list = []


def start(jobs):
    """Runs `jobs` one after another in a daemon thread (each one not claimed by its test yet)."""
    jobs = list(jobs)
    for job in jobs:
        job._snapshot()
    _started.extend(jobs)

    def work():
        for job in jobs:
            if job._claim():
                job._run()

    if jobs:
        threading.Thread(target=work, name="tests.background", daemon=True).start()


def stop():
    """Kills children still running (an interrupted session)."""
    for job in _started:
        job.stop()
