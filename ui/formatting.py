"""Text the UI shows: the readout beside an image, the live line, engine and option summaries, history rows."""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.system.devices import GIB

if TYPE_CHECKING:
    from engine import Engine
    from engine.runtimes.base import WarmupResult
    from engine.system.telemetry import Readout

HISTORY_COLUMNS = ["time", "task", "size", "images", "steps", "runtime", "precision", "total_s", "it_per_s",
                   "peak_ram_gib", "shape"]


def _vram(readout: Readout) -> str:
    if readout.peak_vram_allocated_bytes is None:
        return "n/a (CPU)"
    return (f"{readout.peak_vram_allocated_bytes / GIB:.2f} GiB alloc / "
            f"{(readout.peak_vram_reserved_bytes or 0) / GIB:.2f} GiB reserved")


def _pretty(name: str) -> str:
    return name.replace("_", " ").capitalize().replace("Lora", "LoRA")


def readout_markdown(readout: Readout, seeds: list[int], saved: list[str] | None = None) -> str:
    rows = [
        ("Total", f"**{readout.total_s:.2f} s**"),
        *[(_pretty(name), f"{s:.2f} s") for name, s in readout.stages_s.items()],
        ("Speed", f"{readout.it_per_s:.2f} it/s ({readout.steps} steps)"),
        ("Peak RAM", f"{readout.peak_rss_bytes / GIB:.2f} GiB"),
        ("Peak VRAM", _vram(readout)),
        ("Runtime", f"{readout.runtime} on {readout.device}"),
        ("Precision", readout.precision),
        ("Shape", readout.shape_cache),
        ("Size", f"{readout.width}x{readout.height}, {readout.batch_size} image(s)"),
        ("Seeds", ", ".join(str(s) for s in seeds)),
        ("Model", readout.model),
    ]
    rows += [(_pretty(k), f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in readout.details.items()]
    text = "| Readout | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if readout.notices:
        text += "\n\n" + "\n".join(f"- {n}" for n in readout.notices)
    if saved:
        text += "\n\nSaved: " + ", ".join(f"`{p}`" for p in saved)
    return text


def live_markdown(engine: Engine, live=None) -> str:
    """The running job's line; `live` is that job's LiveStatus (with replicas each job has its own)."""
    live = live or engine.live()
    if not live.running:
        return engine.waiting_text
    eta = f"{live.eta_s:.1f} s" if live.eta_s is not None else "…"
    memory = engine.memory_text(live)  # where it runs: this machine, or a replica
    where = f" · on replica {live.where}" if live.where else ""
    return (f"**{live.task}: step {live.step} of {live.total or '…'}** · elapsed {live.elapsed_s:.1f} s · "
            f"{live.it_per_s:.2f} it/s · about {eta} left · {memory}{where}")


def waiting_markdown(place) -> str:
    """A waiting job's line: its place, what is ahead, and about how long until it starts."""
    ordinal = {1: "1st", 2: "2nd", 3: "3rd"}.get(place.place, f"{place.place}th")
    ahead = ", ".join(place.ahead) if place.ahead else "nothing (starting)"
    when = (f"about {place.wait_s:.0f} s before it starts" if place.wait_s is not None
            else "no estimate yet (a job of that kind has not finished here)")
    return f"**Waiting for {place.waits_for}: {ordinal} in line** · ahead: {ahead} · {when}"


def engine_markdown(engine: Engine) -> str:
    s = engine.status()
    lines = [f"**Runtime:** {s['runtime']} on {s['device']} ({s['precision']}) — {s['reason']}",
             f"**Model:** {s['model'] or 'none loaded'}" + (f" ({s['family']})" if s["family"] else "")
             + (f"; LoRAs fused: {', '.join(s['loras'])}" if s.get("loras") else "")]
    if s.get("cpu"):
        lines.append(f"**CPU:** {s['cpu']}")
    if s.get("replicas"):
        lines.append(f"**Replicas:** {s['replicas']}")
    lines += [f"- {name}: not used — {why}" for name, why in (s["skipped"] or {}).items()]
    if s.get("decisions"):
        lines.append("**Chosen for this machine:**\n" + "\n".join(f"- {d}" for d in s["decisions"]))
    return "\n\n".join(lines)


def options_markdown(engine: Engine) -> str:
    s = engine.status()
    applied = ", ".join(s["applied"]) if s["applied"] else "no runtime-side optimizations"
    lines = [f"**In effect on {s['runtime']}:** {applied}"]
    lines += [f"- **{label}** is ticked but not applied: {why}" for label, why in (s["not_applied"] or {}).items()]
    return "\n".join(lines)


def history_rows(engine: Engine) -> list[list]:
    return [[row.get(c, "") for c in HISTORY_COLUMNS] for row in engine.history]


def warmup_markdown(results: list[WarmupResult]) -> str:
    rows = [f"| {r.width}x{r.height} | {r.state} | {r.seconds:.2f} s |" for r in results]
    return "| size | result | seconds |\n|---|---|---|\n" + "\n".join(rows)
