"""The trivial NF: sends every inner frame on unchanged. Lets a lab run end to end."""

from __future__ import annotations

import sys
from typing import Sequence

from nfs import nsh
from nfs.runtime import NetworkFunction, Verdict, main


class Forward(NetworkFunction):
    """Forwards every packet unchanged; keeps no state."""

    kind = "forward"

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        return [p.inner for p in packets]


if __name__ == "__main__":
    sys.exit(main(Forward))
