"""How a training run stops when asked: SIGINT or SIGTERM becomes a request that the loop honours
at the next batch boundary, after saving its state, and a test hook sends such a signal at a
chosen batch."""
import contextlib
import os
import signal
import threading

from .errors import KDError


class Interrupted(KDError):
    """SIGINT or SIGTERM stopped training at a batch boundary (after the state was saved, when
    the run keeps one)."""

    def __init__(self, signum, epoch, step, saved=True):
        self.signal = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.saved = saved
        super().__init__(f"stopped by {self.signal} at epoch {epoch + 1}, batch {step}")


class StopRequests:
    """While training, SIGINT and SIGTERM only ask to stop (at the next batch boundary); a second
    Ctrl-C stops at once, except while a state is being saved: a save is never cut in half."""

    def __init__(self):
        self.signals, self.saving = [], False

    def __bool__(self):
        return bool(self.signals)

    def ask(self, signum, frame):
        if self.signals and signum == signal.SIGINT and not self.saving:
            raise KeyboardInterrupt
        self.signals.append(signum)

    @contextlib.contextmanager
    def protected(self):
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


@contextlib.contextmanager
def stop_requests():
    """Install StopRequests as the SIGINT and SIGTERM handler for the duration of training."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests  # signal handlers can only be set from the main thread
        return
    old = {sig: signal.signal(sig, requests.ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def signal_at_from_env():
    """A test hook: KD_TEST_SIGNAL_AT="SIGTERM@2:5" makes the run send itself that signal just
    before batch 5 (0-based) of epoch 2 (1-based, as "stopped at epoch 2, batch 5" says), so
    tests stop or kill a run at a chosen batch instead of sleeping a guessed time. Unset: None."""
    spec = os.environ.get("KD_TEST_SIGNAL_AT")
    if not spec:
        return None
    name, _, where = spec.partition("@")
    epoch, _, step = where.partition(":")
    return signal.Signals[name], int(epoch) - 1, int(step)
