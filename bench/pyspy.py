"""Sampling profiles of running services with py-spy, summarised and drawn as flame graphs.

Why: a benchmark that says the mesh costs N ms of CPU per request should also say where that
CPU goes, in a form that can be pasted into a document and compared between revisions. py-spy
samples a running Python process from outside (no code change, no restart, little overhead
with `--nonblocking`, which reads the target's memory without pausing it), so the services
are profiled exactly as they run under load.

`Recorder` runs one `py-spy record --format raw --function --full-filenames --nonblocking` per
process and stops them all with SIGINT (py-spy then writes what it sampled). Idle threads are
not sampled (py-spy's default), so the samples are on-CPU time. Only Python frames are seen:
time in C code shows on the Python frame that called it (gRPC's Cython core run from the
event loop on `Handle._run`, its poller thread on `Thread.run`). `--native` would unwind into
C, but only by pausing the process for every sample, and it counts a thread blocked in
epoll_wait as busy. Each profile becomes:

- `<name>.txt`: the collapsed stacks, one `frame;frame;... count` line per distinct stack (the
  format Brendan Gregg's flamegraph.pl and speedscope read);
- `<name>.svg`: a flame graph of them (root at the bottom, one box per frame, width by
  samples, the frame and its share in each box's tooltip);
- the top frames by self samples (the frame was running) and by inclusive samples (the frame
  was anywhere on the stack), as shares of all samples.

With `--function`, a frame is a function (`name (file:first line)`), not a line, so the
summary adds up per function. File names are shortened here to their import path
(`opentelemetry/instrumentation/grpc/_aio_server.py`, not py-spy's ambiguous
`grpc/_aio_server.py`).
"""

from __future__ import annotations

import asyncio
import html
import shutil
import signal
import sys
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Stacks = Counter[tuple[str, ...]]

# Longest first, so a file is shortened by the most specific import root it sits under.
_ROOTS = sorted(
    {str(Path(p or ".").resolve()) + "/" for p in sys.path if Path(p or ".").is_dir()},
    key=len,
    reverse=True,
)


def py_spy_binary() -> str | None:
    """py-spy from this interpreter's environment (a dev dependency), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def short_frame(frame: str) -> str:
    """`name (/abs/path/pkg/mod.py:12)` as `name (pkg/mod.py:12)`: the path from its import
    root (site-packages, the standard library, the repository)."""
    for root in _ROOTS:
        if root in frame:
            return frame.replace(root, "", 1)
    return frame


def read_collapsed(path: Path) -> Stacks:
    """py-spy's raw output: `frame;frame;... count` per line, root first."""
    stacks: Stacks = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(short_frame(f) for f in stack.split(";"))] += int(count)
    return stacks


def write_collapsed(stacks: Stacks, path: Path) -> None:
    """The stacks with shortened frames, heaviest first."""
    path.write_text(
        "".join(f"{';'.join(stack)} {count}\n" for stack, count in stacks.most_common())
    )


@dataclass(frozen=True)
class Frame:
    """One frame's share of a profile's samples."""

    frame: str
    samples: int
    share: float  # of all samples, 0..1


@dataclass(frozen=True)
class Summary:
    """A profile in a few lines: its sample count and its heaviest frames."""

    name: str
    samples: int
    top_self: list[Frame] = field(default_factory=list)
    top_inclusive: list[Frame] = field(default_factory=list)


def is_scaffolding(frame: str) -> bool:
    """Whether a frame only carries the process (module start-up, the interpreter's runpy,
    the standard library's event loop and threads): on nearly every stack, it says nothing
    about where the time goes, so the inclusive ranking leaves it out."""
    name, _, where = frame.partition(" (")
    if name == "<module>" or where.startswith("<frozen"):
        return True
    top = where.split("/", 1)[0].split(":", 1)[0].removesuffix(".py")
    return top in sys.stdlib_module_names


def summarise(name: str, stacks: Stacks, top: int = 10) -> Summary:
    """Top frames by self samples (leaf of the stack) and by inclusive samples (anywhere on
    the stack, counted once per stack even when the frame recurses; scaffolding left out)."""
    total = sum(stacks.values())
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        if not stack:
            continue
        own[stack[-1]] += count
        for frame in set(stack):
            if not is_scaffolding(frame):
                inclusive[frame] += count

    def frames(counter: Counter[str]) -> list[Frame]:
        return [Frame(f, n, n / total if total else 0.0) for f, n in counter.most_common(top)]

    return Summary(name, total, frames(own), frames(inclusive))


def format_summary(summary: Summary) -> str:
    """The summary as plain text, for a terminal or a fenced block in a document."""
    lines = [f"{summary.name}: {summary.samples} samples on CPU"]
    for title, frames in (
        ("self", summary.top_self),
        ("inclusive (standard library and start-up frames left out)", summary.top_inclusive),
    ):
        lines.append(f"  top by {title}:")
        lines.extend(f"    {f.share * 100:5.1f}%  {f.frame}" for f in frames)
    return "\n".join(lines)


# -- flame graph ------------------------------------------------------------------------------


@dataclass
class _Node:
    name: str
    samples: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _tree(stacks: Stacks) -> _Node:
    root = _Node("all")
    for stack, count in stacks.items():
        node = root
        node.samples += count
        for frame in stack:
            node = node.children.setdefault(frame, _Node(frame))
            node.samples += count
    return root


def _colour(name: str) -> str:
    """A warm colour that depends only on the frame, so a frame keeps its colour across
    graphs and revisions."""
    h = zlib.crc32(name.encode())
    return f"rgb({205 + h % 50},{(h >> 8) % 180 + 40},{(h >> 16) % 55})"


def flamegraph_svg(stacks: Stacks, title: str, width: int = 1200) -> str:
    """A static SVG flame graph: root at the bottom, callees above their callers, each box as
    wide as its share of the samples; hovering a box shows its frame, samples and share."""
    root = _tree(stacks)
    total = max(root.samples, 1)
    row_h, pad, font = 16, 10, 11
    depth = 0

    def measure(node: _Node, level: int) -> None:
        nonlocal depth
        depth = max(depth, level)
        for child in node.children.values():
            measure(child, level + 1)

    measure(root, 0)
    height = (depth + 1) * row_h + 3 * pad + font
    scale = (width - 2 * pad) / total
    boxes: list[str] = []

    def draw(node: _Node, x: float, level: int) -> None:
        w = node.samples * scale
        if w < 0.3:
            return
        y = height - pad - (level + 1) * row_h
        label = html.escape(f"{node.name} ({node.samples} samples, {node.samples / total:.1%})")
        text = ""
        chars = int((w - 4) / (font * 0.6))
        if chars >= 3:
            shown = node.name if len(node.name) <= chars else node.name[: chars - 2] + ".."
            text = (
                f'<text x="{x + 2:.1f}" y="{y + row_h - 4}" font-size="{font}">'
                f"{html.escape(shown)}</text>"
            )
        boxes.append(
            f"<g><title>{label}</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 1}" '
            f'fill="{_colour(node.name)}" rx="1"/>{text}</g>'
        )
        child_x = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, child_x, level + 1)
            child_x += child.samples * scale

    draw(root, pad, 0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace">\n'
        f'<rect width="100%" height="100%" fill="#fafafa"/>\n'
        f'<text x="{pad}" y="{pad + font}" font-size="{font + 2}">{html.escape(title)}</text>\n'
        + "\n".join(boxes)
        + "\n</svg>\n"
    )


# -- recording --------------------------------------------------------------------------------


class ProfileError(RuntimeError):
    """py-spy could not record a profile; the message says why."""


class Recorder:
    """One py-spy per named process, recording until `stop`."""

    def __init__(self, pids: Mapping[str, int], out_dir: Path, rate_hz: int = 100) -> None:
        self._pids = dict(pids)
        self._out_dir = out_dir
        self._rate_hz = rate_hz
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def raw_path(self, name: str) -> Path:
        return self._out_dir / f"{name}.raw.txt"

    async def start(self) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise ProfileError(
                "py-spy is not installed (it is a dev dependency: pip install -e .[dev])"
            )
        self._out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self._pids.items():
            self._procs[name] = await asyncio.create_subprocess_exec(
                binary,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--function",
                "--full-filenames",
                "--nonblocking",
                "--rate",
                str(self._rate_hz),
                "--output",
                str(self.raw_path(name)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        await asyncio.sleep(0.5)  # attaching takes a moment; a py-spy that failed has exited
        failed = [name for name, proc in self._procs.items() if proc.returncode is not None]
        if failed:
            await self.stop()
            raise ProfileError(f"py-spy exited at once for {', '.join(failed)}")

    async def stop(self) -> dict[str, Stacks]:
        """SIGINT every py-spy (it writes its output and exits), wait, read what each wrote."""
        errors: list[str] = []
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        for name, proc in self._procs.items():
            try:
                _, stderr = await asyncio.wait_for(proc.communicate(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                errors.append(f"{name}: py-spy did not stop within 30 s")
                continue
            if proc.returncode != 0:
                errors.append(f"{name}: py-spy exited {proc.returncode}: {stderr.decode()[-300:]}")
        names = list(self._procs)
        self._procs = {}
        if errors:
            raise ProfileError("; ".join(errors))
        profiles = {}
        for name in names:
            raw = self.raw_path(name)
            profiles[name] = read_collapsed(raw) if raw.exists() else Stacks()
            raw.unlink(missing_ok=True)
        return profiles


def write_profiles(
    profiles: Mapping[str, Stacks], out_dir: Path, title: str, top: int = 10
) -> list[Summary]:
    """`<name>.txt` (collapsed stacks) and `<name>.svg` (flame graph) per profile, and the
    summaries, in the order given."""
    summaries = []
    for name, stacks in profiles.items():
        write_collapsed(stacks, out_dir / f"{name}.txt")
        (out_dir / f"{name}.svg").write_text(flamegraph_svg(stacks, f"{name}: {title}"))
        summaries.append(summarise(name, stacks, top))
    return summaries


def summaries_text(summaries: Sequence[Summary]) -> str:
    return "\n\n".join(format_summary(s) for s in summaries)
