"""The dashboard's pieces: text for each panel (pure functions of `Figures`), the KV block map,
and the help screen.

Panel text is built by plain functions so that what a widget shows is exactly what a test can
compute; the widgets only place it on screen.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Static

from nanovllm.tui.model import (
    HISTORY_S,
    QUANTILES,
    RECENT_S,
    EngineState,
    Figures,
    Percentiles,
    ReplicaView,
)

# One glyph and colour per block state; the glyphs differ so the map reads without colour too.
BLOCK_GLYPHS = {"u": ("█", "green"), "s": ("▓", "magenta"), "c": ("▒", "yellow"), ".": ("·", "grey42")}  # fmt: skip
BLOCK_NAMES = {"u": "used", "s": "shared", "c": "cached", ".": "free"}
# A cell that stands for several blocks shows their most common state; ties go to the busier.
_BUSIEST_FIRST = "suc."


# ---- formatting ----------------------------------------------------------------------------
def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def format_percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:.1f} tok/s"


def format_count(value: float) -> str:
    return f"{value:.0f}"


# ---- panel text ----------------------------------------------------------------------------
def kv_summary(figures: Figures) -> Text:
    engine = figures.engine
    if engine is None:
        return Text.assemble(
            f"used {format_percent(figures.metrics.kv_cache_usage)} (from /metrics); ",
            ("the block map needs /v1/engine/state", "dim"),
        )
    return Text.assemble(
        (f"used {engine.num_used}/{engine.num_blocks} ", "bold"),
        f"({format_percent(engine.num_used / max(engine.num_blocks, 1))})  ",
        f"shared {engine.num_shared}  cached {engine.num_cached}  free {engine.num_free}",
    )


def kv_title(figures: Figures) -> str:
    engine = figures.engine
    if engine is None:
        return "KV cache"
    if engine.replicas:
        each = engine.num_blocks // len(engine.replicas)
        return f"KV cache · {len(engine.replicas)} replicas × {each} blocks × {engine.block_size} tokens"  # fmt: skip
    return f"KV cache · {engine.num_blocks} blocks × {engine.block_size} tokens"


def block_legend(blocks_per_cell: int) -> Text:
    text = Text()
    for state in "usc.":
        glyph, colour = BLOCK_GLYPHS[state]
        text.append(glyph, style=colour)
        text.append(f" {BLOCK_NAMES[state]}  ", style="dim")
    if blocks_per_cell > 1:
        text.append(f"(a cell is {blocks_per_cell} blocks)", style="dim")
    return text


def usage_bar(engine: EngineState, width: int) -> Text:
    """One line: used (shared included), cached and free blocks in proportion."""
    text, total = Text(), max(engine.num_blocks, 1)
    parts = [("u", engine.num_used - engine.num_shared), ("s", engine.num_shared),
             ("c", engine.num_cached)]  # fmt: skip
    filled = 0
    for state, count in parts:
        cells = round(width * count / total)
        cells = min(cells, width - filled)
        text.append(BLOCK_GLYPHS[state][0] * cells, style=BLOCK_GLYPHS[state][1])
        filled += cells
    text.append(BLOCK_GLYPHS["."][0] * (width - filled), style=BLOCK_GLYPHS["."][1])
    return text


def block_map(blocks: str, width: int, rows: int) -> tuple[Text, int]:
    """The blocks as at most width × rows cells, and how many blocks one cell stands for."""
    if not blocks or width <= 0 or rows <= 0:
        return Text(), 1
    per_cell = math.ceil(len(blocks) / (width * rows))
    text = Text()
    for cell, start in enumerate(range(0, len(blocks), per_cell)):
        if cell and cell % width == 0:
            text.append("\n")
        group = blocks[start : start + per_cell]
        state = max(_BUSIEST_FIRST, key=lambda ch: (group.count(ch), -_BUSIEST_FIRST.index(ch)))
        glyph, colour = BLOCK_GLYPHS[state]
        text.append(glyph, style=colour)
    return text, per_cell


def replica_header(replica: ReplicaView) -> list[Text]:
    """Two lines over a replica's map: its label and status, then its load."""
    running = sum(1 for seq in replica.sequences if seq.state == "running")
    style = {"up": "bold green", "restarting": "bold yellow"}.get(replica.status, "bold red")
    title = Text.assemble((f"engine {replica.engine} ", "bold"), (replica.status, style))
    load = Text(f"{running} run · {len(replica.sequences) - running} wait", style="dim")
    if replica.restarts:
        load.append(f" · {replica.restarts} restarts", style="yellow")
    return [title, load]


def replica_maps(replicas: list[ReplicaView], width: int, rows: int) -> tuple[Text, int]:
    """Each replica's header and block map in its own column, side by side; and how many
    blocks a cell stands for (the same in every column)."""
    gap = 2
    column = max((width - gap * (len(replicas) - 1)) // len(replicas), 1)
    per_cell = max(math.ceil(len(r.blocks) / (column * max(rows - 2, 1))) for r in replicas)
    columns = []
    for replica in replicas:
        cells, _ = block_map(replica.blocks, column, math.ceil(len(replica.blocks) / per_cell / column))  # fmt: skip
        header = [line[:column] for line in replica_header(replica)]
        columns.append([*header, *cells.split("\n")])
    text = Text()
    for line in range(max(len(c) for c in columns)):
        if line:
            text.append("\n")
        for i, lines in enumerate(columns):
            part = lines[line] if line < len(lines) else Text()
            text.append_text(part)
            if i < len(columns) - 1:
                text.append(" " * (column - part.cell_len + gap))
    return text, per_cell


def throughput_line(label: str, rate: float | None) -> Text:
    return Text.assemble((f"{label:<11}", "bold"), format_rate(rate))


def latency_table(figures: Figures) -> Text:
    """TTFT and TPOT percentiles over the last minute and since the server started."""
    header = "".join(f"{'p' + format(100 * q, 'g'):>9}" for q in QUANTILES)
    text = Text(f"{'':9}{header}{'reqs':>7}\n", style="bold")
    rows = (
        ("TTFT 1m", figures.ttft_recent),
        ("TTFT all", figures.ttft_all),
        ("TPOT 1m", figures.tpot_recent),
        ("TPOT all", figures.tpot_all),
    )
    for i, (label, percentiles) in enumerate(rows):
        text.append(f"{label:<9}{_percentile_cells(percentiles)}" + ("\n" if i < 3 else ""))
    return text


def _percentile_cells(percentiles: Percentiles | None) -> str:
    if percentiles is None:
        return f"{'-':>9}" * len(QUANTILES) + f"{'-':>7}"
    cells = "".join(f"{format_duration(v):>9}" for v in percentiles.values)
    return cells + f"{format_count(percentiles.count):>7}"


def counters_text(figures: Figures) -> Text:
    metrics = figures.metrics
    reasons = ", ".join(f"{r} {format_count(n)}" for r, n in sorted(metrics.finished.items()) if n)  # fmt: skip
    text = Text()
    text.append(f"finished {format_count(figures.num_finished)}")
    text.append(f" ({reasons})" if reasons else "", style="dim")
    text.append(f"  preemptions {format_count(metrics.preemptions)}\n")
    text.append(f"prefix-cache hit rate {format_percent(figures.prefix_cache_hit_rate)}\n")
    text.append_text(structured_text(figures))
    text.append_text(spec_text(figures))
    return text


def structured_text(figures: Figures) -> Text:
    """Constrained requests and the host time their token masks cost, per masked row."""
    metrics = figures.metrics
    per_row = figures.mask_ms_per_row
    cost = "-" if per_row is None else f"{per_row:.3f} ms/row"
    return Text(
        f"structured {format_count(metrics.constrained_requests)} reqs  masks {cost} "
        f"({format_count(metrics.mask_rows)} rows)\n"
    )


def spec_text(figures: Figures) -> Text:
    spec = figures.spec
    if spec is None:
        return Text("speculative decoding: off", style="dim")
    length = "-" if spec.mean_acceptance_length is None else f"{spec.mean_acceptance_length:.2f}"
    per_pos = " ".join(f"{p:.2f}" for p in spec.per_position) or "-"
    return Text.assemble(
        ("speculative: ", "bold"),
        f"acceptance {format_percent(spec.acceptance_rate)}  ({format_count(spec.num_drafts)} drafts)\n",
        f"mean length {length}  per position {per_pos}",
    )


def requests_title(figures: Figures) -> str:
    engine = figures.engine
    if engine is None:  # the gauges still tell how many
        metrics = figures.metrics
        return f"requests: running {format_count(metrics.running)} · waiting {format_count(metrics.waiting)}"  # fmt: skip
    return (
        f"requests: running {len(engine.running)}/{engine.max_num_seqs} (the batch)"
        f" · waiting {len(engine.waiting)}"
    )


def request_rows(engine: EngineState | None) -> list[tuple[str, ...]]:
    """The table rows: running sequences (the batch) first, then the waiting queue in order."""
    if engine is None:
        return []
    engine_of = engine.engine_of
    return [
        (
            seq.request_id
            + (f" @{engine_of[seq.request_id]}" if seq.request_id in engine_of else ""),
            str(seq.index),
            seq.state,
            str(seq.prompt_tokens),
            str(seq.output_tokens),
            str(seq.computed_tokens),
            str(seq.num_blocks),
            f"{seq.age_s:.1f}s",
        )  # fmt: skip
        for seq in engine.running + engine.waiting
    ]


REQUEST_COLUMNS = ("request", "#", "state", "prompt", "generated", "computed", "blocks", "age")


# ---- widgets -------------------------------------------------------------------------------
class BlockMap(Widget):
    """The usage bar on the first line, then every KV block as a coloured cell."""

    DEFAULT_CSS = "BlockMap { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.engine: EngineState | None = None
        self.blocks_per_cell = 1

    def show(self, engine: EngineState | None) -> None:
        self.engine = engine
        self.refresh()

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        if self.engine is None or width <= 0:
            return Text()
        # Line 1 the bar, line 2 the legend, then the map in the rows that are left: with
        # data-parallel replicas, one column per replica.
        rows = max(height - 2, 1)
        if self.engine.replicas:
            cells, self.blocks_per_cell = replica_maps(self.engine.replicas, width, rows)
        else:
            cells, self.blocks_per_cell = block_map(self.engine.blocks, width, rows)
        text = usage_bar(self.engine, width)
        text.append("\n")
        text.append_text(block_legend(self.blocks_per_cell))
        text.append("\n")
        text.append_text(cells)
        return text


HELP = f"""\
[b]nanovllm top[/b] — a live view of a nanovllm (or vLLM) server

[b]keys[/b]
  q        quit
  p        pause / resume polling (the screen freezes; "PAUSED" shows)
  r        poll now
  ?        this help (escape or ? closes it)

[b]where the figures come from[/b]
  /metrics (Prometheus): throughput, latency, counters, speculation
  /v1/engine/state (JSON, needs the API key if the server has one):
      the request table and the KV block map

[b]windows[/b]
  tok/s: counter deltas between consecutive polls; the sparklines
      span the last {HISTORY_S / 60:g} minutes, one bar per poll or more
  TTFT/TPOT: percentiles estimated from histogram buckets (linear
      interpolation, as Prometheus' histogram_quantile):
      "1m" = requests finished in the last {RECENT_S:g} s (or since the
      dashboard started), "all" = since the server started
  prefix-cache hit rate, preemptions, speculation, structured outputs: since
      the server started; mean acceptance length = 1 + accepted / drafts;
      masks = host time computing token masks per masked logits row

[b]KV blocks[/b]  █ used  ▓ shared by several sequences
  ▒ free but holding a cached prefix  · free
  data-parallel replicas: one map per replica, side by side; a request's
  replica follows its id in the table (req-7-0 @1)"""


class HelpScreen(ModalScreen[None]):
    # A modal screen hides the app's bindings, so q is bound here again.
    BINDINGS = [
        Binding("escape", "close", "close"),
        Binding("question_mark", "close", "close"),
        Binding("q", "app.quit", "quit"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: 80; height: auto; max-height: 90%;
        border: round $accent; padding: 0 1; background: $surface;
    }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help-text")

    def action_close(self) -> None:
        self.dismiss()
