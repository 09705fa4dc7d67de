"""Gradio Blocks: txt2img, img2img, hires fix, tiled upscale, PNG info, Engine; live readout and history."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, get_args

import gradio as gr
import psutil

from engine import Engine, UserError
from engine.metadata import parse_parameters
from engine.options import LABELS, PRESETS_DIR, Optimizations, Preset, load_preset, preset_names, save_preset
from engine.outputs import read_parameters
from engine.requests import (MAX_BATCH, MAX_BATCH_COUNT, MAX_SIZE, MAX_STEPS, MIN_SIZE, HiresUpscaler, ResizeMode,
                             parse_sizes)
from engine.runtimes import CHOICES
from engine.schedulers import DEFAULT_SAMPLER, SAMPLER_NAMES
from engine.telemetry import Readout

log = logging.getLogger(__name__)
CSS_PATH = Path(__file__).resolve().parent.parent / "assets" / "style.css"
RESIZE_MODES = get_args(ResizeMode)
HIRES_UPSCALERS = get_args(HiresUpscaler)
HISTORY_COLUMNS = ["time", "task", "size", "images", "steps", "runtime", "precision", "total_s", "it_per_s",
                   "peak_ram_gib", "shape"]
POLL_S = 0.3
GIB = 1024**3


def readout_markdown(readout: Readout, seeds: list[int], saved: list[str] | None = None) -> str:
    vram = ("n/a (CPU)" if readout.peak_vram_allocated_bytes is None
            else f"{readout.peak_vram_allocated_bytes / GIB:.2f} GiB alloc / "
                 f"{(readout.peak_vram_reserved_bytes or 0) / GIB:.2f} GiB reserved")
    rows = [
        ("Total", f"**{readout.total_s:.2f} s**"),
        *[(name.replace("_", " ").capitalize(), f"{s:.2f} s") for name, s in readout.stages_s.items()],
        ("Speed", f"{readout.it_per_s:.2f} it/s ({readout.steps} steps)"),
        ("Peak RAM", f"{readout.peak_rss_bytes / GIB:.2f} GiB"),
        ("Peak VRAM", vram),
        ("Runtime", f"{readout.runtime} on {readout.device}"),
        ("Precision", readout.precision),
        ("Shape", readout.shape_cache),
        ("Size", f"{readout.width}x{readout.height}, {readout.batch_size} image(s)"),
        ("Seeds", ", ".join(str(s) for s in seeds)),
        ("Model", readout.model),
    ]
    rows += [(k.replace("_", " ").capitalize(), f"{v:.2f}" if isinstance(v, float) else str(v))
             for k, v in readout.details.items()]
    text = "| Readout | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if readout.notices:
        text += "\n\n" + "\n".join(f"- {n}" for n in readout.notices)
    if saved:
        text += "\n\nSaved: " + ", ".join(f"`{p}`" for p in saved)
    return text


def live_markdown(engine: Engine) -> str:
    live = engine.live
    if not live.running:
        return "Waiting for the device (one job runs at a time)…"
    ram = psutil.Process().memory_info().rss / GIB
    vram = "n/a"
    if engine.runtime.device.startswith("cuda"):
        import torch

        vram = f"{torch.cuda.memory_allocated() / GIB:.2f} GiB"
    eta = f"{live.eta_s:.1f} s" if live.eta_s is not None else "…"
    return (f"**{live.task}: step {live.step} of {live.total or '…'}** · elapsed {live.elapsed_s:.1f} s · "
            f"{live.it_per_s:.2f} it/s · about {eta} left · RAM {ram:.2f} GiB · VRAM {vram}")


def engine_markdown(engine: Engine) -> str:
    s = engine.status()
    lines = [f"**Runtime:** {s['runtime']} on {s['device']} ({s['precision']}) — {s['reason']}",
             f"**Model:** {s['model'] or 'none loaded'}" + (f" ({s['family']})" if s["family"] else "")]
    for name, why in s["skipped"].items():
        lines.append(f"- {name}: not used — {why}")
    return "\n\n".join(lines)


OPTION_HELP = {
    "precision": "auto: fp16 on CUDA, bf16 on CPUs with hardware bf16, else fp32",
    "int8_weights": "weights compressed to int8 (nncf): less memory",
    "int8_convolutions": "int8 weights, and convolutions run in int8 (calibrated once): least memory",
    "compiled_blob_cache": "keep compiled graphs on disk: faster restarts, more peak RAM",
    "channels_last": "NHWC memory layout for convolutions",
    "attention": "SDPA (PyTorch's fused attention) or xformers",
    "attention_slicing": "attention in slices: less memory, a little slower",
    "torch_compile": "compile the UNet (first run is slow)",
    "token_merging_ratio": "merge similar tokens in self-attention; changes the image slightly",
    "deepcache_interval": "full UNet every N steps, shallow ones between; 0 = off",
    "vae_slicing": "decode a batch one image at a time",
    "vae_tiling": "decode large images in 512 px tiles",
    "tiny_vae": "decode and preview with TAESD: much faster, slightly softer",
    "prompt_cache": "reuse text-encoder outputs for a prompt seen before",
    "result_cache": "an identical request (model, parameters, seed) returns its saved image",
    "early_stop_threshold": "end when the latents change less than this per step; 0 = off",
}


def option_component(name: str, value: Any, reason: str | None):
    """One control per Optimizations field; a control that cannot act here is disabled and says why."""
    label = LABELS[name]
    info = f"Unavailable: {reason}" if reason else OPTION_HELP.get(name, "")
    common = {"label": label, "info": info, "interactive": reason is None, "elem_id": f"opt-{name}"}
    if name == "precision":
        return gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value=value, **common)
    if name == "attention":
        return gr.Radio(["sdpa", "xformers"], value=value, **common)
    if name == "token_merging_ratio":
        return gr.Slider(0, 0.75, value=value, step=0.05, **common)
    if name == "deepcache_interval":
        return gr.Slider(0, 10, value=value, step=1, **common)
    if name == "early_stop_threshold":
        return gr.Slider(0, 0.5, value=value, step=0.0025, **common)
    return gr.Checkbox(value=value, **common)


def option_updates(engine: Engine, values: Optimizations | None = None) -> list:
    """gr.update per option control: value (when given), enabled or not, and the reason."""
    reasons = engine.option_reasons()
    out = []
    for name in Optimizations.model_fields:
        why = reasons.get(name)
        update = {"interactive": why is None, "info": f"Unavailable: {why}" if why else OPTION_HELP.get(name, "")}
        if values is not None:
            update["value"] = getattr(values, name)
        out.append(gr.update(**update))
    return out


def options_markdown(engine: Engine) -> str:
    s = engine.status()
    lines = [f"**In effect on {s['runtime']}:** " + (", ".join(s["applied"]) if s["applied"] else "no runtime-side "
                                                       "optimizations")]
    for label, why in s["not_applied"].items():
        lines.append(f"- **{label}** is ticked but not applied: {why}")
    return "\n".join(lines)


def history_rows(engine: Engine) -> list[list]:
    return [[row.get(c, "") for c in HISTORY_COLUMNS] for row in engine.history]


def _user_facing(e: Exception, what: str) -> gr.Error:
    if isinstance(e, UserError):
        return gr.Error(str(e))
    log.exception("%s failed", what)
    return gr.Error(f"{what} failed: {type(e).__name__}: {e}. The engine is still usable.")


def _common_controls(d: dict[str, Any]) -> list:
    """Steps, guidance, sampler, seed, batch size: the same five controls on every generating tab."""
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps")
        guidance = gr.Slider(0, 30, value=d["guidance"], step=0.5, label="Guidance (CFG)")
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value=d["sampler"], label="Sampler")
        seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1 = random)")
        batch = gr.Slider(1, MAX_BATCH, value=d["batch_size"], step=1, label="Batch size")
    return [steps, guidance, sampler, seed, batch]


def _prompt_boxes(d: dict[str, Any], lines: int = 2):
    prompt = gr.Textbox(label="Prompt", value=d["prompt"], lines=lines)
    negative = gr.Textbox(label="Negative prompt", value=d["negative_prompt"], lines=max(1, lines - 1))
    return prompt, negative


def _buttons(label: str = "Generate"):
    with gr.Row():
        go = gr.Button(label, variant="primary", scale=3)
        stop = gr.Button("Stop", variant="stop", scale=1)
    return go, stop


def _outputs(label: str = "Images"):
    gallery = gr.Gallery(label=label, format="png", columns=2, height=420)
    readout = gr.Markdown("Readout appears here after a generation.", elem_id="readout")
    with gr.Accordion("Parameters used", open=False):
        params = gr.JSON(label="Parameters")
    return gallery, readout, params


def common_request(steps_v, guidance_v, sampler_v, seed_v, batch_v) -> dict[str, Any]:
    return {"steps": steps_v, "guidance": guidance_v, "sampler": sampler_v,
            "seed": -1 if seed_v is None else seed_v, "batch_size": batch_v}


def stream_job(engine: Engine, call: Callable, progress, shown: Callable | None = None):
    """Run `call()` in a thread; yield live readout and previews, then the final result."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = call()
        except Exception as e:  # reported below, in the request's own thread
            box["error"] = e

    thread = threading.Thread(target=target, name="generation", daemon=True)
    thread.start()
    progress(0, desc="Waiting for the device")
    last_preview = -1
    while thread.is_alive():
        thread.join(POLL_S)
        live = engine.live
        if live.running and live.total:
            progress((live.step, live.total), desc=f"Step {live.step}/{live.total}")
        preview = gr.skip()
        if live.running and live.preview is not None and live.preview_step != last_preview:
            last_preview = live.preview_step
            preview = [(live.preview, f"preview, step {live.preview_step}")]
        yield preview, live_markdown(engine), gr.skip(), gr.skip()
    if "error" in box:
        raise _user_facing(box["error"], "Generation")
    result = box["result"]
    images, seeds = (shown or (lambda r: (r.images, r.seeds)))(result)
    captions = [(img, f"seed {s}") for img, s in zip(images, seeds)]
    yield (captions, readout_markdown(result.readout, result.seeds, result.saved_paths), result.parameters,
           history_rows(engine))


def build_ui(engine: Engine, defaults: dict[str, Any] | None = None, presets_dir: Path = PRESETS_DIR) -> gr.Blocks:
    d = {"prompt": "", "negative_prompt": "", "width": 256, "height": 256, "steps": 20, "guidance": 7.0,
         "sampler": DEFAULT_SAMPLER, "seed": -1, "batch_size": 1, **(defaults or {})}

    with gr.Blocks(title="Fast SD") as demo:
        gr.Markdown("## Fast SD — the runtime picked for your hardware, with the numbers beside every image")
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt, negative = _prompt_boxes(d, lines=3)
                        with gr.Row():
                            width = gr.Slider(MIN_SIZE, MAX_SIZE, value=d["width"], step=8, label="Width")
                            height = gr.Slider(MIN_SIZE, MAX_SIZE, value=d["height"], step=8, label="Height")
                        t2i_common = _common_controls(d)
                        batch_count = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count")
                        generate, t2i_stop = _buttons()
                    with gr.Column(scale=2):
                        gallery, readout, params = _outputs()

            with gr.Tab("img2img", id="img2img"):
                with gr.Row():
                    with gr.Column(scale=3):
                        i2i_image = gr.Image(label="Init image", type="pil", image_mode="RGB", height=300)
                        i2i_prompt, i2i_negative = _prompt_boxes(d)
                        with gr.Row():
                            i2i_strength = gr.Slider(0, 1, value=0.6, step=0.05, label="Denoising strength")
                            i2i_mode = gr.Radio(list(RESIZE_MODES), value="resize", label="Resize mode")
                        with gr.Row():
                            i2i_width = gr.Number(value=0, precision=0, label="Width (0 = input's)")
                            i2i_height = gr.Number(value=0, precision=0, label="Height (0 = input's)")
                            i2i_vae_tiling = gr.Checkbox(value=False, label="Tiled VAE")
                        i2i_common = _common_controls(d)
                        i2i_go, i2i_stop = _buttons()
                    with gr.Column(scale=2):
                        i2i_gallery, i2i_readout, i2i_params = _outputs()

            with gr.Tab("hires fix", id="hires"):
                with gr.Row():
                    with gr.Column(scale=3):
                        hr_prompt, hr_negative = _prompt_boxes(d)
                        with gr.Row():
                            hr_width = gr.Slider(MIN_SIZE, MAX_SIZE, value=d["width"], step=8, label="Base width")
                            hr_height = gr.Slider(MIN_SIZE, MAX_SIZE, value=d["height"], step=8, label="Base height")
                        with gr.Row():
                            hr_factor = gr.Slider(1.25, 4, value=2, step=0.05, label="Upscale by")
                            hr_upscaler = gr.Dropdown(list(HIRES_UPSCALERS), value="latent (bicubic)",
                                                      label="Upscaler")
                        with gr.Row():
                            hr_strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Hires denoising strength")
                            hr_steps = gr.Slider(0, MAX_STEPS, value=0, step=1, label="Hires steps (0 = same)")
                            hr_vae_tiling = gr.Checkbox(value=False, label="Tiled VAE")
                        hr_common = _common_controls(d)
                        hr_go, hr_stop = _buttons()
                    with gr.Column(scale=2):
                        hr_gallery, hr_readout, hr_params = _outputs(label="Base and final")

            with gr.Tab("tiled upscale", id="upscale"):
                with gr.Row():
                    with gr.Column(scale=3):
                        up_image = gr.Image(label="Image to upscale", type="pil", image_mode="RGB", height=300)
                        up_prompt, up_negative = _prompt_boxes(d)
                        with gr.Row():
                            up_factor = gr.Slider(1, 4, value=2, step=0.25, label="Upscale by")
                            up_strength = gr.Slider(0, 1, value=0.35, step=0.05, label="Denoising strength")
                        with gr.Row():
                            up_tile = gr.Slider(64, 1024, value=min(512, d["width"]), step=8, label="Tile size")
                            up_overlap = gr.Slider(0, 256, value=64, step=8, label="Tile overlap")
                        up_common = _common_controls(d)
                        up_go, up_stop = _buttons("Upscale")
                    with gr.Column(scale=2):
                        up_gallery, up_readout, up_params = _outputs(label="Upscaled")

            with gr.Tab("PNG info", id="pnginfo"):
                with gr.Row():
                    with gr.Column():
                        png_image = gr.Image(label="A PNG this app (or A1111) saved", type="filepath", height=300)
                        send_button = gr.Button("Send to txt2img")
                    with gr.Column():
                        png_text = gr.Textbox(label="Parameters text", lines=6, interactive=False)
                        png_fields = gr.JSON(label="Parsed")

            with gr.Tab("Engine", id="engine"):
                engine_info = gr.Markdown(engine_markdown(engine))
                with gr.Row():
                    runtime_choice = gr.Dropdown(list(CHOICES), value=engine.runtime_wish, label="Runtime")
                    apply_runtime = gr.Button("Use this runtime")
                with gr.Row():
                    warmup_box = gr.Textbox(label="Warm up sizes (WIDTHxHEIGHT, comma separated)",
                                            value=f"{d['width']}x{d['height']}", scale=3)
                    warmup_button = gr.Button("Warm up")
                warmup_report = gr.Markdown("")
                with gr.Row():
                    model_box = gr.Textbox(label="Model (builtin:NAME, hub id owner/name, or a name under the models folder)",
                                           value=engine.model.name if engine.model else "builtin:shapes")
                    load_button = gr.Button("Load model")
                engine_message = gr.Markdown("")
                gr.Textbox(str(engine.hardware), label="Hardware", lines=8, interactive=False)

            with gr.Tab("Optimizations", id="optimizations"):
                gr.Markdown("Pick a preset or tick what you want, then **Apply**. A box that cannot act with this "
                            "runtime on this hardware is greyed out and says why. Options the runtime owns "
                            "re-prepare the model when they change.")
                with gr.Row():
                    preset_choice = gr.Dropdown(preset_names(presets_dir), value=d.get("preset"), label="Preset",
                                                info="sets the boxes below and the sampler, steps and guidance")
                    preset_about = gr.Markdown("")
                reasons = engine.option_reasons()
                option_boxes = []
                names = list(Optimizations.model_fields)
                for start in range(0, len(names), 4):
                    with gr.Row():
                        for name in names[start:start + 4]:
                            option_boxes.append(option_component(name, getattr(engine.optimizations, name),
                                                                 reasons.get(name)))
                with gr.Row():
                    apply_options = gr.Button("Apply", variant="primary")
                    preset_name = gr.Textbox(label="Save as preset (name)", placeholder="my-preset", scale=2)
                    save_button = gr.Button("Save as preset")
                options_info = gr.Markdown(options_markdown(engine))

        with gr.Accordion("History (last jobs, newest first)", open=False):
            history = gr.Dataframe(headers=HISTORY_COLUMNS, value=history_rows(engine) or None, interactive=False,
                                   wrap=True)

        # ---------------------------------------------------------- handlers

        # Every input is a named positional parameter: Gradio only hooks up a Progress that follows those.
        def run_txt2img(prompt_v, negative_v, width_v, height_v, count_v, steps_v, guidance_v, sampler_v, seed_v,
                        batch_v, progress=gr.Progress()):
            common = (steps_v, guidance_v, sampler_v, seed_v, batch_v)
            request = {"prompt": prompt_v or "", "negative_prompt": negative_v or "", "width": width_v,
                       "height": height_v, "batch_count": count_v, **common_request(*common)}
            yield from stream_job(engine, lambda: engine.txt2img(request), progress)

        def run_img2img(image, prompt_v, negative_v, strength_v, mode_v, width_v, height_v, tiling_v, steps_v,
                        guidance_v, sampler_v, seed_v, batch_v, progress=gr.Progress()):
            common = (steps_v, guidance_v, sampler_v, seed_v, batch_v)
            request = {"prompt": prompt_v or "", "negative_prompt": negative_v or "", "strength": strength_v,
                       "resize_mode": mode_v, "width": int(width_v) if width_v else None,
                       "height": int(height_v) if height_v else None, "vae_tiling": bool(tiling_v),
                       **common_request(*common)}
            yield from stream_job(engine, lambda: engine.img2img(request, image), progress)

        def run_hires(prompt_v, negative_v, width_v, height_v, factor_v, upscaler_v, strength_v, hsteps_v, tiling_v,
                      steps_v, guidance_v, sampler_v, seed_v, batch_v, progress=gr.Progress()):
            common = (steps_v, guidance_v, sampler_v, seed_v, batch_v)
            request = {"prompt": prompt_v or "", "negative_prompt": negative_v or "", "width": width_v,
                       "height": height_v, "factor": factor_v, "upscaler": upscaler_v, "hires_strength": strength_v,
                       "hires_steps": hsteps_v, "vae_tiling": bool(tiling_v), **common_request(*common)}
            yield from stream_job(engine, lambda: engine.hires_fix(request), progress,
                                  shown=lambda r: (r.extra_images["base"] + r.images, r.seeds * 2))

        def run_upscale(image, prompt_v, negative_v, factor_v, strength_v, tile_v, overlap_v, steps_v, guidance_v,
                        sampler_v, seed_v, batch_v, progress=gr.Progress()):
            common = (steps_v, guidance_v, sampler_v, seed_v, batch_v)
            request = {"prompt": prompt_v or "", "negative_prompt": negative_v or "", "factor": factor_v,
                       "strength": strength_v, "tile_size": tile_v, "tile_overlap": overlap_v,
                       **common_request(*common)}
            request.pop("batch_size")
            yield from stream_job(engine, lambda: engine.tiled_upscale(request, image), progress)

        generate.click(run_txt2img, inputs=[prompt, negative, width, height, batch_count, *t2i_common],
                       outputs=[gallery, readout, params, history], api_name="txt2img")
        i2i_go.click(run_img2img, inputs=[i2i_image, i2i_prompt, i2i_negative, i2i_strength, i2i_mode, i2i_width,
                                          i2i_height, i2i_vae_tiling, *i2i_common],
                     outputs=[i2i_gallery, i2i_readout, i2i_params, history], api_name="img2img")
        hr_go.click(run_hires, inputs=[hr_prompt, hr_negative, hr_width, hr_height, hr_factor, hr_upscaler,
                                       hr_strength, hr_steps, hr_vae_tiling, *hr_common],
                    outputs=[hr_gallery, hr_readout, hr_params, history], api_name="hires_fix")
        up_go.click(run_upscale, inputs=[up_image, up_prompt, up_negative, up_factor, up_strength, up_tile,
                                         up_overlap, *up_common],
                    outputs=[up_gallery, up_readout, up_params, history], api_name="tiled_upscale")
        for i, button in enumerate((t2i_stop, i2i_stop, hr_stop, up_stop)):
            # Not queued: it must run while the generation holds the queue's one slot.
            button.click(engine.stop, queue=False, api_name="stop" if i == 0 else False)

        def read_png(path):
            if not path:
                return "", None
            try:
                from PIL import Image

                with Image.open(path) as image:
                    text = read_parameters(image)
            except Exception as e:
                raise _user_facing(UserError(f"Could not read that image ({type(e).__name__})."), "PNG info") from None
            if not text:
                return "This image carries no generation parameters.", None
            return text, parse_parameters(text)

        png_image.change(read_png, inputs=[png_image], outputs=[png_text, png_fields], api_name="png_info")

        def send_to_txt2img(fields):
            if not fields:
                raise gr.Error("No parameters to send: open a PNG with generation parameters first.")
            get = fields.get
            return (get("prompt", ""), get("negative_prompt", ""), get("width", d["width"]), get("height", d["height"]),
                    get("steps", d["steps"]), get("guidance", d["guidance"]),
                    get("sampler", d["sampler"]) if get("sampler") in SAMPLER_NAMES else d["sampler"],
                    get("seed", -1), gr.Tabs(selected="txt2img"))

        send_button.click(send_to_txt2img, inputs=[png_fields],
                          outputs=[prompt, negative, width, height, *t2i_common[:4], tabs])

        def use_runtime(wish, progress=gr.Progress()):
            progress(0, desc=f"Preparing {wish} (first use of a model converts it; later starts read the cache)")
            try:
                choice = engine.set_runtime(wish)
            except Exception as e:
                raise _user_facing(e, "Switching runtime") from None
            return (engine_markdown(engine), f"Now using **{choice.name}** ({engine.runtime.precision}): {choice.reason}.",
                    options_markdown(engine), *option_updates(engine))

        apply_runtime.click(use_runtime, inputs=[runtime_choice],
                            outputs=[engine_info, engine_message, options_info, *option_boxes], api_name="set_runtime")

        def options_from(values) -> Optimizations:
            data = dict(zip(Optimizations.model_fields, values))
            data["deepcache_interval"] = int(data["deepcache_interval"] or 0)
            try:
                return Optimizations.model_validate(data)
            except Exception as e:
                raise gr.Error(f"Invalid options: {e}") from None

        def apply_opts(*values):  # options the runtime owns re-prepare the model (seconds on a big one)
            try:
                engine.set_optimizations(options_from(values))
            except Exception as e:
                raise _user_facing(e, "Applying options") from None
            return options_markdown(engine), engine_markdown(engine)

        apply_options.click(apply_opts, inputs=option_boxes, outputs=[options_info, engine_info],
                            api_name="set_optimizations")

        def pick_preset(name):
            if not name:
                return (gr.skip(),) * (1 + len(option_boxes) + 3)
            try:
                preset = load_preset(name, presets_dir)
            except Exception as e:
                raise _user_facing(e, "Loading the preset") from None
            dflt = preset.defaults
            return (f"*{preset.description}*", *option_updates(engine, preset.optimizations),
                    dflt.steps if dflt.steps is not None else gr.skip(),
                    dflt.guidance if dflt.guidance is not None else gr.skip(),
                    dflt.sampler if dflt.sampler is not None else gr.skip())

        preset_choice.change(pick_preset, inputs=[preset_choice],
                             outputs=[preset_about, *option_boxes, *t2i_common[:3]], api_name="preset")

        def save_as(name, steps_v, guidance_v, sampler_v, *values):
            try:
                preset = Preset(name=(name or "").strip(), description="Saved from the UI.",
                                optimizations=options_from(values),
                                defaults={"steps": int(steps_v), "guidance": float(guidance_v), "sampler": sampler_v})
                path = save_preset(preset, presets_dir)
            except Exception as e:
                raise _user_facing(e, "Saving the preset") from None
            return gr.update(choices=preset_names(presets_dir), value=preset.name), f"Saved `{path.name}`."

        save_button.click(save_as, inputs=[preset_name, *t2i_common[:3], *option_boxes],
                          outputs=[preset_choice, preset_about], api_name="save_preset")

        def warm_up(text, progress=gr.Progress()):
            try:
                sizes = parse_sizes(text)
                rows = []
                for i, size in enumerate(sizes):
                    progress((i, len(sizes)), desc=f"Warming up {size[0]}x{size[1]}")
                    for r in engine.warmup([size]):
                        rows.append(f"| {r.width}x{r.height} | {r.state} | {r.seconds:.2f} s |")
            except Exception as e:
                raise _user_facing(e, "Warm-up") from None
            return "| size | result | seconds |\n|---|---|---|\n" + "\n".join(rows)

        warmup_button.click(warm_up, inputs=[warmup_box], outputs=[warmup_report], api_name="warmup")

        def load(source, progress=gr.Progress()):
            progress(0, desc=f"Loading {source}")
            try:
                # Remote users may only name builtins, hub ids and models under --models-dir.
                model = engine.load(source, allow_any_path=False)
            except Exception as e:
                raise _user_facing(e, "Loading the model") from None
            return engine_markdown(engine), f"Loaded **{model.name}** ({model.family}) in {model.load_seconds:.1f} s."

        load_button.click(load, inputs=[model_box], outputs=[engine_info, engine_message], api_name="load_model")
    return demo


def launch_kwargs() -> dict[str, Any]:
    return {"css": CSS_PATH.read_text(encoding="utf-8") if CSS_PATH.is_file() else None}
