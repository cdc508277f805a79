"""
Summarise a py-spy ``--format raw`` (folded stacks) profile: the share of
samples spent in each function, inclusive (anywhere on the stack) and self
(at the top), so that "where the time goes per request" can be read off.

    python bench/folded.py profile.folded [--top 25] [--match twisted/web]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from typing import Dict, Iterable, List, Tuple

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def read_folded(lines: Iterable[str]) -> List[Tuple[List[str], int]]:
    """Parse ``frame;frame;... count`` lines into ``(frames, count)``."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        stacks.append(([_short(f) for f in stack.split(";")], int(count)))
    return stacks


def summarise(stacks: List[Tuple[List[str], int]]) -> Tuple[int, Dict[str, int], Dict[str, int]]:
    """Total samples, inclusive counts and self counts per function."""
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, count in stacks:
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    return total, inclusive, own


#: Where a sample's time goes. The synkeys buckets are looked for anywhere on
#: the sample's stack, in this order, so that Twisted work done on their
#: behalf (Deferred callbacks, response writes) counts for them.
SYNKEYS_BUCKETS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("access log", ("HTTPFactory.log ", "combinedLogFormatter")),
    ("form parsing (email)", ("_parseContentType",)),
    ("store (thread hop, SQL, rebuild)", ("synkeys/storage/", "adbapi", "ThreadWorker",
                                          "threadpool.py", "_threads/", "TimedKeyStore")),
    ("query parsing", ("parse_query_body", "parse_query_path")),
    ("metrics", ("synkeys/metrics.py", "prometheus_client")),
    ("request tracking (health)", ("synkeys/health.py",)),
    ("notary", ("synkeys/notary.py",)),
    ("synkeys resources", ("synkeys/resource.py", "synkeys/http.py", "synkeys/keyserver.py")),
)
#: What is left goes by the innermost frame alone: a system call, Twisted's
#: HTTP code, or the rest of Twisted.
LEAF_BUCKETS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("socket system calls (send, recv, epoll)", ("untilConcludes", "Connection.doRead (",
                                                 "EPollReactor.doPoll", "writeSomeData",
                                                 "_getsockname")),
    ("Twisted HTTP", ("twisted/web/",)),
    ("Twisted reactor and Deferreds", ("twisted/",)),
)


def buckets(stacks: List[Tuple[List[str], int]]) -> Dict[str, int]:
    """Samples per bucket (:data:`SYNKEYS_BUCKETS`, then :data:`LEAF_BUCKETS`), or ``other``."""
    counts: Counter[str] = Counter()
    for frames, count in stacks:
        chosen = next(
            (
                name
                for name, marks in SYNKEYS_BUCKETS
                if any(mark in frame for frame in frames for mark in marks)
            ),
            None,
        )
        if chosen is None and frames:
            chosen = next(
                (name for name, marks in LEAF_BUCKETS if any(m in frames[-1] for m in marks)),
                None,
            )
        counts[chosen or "other"] += count
    return counts


def main() -> None:
    """Print the summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only functions whose name contains this")
    parser.add_argument("--thread", default="mainLoop",
                        help="only stacks through this frame (default: the reactor thread); "
                             "'' for all")
    args = parser.parse_args()
    with open(args.path, encoding="utf-8") as f:
        stacks = [(frames, n) for frames, n in read_folded(f)
                  if not args.thread or any(args.thread in frame for frame in frames)]
    total, inclusive, own = summarise(stacks)
    print(f"{total} samples")
    print("-- where the time goes --")
    for name, count in sorted(buckets(stacks).items(), key=lambda kv: -kv[1]):
        print(f"{100 * count / max(total, 1):5.1f}%  {name}")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title} --")
        shown = [(k, v) for k, v in counts.most_common() if args.match in k][: args.top]
        for name, count in shown:
            print(f"{100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
