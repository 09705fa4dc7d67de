"""Train `builtin:shapes`: a small Stable Diffusion model that draws coloured shapes.

Everything it learns from is drawn here (shapes of named colours on named backgrounds,
at named positions and sizes, with a caption per image), so it needs no download.
Output is an ordinary diffusers StableDiffusionPipeline folder (safetensors), tokenized
with the project's own vocabulary, so every runtime and task runs on it.

    python -m tools.train_shapes --out assets/models/shapes            # the shipped run
    python -m tools.train_shapes --out /tmp/shapes --scale 0.05        # a quick smoke run

Three phases, each saved under --work so a run can stop and go on (`--resume`):
VAE (autoencoder on random crops), latents (encode the training set once), UNet + text
encoder (trained together on the latents, with 10% empty captions for guidance), EMA.
Reproducible from --seed: data, init and batch order come from seeded generators.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128  # native resolution (latent 16x16)
VAE_BATCH, VAE_CROP = 16, 64  # VAE: random 64x64 crops, 16 per step
UNET_BATCH = 64

COLOURS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 220, 30), "green": (30, 160, 60),
    "blue": (30, 70, 220), "purple": (140, 50, 180), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# phrase -> centre (x, y) as fractions of the image
POSITIONS = {
    "in the center": (0.5, 0.5), "in the top left corner": (0.27, 0.27), "in the top right corner": (0.73, 0.27),
    "in the bottom left corner": (0.27, 0.73), "in the bottom right corner": (0.73, 0.73),
    "on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27), "at the bottom": (0.5, 0.73),
}
SIZES = {"small": 0.13, "large": 0.34}  # radius as a fraction of the image; no word = medium
MEDIUM = 0.22


@dataclass
class Item:
    colour: str
    shape: str
    cx: float
    cy: float
    radius: float


def draw(items: list[Item], background: str, size: int = SIZE) -> Image.Image:
    """Draw at 4x and downsample, so edges are antialiased like a real picture."""
    big = size * 4
    image = Image.new("RGB", (big, big), COLOURS[background])
    pen = ImageDraw.Draw(image)
    for it in items:
        x, y, r = it.cx * big, it.cy * big, it.radius * big
        fill = COLOURS[it.colour]
        if it.shape == "circle":
            pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif it.shape == "square":
            s = r * 0.85
            pen.rectangle([x - s, y - s, x + s, y + s], fill=fill)
        elif it.shape == "triangle":
            pen.polygon([(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)], fill=fill)
        else:  # star: five points, inner radius 0.45
            pts = []
            for k in range(10):
                a = -math.pi / 2 + k * math.pi / 5
                rr = r if k % 2 == 0 else r * 0.45
                pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
            pen.polygon(pts, fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def sample(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One random picture and its caption."""
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    n = 1 if rng.random() < 0.75 else 2
    items, phrases = [], []
    taken: list[tuple[float, float, float]] = []
    for _ in range(n):
        colour = names[rng.integers(len(names))]
        while colour == background:
            colour = names[rng.integers(len(names))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        size_word = None
        r = rng.uniform(0.18, 0.26)
        if rng.random() < 0.5:
            size_word = list(SIZES)[rng.integers(len(SIZES))]
            r = SIZES[size_word] * rng.uniform(0.9, 1.1)
        if n > 1:
            r = min(r, 0.2)
        pos_word = None
        for _try in range(20):
            if rng.random() < 0.6:
                pos_word = list(POSITIONS)[rng.integers(len(POSITIONS))]
                cx, cy = POSITIONS[pos_word]
                cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
            else:
                pos_word = None
                cx, cy = rng.uniform(0.5 - (0.5 - r) * 0.9, 0.5 + (0.5 - r) * 0.9, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr) ** 2 for x, y, rr in taken):
                break
        cx = float(np.clip(cx, r * 0.9, 1 - r * 0.9))
        cy = float(np.clip(cy, r * 0.9, 1 - r * 0.9))
        taken.append((cx, cy, r))
        items.append(Item(colour, shape, cx, cy, r))
        words = ["a"] + ([size_word] if size_word else []) + [colour, shape] + ([pos_word] if pos_word else [])
        phrases.append(" ".join(words))
    caption = " and ".join(phrases) + f" on a {background} background"
    return draw(items, background), caption


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- components


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16,
        sample_size=SIZE, scaling_factor=1.0,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.text.vocab import load_tokenizer

    tok = load_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    return tok, CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        # Cross-attention at 8x8 and 4x4 only: half the training time of attending at 16x16 too.
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16,
    )


# ---------------------------------------------------------------- phases


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_vae(work: Path, steps: int, seed: int, batch: int = VAE_BATCH, crop: int = VAE_CROP):
    # Random 64x64 crops. Whole 128x128 pictures at batch 4 (same pixels per step) were tried and
    # collapsed to two or three colours in 1,500 steps, while the crop-trained VAE keeps all eight
    # (it decodes the middle of a 128x128 flat background a little dull: yellow 216,182,53 for 245,220,30).
    vae = make_vae()
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(steps):
        images = [sample(rng)[0] for _ in range(batch)]
        x = to_tensor(images)
        ox, oy = rng.integers(0, SIZE - crop + 1, size=2) // 8 * 8
        x = x[:, :, oy:oy + crop, ox:ox + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()  # per latent element
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    vae.eval()
    vae.save_pretrained(work / "vae")
    return vae


def encode_set(work: Path, vae, count: int, seed: int):
    rng = np.random.default_rng(seed + 2)
    means, stds, captions = [], [], []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, count, 64):
            pairs = [sample(rng) for _ in range(min(64, count - i))]
            dist = vae.encode(to_tensor([p[0] for p in pairs])).latent_dist
            means.append(dist.mean.to(torch.float16))
            stds.append(dist.std.to(torch.float16))
            captions += [p[1] for p in pairs]
            if i % 2048 == 0:
                log(f"encoded {i}/{count} ({time.perf_counter() - start:.0f} s)")
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.float().std())
    torch.save({"mean": mean, "std": std, "captions": captions, "scaling": scaling}, work / "latents.pt")
    log(f"latents: {tuple(mean.shape)}, scaling factor {scaling:.4f}")


def train_unet(work: Path, steps: int, seed: int, batch: int = UNET_BATCH, lr: float = 8e-4, offset: float = 0.2):
    from diffusers import DDPMScheduler

    from engine.models.builtin import SD_SCHEDULER_CONFIG

    torch.manual_seed(seed + 3)
    data = torch.load(work / "latents.pt")
    mean, std, captions, scaling = data["mean"].float(), data["std"].float(), data["captions"], data["scaling"]
    tok, text_encoder = make_text_encoder()
    unet = make_unet()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "timestep_spacing"})
    alphas = noise_sched.alphas_cumprod
    ids_all = tok(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = ids_all[-1]
    ids_all = ids_all[:-1]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.03)
    gen = torch.Generator().manual_seed(seed + 4)
    n = mean.shape[0]
    start = time.perf_counter()
    running = None
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1
        ids[drop] = empty_ids
        # Offset noise: a per-channel constant added to the noise. These pictures are mostly one flat
        # colour, and with plain noise the mean of x_t still gives that colour away at t=999, so the
        # model learned to read the background from the mean of its starting noise and ignore the
        # prompt (guidance 1 got the background right about 1 time in 5). The offset makes the mean
        # unreliable, so the colour has to come from the text.
        noise = torch.randn(latents.shape, generator=gen)
        noise = noise + offset * torch.randn(batch, noise.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for store, model in ((ema, unet), (ema_te, text_encoder)):
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        store[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
    unet.load_state_dict(ema)
    text_encoder.load_state_dict(ema_te)
    unet.save_pretrained(work / "unet")
    text_encoder.save_pretrained(work / "text_encoder")
    tok.save_pretrained(work / "tokenizer")
    (work / "scaling.json").write_text(json.dumps({"scaling_factor": scaling}))


def assemble(work: Path, out: Path, args: argparse.Namespace, seconds: dict):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from engine.models.builtin import SD_SCHEDULER_CONFIG

    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(scaling_factor=json.loads((work / "scaling.json").read_text())["scaling_factor"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps({
        "script": "tools/train_shapes.py", "seed": args.seed, "vae_steps": args.vae_steps,
        "latent_images": args.images, "unet_steps": args.unet_steps, "offset_noise": args.offset_noise,
        "vae_batch": VAE_BATCH, "vae_crop": VAE_CROP, "unet_batch": UNET_BATCH, "seconds": seconds,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2) + "\n")
    if (out / "README.md").is_file():  # the hand-written model card outlives a retrain
        shutil.copy2(out / "README.md", tmp / "README.md")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"saved {out} ({total / 1e6:.1f} MB)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "models" / "shapes")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "train_shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--unet-steps", type=int, default=1900)
    p.add_argument("--offset-noise", type=float, default=0.2, help="per-channel noise offset in UNet training")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.05 for a smoke run)")
    p.add_argument("--resume", action="store_true", help="reuse finished phases found in --work")
    p.add_argument("--only", choices=("vae", "latents", "unet", "assemble"), help="run one phase")
    args = p.parse_args(argv)
    for name in ("vae_steps", "images", "unet_steps"):
        setattr(args, name, max(1, int(getattr(args, name) * args.scale)))
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    seconds_path = args.work / "seconds.json"
    seconds = json.loads(seconds_path.read_text()) if args.resume and seconds_path.exists() else {}

    def phase(name, done, run):
        if (args.only and args.only != name) or (args.resume and done()):
            return
        t = time.perf_counter()
        run()
        seconds[name] = round(time.perf_counter() - t, 1)
        seconds_path.write_text(json.dumps(seconds))

    def vae_phase():
        train_vae(args.work, args.vae_steps, args.seed)

    def latents_phase():
        from diffusers import AutoencoderKL

        encode_set(args.work, AutoencoderKL.from_pretrained(args.work / "vae").eval(), args.images, args.seed)

    phase("vae", lambda: (args.work / "vae").is_dir(), vae_phase)
    phase("latents", lambda: (args.work / "latents.pt").is_file(), latents_phase)
    phase("unet", lambda: (args.work / "unet").is_dir(), lambda: train_unet(args.work, args.unet_steps, args.seed,
                                                                     offset=args.offset_noise))
    if not args.only or args.only == "assemble":
        assemble(args.work, args.out, args, seconds)
        log(f"phase seconds: {seconds}")


if __name__ == "__main__":
    main()
