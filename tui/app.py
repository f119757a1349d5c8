"""`TopApp`: the Textual dashboard behind `nanovllm top`.

A timer starts one poll per interval in a background thread (never two at once); the thread
hands its `Poll` back to the UI thread, where a `Tracker` turns it into `Figures` and every
panel re-renders from them. Network trouble only changes the status line: the last figures
stay on screen and polling goes on, so the dashboard recovers by itself.
"""

from __future__ import annotations

import threading
import time

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Sparkline, Static

from nanovllm.tui.client import Client, Poll
from nanovllm.tui.model import Figures, Tracker
from nanovllm.tui.widgets import (
    REQUEST_COLUMNS,
    BlockMap,
    HelpScreen,
    counters_text,
    kv_summary,
    kv_title,
    latency_table,
    request_rows,
    requests_title,
    throughput_line,
)


class TopApp(App[None]):
    CSS_PATH = "dashboard.tcss"
    TITLE = "nanovllm top"
    ENABLE_COMMAND_PALETTE = False  # every action has its own key
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("p", "toggle_pause", "pause"),
        Binding("r", "poll_now", "poll now"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    def __init__(self, client: Client, interval: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.interval = interval
        self.tracker = Tracker()
        self.figures: Figures | None = None  # what the panels show now
        self.last_poll: Poll | None = None
        self.poll_count = 0  # polls applied to the screen, for tests and scripts
        self.paused = False
        self._polling = False  # a poll thread is out; the next tick skips
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with Horizontal(classes="row"):
            with Vertical(id="kv", classes="box"):
                yield Static(id="kv-summary")
                yield BlockMap(id="kv-map")
            with Vertical(id="throughput", classes="box"):
                yield Static(id="prompt-rate")
                yield Sparkline([], id="prompt-spark")
                yield Static(id="generation-rate")
                yield Sparkline([], id="generation-spark")
        with Horizontal(classes="row"):
            yield Static(id="latency", classes="box")
            yield Static(id="counters", classes="box")
        yield DataTable(id="requests", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#kv").border_title = "KV cache"
        self.query_one("#throughput").border_title = "throughput"
        self.query_one("#latency").border_title = "latency"
        self.query_one("#counters").border_title = "counters (since server start)"
        table = self.query_one("#requests", DataTable)
        table.add_columns(*REQUEST_COLUMNS)
        table.border_title = "requests"
        self._show_status()
        self._timer = self.set_interval(self.interval, self._tick)
        self._tick()

    # ---- polling -------------------------------------------------------------------------
    def _tick(self) -> None:
        if not self.paused:
            self._start_poll()

    def _start_poll(self) -> None:
        if self._polling:
            return
        self._polling = True
        # A daemon thread rather than a Textual worker: the app must quit at once even while
        # a request hangs until its timeout, and Textual waits for its worker threads.
        threading.Thread(target=self._poll_in_thread, name="nanovllm-top-poll", daemon=True).start()  # fmt: skip

    def _poll_in_thread(self) -> None:
        poll = self.client.poll()  # never raises
        try:
            self.call_from_thread(self._apply, poll)
        except Exception:  # the app closed while this poll was out
            pass

    def _apply(self, poll: Poll) -> None:
        self._polling = False
        self.last_poll = poll
        if poll.metrics is not None:
            self.figures = self.tracker.update(poll.t, poll.wall, poll.metrics, poll.engine)
        self.poll_count += 1
        try:
            if poll.metrics is not None:
                self._render_figures(self.figures)
            self._show_status()
        except Exception as e:  # a display bug: say so on the status line, keep polling
            self._set_status(Text(f"display error: {e!r}", style="bold red"))

    # ---- rendering -----------------------------------------------------------------------
    def _render_figures(self, figures: Figures) -> None:
        self.query_one("#kv").border_title = kv_title(figures)
        self.query_one("#kv-summary", Static).update(kv_summary(figures))
        self.query_one("#kv-map", BlockMap).show(figures.engine)
        self.query_one("#prompt-rate", Static).update(throughput_line("prompt", figures.prompt_tps))  # fmt: skip
        self.query_one("#prompt-spark", Sparkline).data = figures.prompt_tps_history
        self.query_one("#generation-rate", Static).update(
            throughput_line("generation", figures.generation_tps)
        )
        self.query_one("#generation-spark", Sparkline).data = figures.generation_tps_history
        self.query_one("#latency", Static).update(latency_table(figures))
        self.query_one("#counters", Static).update(counters_text(figures))
        table = self.query_one("#requests", DataTable)
        table.border_title = requests_title(figures)
        table.clear()
        table.add_rows(request_rows(figures.engine))

    def status_text(self) -> Text:
        """The status line: the server, the last poll's outcome, and the pause marker."""
        text = Text()
        if self.paused:
            text.append(" PAUSED ", style="bold black on yellow")
            text.append(" ")
        poll = self.last_poll
        if poll is None:
            text.append(f"connecting to {self.client.url} …")
        elif poll.error is None:
            text.append("● ", style="bold green")
            text.append(self.client.url)
            if poll.metrics.model_name:
                text.append(f"  {poll.metrics.model_name}", style="bold")
            text.append(f"  polled {_clock(poll.wall)}  every {self.interval:g}s")
        else:
            style = "bold red" if poll.metrics is None or poll.key_refused else "bold yellow"
            text.append("✖ ", style=style)
            text.append(poll.error, style=style)
            if poll.metrics is None:
                text.append(f" — retrying every {self.interval:g}s", style=style)
                if self.figures is not None:
                    text.append(f" (showing data from {_clock(self.figures.polled_at)})")
        return text

    def _show_status(self) -> None:
        self._set_status(self.status_text())

    def _set_status(self, text: Text) -> None:
        self.query_one("#status", Static).update(text)

    # ---- keys ----------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if self._timer is not None:
            self._timer.pause() if self.paused else self._timer.resume()
        if not self.paused:
            self._start_poll()
        self._show_status()

    def action_poll_now(self) -> None:
        self._start_poll()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))
