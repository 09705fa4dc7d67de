"""A comparison as one picture: the grid drawn with PIL (each column's image, time, memory and PSNR), and the
parameters text its PNG carries (A1111's, with `Compare: AXIS` and one `Column N` pair per column)."""
from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING

from engine.compare.columns import CompareColumn
from engine.requests import Txt2ImgRequest
from engine.store.metadata import format_parameters, format_value

MIN_CELL = 256  # px: smaller images are enlarged (nearest, pixels kept) so the text under them fits

if TYPE_CHECKING:
    from engine.engine import Engine


def column_line(column: CompareColumn) -> str:
    """One column for the PNG text: its value and figures, ';' separated."""
    if column.result is None:
        return f"{column.value}; {column.error or 'not run'}"
    s = column.summary()
    vram = f"; VRAM {s['peak_vram_gib']:.2f} GiB" if s["peak_vram_gib"] is not None else ""
    return (f"{column.value}; {s['total_s']:.3f} s; setup {s['setup_s']:.2f} s; RAM {s['peak_ram_gib']:.2f} GiB{vram}; "
            f"PSNR {s['psnr']}; {s['runtime']} {s['precision']}; {s['steps']} steps; {s['sampler']}; "
            f"CFG {s['guidance']:g}")


def parameters_text(engine: Engine, base: Txt2ImgRequest, axis: str, columns: list[CompareColumn]) -> str:
    """The base request as A1111 "parameters" text, with the axis and one `Column N` pair per column."""
    text = format_parameters({"task": "compare", "model": engine.model.name, "runtime": engine.status()["runtime"],
                              **base.model_dump()})
    pairs = [f"Compare: {format_value(axis)}"]
    pairs += [f"Column {i}: {format_value(column_line(c))}" for i, c in enumerate(columns, 1)]
    return text + ", " + ", ".join(pairs)


def _cell_lines(column: CompareColumn) -> list[str]:
    if column.result is None:
        return []
    s = column.summary()
    memory = f"peak RAM {s['peak_ram_gib']:.2f} GiB"
    if s["peak_vram_gib"] is not None:
        memory += f", VRAM {s['peak_vram_gib']:.2f} GiB"
    steps = (f"stopped: {s['steps']} of {column.request.steps} steps" if column.stopped
             else f"{s['steps']} steps, {s['sampler']}")
    return [f"{s['total_s']:.2f} s end to end", memory, f"PSNR: {s['psnr']}", f"{s['runtime']}, {s['precision']}",
            steps]


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; the last line cut with an ellipsis."""
    chars = max(8, int(width / max(1.0, draw.textlength("n", font=font))))
    lines = textwrap.wrap(text, chars) or [""]
    while chars > 8 and any(draw.textlength(line, font=font) > width for line in lines):
        chars -= 2
        lines = textwrap.wrap(text, chars)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, len(lines[-1]) - 1)] + "…"
    return lines


def draw_grid(base: Txt2ImgRequest, axis: str, columns: list[CompareColumn], model_name: str):
    """The images side by side: a caption, a header per column and the figures under each image."""
    from PIL import Image, ImageDraw, ImageFont

    sizes = [c.image.size for c in columns if c.image is not None] or [(base.width, base.height)]
    w, h = max(s[0] for s in sizes), max(s[1] for s in sizes)
    scale = max(1, math.ceil(MIN_CELL / w))
    cell_w, cell_h = w * scale, h * scale
    pad = max(8, cell_w // 24)
    head_size, text_size = max(16, cell_w // 14), max(13, cell_w // 19)
    head_font, text_font = ImageFont.load_default(size=head_size), ImageFont.load_default(size=text_size)
    head_h, line_h = int(head_size * 1.5), int(text_size * 1.35)
    width = pad + len(columns) * (cell_w + pad)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption = _wrap(scratch, f"{base.prompt or '(no prompt)'}  ·  seed {base.seed}, {w}x{h}, "
                             f"{model_name}, compared by {axis}", text_font, width - 2 * pad, 2)
    caption_h = len(caption) * line_h + pad
    text_lines = max([len(_cell_lines(c)) for c in columns] + [5])
    height = pad + caption_h + head_h + cell_h + pad + text_lines * line_h + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(caption):
        draw.text((pad, pad + k * line_h), line, fill=(60, 60, 60), font=text_font)
    top = pad + caption_h
    for i, column in enumerate(columns):
        x = pad + i * (cell_w + pad)
        label = _wrap(draw, column.label, head_font, cell_w, 1)[0]
        draw.text((x, top), label, fill="black", font=head_font)
        image_top = top + head_h
        if column.image is not None:
            image = column.image.convert("RGB")
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(image, (x, image_top))
            for k, line in enumerate(_cell_lines(column)):
                draw.text((x, image_top + cell_h + pad + k * line_h), line, fill=(20, 20, 20), font=text_font)
        else:
            draw.rectangle([x, image_top, x + cell_w - 1, image_top + cell_h - 1], fill=(238, 238, 238),
                           outline=(200, 200, 200))
            message = _wrap(draw, column.error or "not run", text_font, cell_w - 2 * pad, max(1, cell_h // line_h - 1))
            for k, line in enumerate(message):
                draw.text((x + pad, image_top + pad + k * line_h), line, fill=(160, 30, 30), font=text_font)
    return grid
