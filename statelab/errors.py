"""Errors a statelab user sees: each names the thing and what to do."""

from __future__ import annotations


class LabError(Exception):
    """A lab could not be built, run or torn down; the message says why and what to do."""


class MissingDependency(LabError):
    """A program the lab needs is not installed.

    Args:
        binary: the missing program.
        package: the Debian/Ubuntu package that provides it.
    """

    def __init__(self, binary: str, package: str) -> None:
        super().__init__(f"{binary} not found: install it with `sudo apt-get install {package}` "
                         f"(or run `sudo scripts/install.sh`)")
        self.binary = binary
        self.package = package


class ProcessFailed(LabError):
    """A process the lab started exited early; shows its exit code and the tail of its log.

    Args:
        what: which process (e.g. ``redis-server on host state``).
        code: its exit code.
        log_tail: the last lines of its log.
    """

    def __init__(self, what: str, code: int | None, log_tail: str) -> None:
        super().__init__(f"{what} exited with code {code}; last lines of its log:\n{log_tail}")
        self.code = code
