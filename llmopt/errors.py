"""The errors llmopt raises on purpose: each names what is wrong and what to do about it.

`LlmoptError` is the base; the command line prints these as one line (no traceback).
"""


class LlmoptError(Exception):
    """Base of every error llmopt raises for bad input or an impossible request."""


class CaptureError(LlmoptError):
    """torch.export could not capture the model (names the op or construct, and what to try)."""


class VerifyError(LlmoptError):
    """The Program's graph is not well-formed (names the node)."""


class PassError(LlmoptError):
    """A pass cannot run: a missing calibration set, a missing earlier pass, a bad option."""


class EquivalenceError(LlmoptError):
    """Two models that should compute the same function do not (names where they diverge)."""


class DeviceMemoryError(LlmoptError):
    """The device ran out of memory running the model (names the batch and length, and what to shrink);
    `partial` holds the token ids `generate` had made before it ([B, T + n]), or None."""

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial
