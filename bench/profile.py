"""py-spy's collapsed stacks, summed into the profile's top lines.

``py-spy record --format raw`` writes one line per distinct stack,
``frame;frame;...;leaf COUNT``, each frame ``function (file:line)``. We add
the samples per function (line numbers dropped): *self* counts a sample for
the leaf only, *total* for every function on the stack (once per stack).

    python -m bench.profile RAW_FILE [TOP]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summarize(raw: str, top: int = 25) -> dict:
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_samples[frames[-1]] += n
        for function in set(frames):
            total_samples[function] += n
    return {
        "samples": samples,
        "self": [(f, n, round(100 * n / samples, 1)) for f, n in self_samples.most_common(top)] if samples else [],
        "total": [(f, n, round(100 * n / samples, 1)) for f, n in total_samples.most_common(top)] if samples else [],
    }


def render(summary: dict, top: int = 25) -> str:
    lines = [f"{summary['samples']} samples", "", "self %  function (where)"]
    lines += [f"{pct:6.1f}  {f}" for f, _n, pct in summary["self"][:top]]
    lines += ["", "total %  function (where)"]
    lines += [f"{pct:7.1f}  {f}" for f, _n, pct in summary["total"][:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    print(render(summarize(Path(sys.argv[1]).read_text(), top), top))
