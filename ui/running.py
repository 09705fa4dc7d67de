"""Running engine calls from handlers: errors become one gr.Error line; generations stream live status."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gradio as gr

from engine import Engine, UserError
from ui.formatting import history_rows, live_markdown, readout_markdown, waiting_markdown

log = logging.getLogger(__name__)
POLL_S = 0.3


def user_facing(error: Exception, what: str) -> gr.Error:
    """A UserError is the user's to fix and says so itself; anything else is logged and reported in one line."""
    if isinstance(error, UserError):
        if error.__cause__ is not None:  # the page gets one line; the log keeps what caused it
            log.warning("%s: %s", what, error, exc_info=error)
        return gr.Error(str(error))
    log.exception("%s failed", what, exc_info=error)
    return gr.Error(f"{what} failed: {type(error).__name__}: {error}. The engine is still usable.")


@contextmanager
def reported(what: str) -> Iterator[None]:
    """Inside a handler: any failure reaches the page as one gr.Error line."""
    try:
        yield
    except gr.Error:
        raise
    except Exception as e:
        raise user_facing(e, what) from None


def run_in_thread(call: Callable) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = call()
        except Exception as e:  # raised again by stream_job, in the request's own thread
            box["error"] = e

    thread = threading.Thread(target=target, name="generation", daemon=True)
    thread.start()
    return thread, box


def stream_job(engine: Engine, call: Callable, progress, shown: Callable | None = None):
    """Run `call()` in a thread; yield (preview, live line) while it runs, then (images, readout, parameters,
    history). `shown(result)` picks the (images, seeds) to show; the default is the result's own."""
    thread, box = run_in_thread(call)
    progress(0, desc="Waiting for the device")
    last_preview = -1
    while thread.is_alive():
        thread.join(POLL_S)
        place = engine.queue_place(thread.ident)
        if place is not None:  # another job holds the device: say where this one stands
            progress(0, desc=f"Waiting: number {place.place} in line")
            yield gr.skip(), waiting_markdown(place), gr.skip(), gr.skip()
            continue
        live = engine.live(thread.ident)
        if live.running and live.total:
            progress((live.step, live.total), desc=f"Step {live.step}/{live.total}")
        preview = gr.skip()
        if live.running and live.preview is not None and live.preview_step != last_preview:
            last_preview = live.preview_step
            preview = [(live.preview, f"preview, step {live.preview_step}")]
        yield preview, live_markdown(engine, live), gr.skip(), gr.skip()
    if "error" in box:
        raise user_facing(box["error"], "Generation")
    result = box["result"]
    images, seeds = shown(result) if shown else (result.images, result.seeds)
    captions = [(image, f"seed {seed}") for image, seed in zip(images, seeds)]
    yield (captions, readout_markdown(result.readout, result.seeds, result.saved_paths), result.parameters,
           history_rows(engine))
