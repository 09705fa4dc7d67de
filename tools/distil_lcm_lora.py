"""Distil an LCM-LoRA for `builtin:shapes`: few-step pictures close to what the many-step teacher draws.

    python -m tools.distil_lcm_lora                      # the shipped run -> assets/lora/lcm-shapes.safetensors
    python -m tools.distil_lcm_lora --scale 0.05 --out /tmp/lcm.safetensors   # a quick smoke run

Teacher: `builtin:shapes` itself with DDIM, 30 steps, classifier-free guidance 7 (the sampler and
guidance the LoRA replaces). Student: the same UNet plus a LoRA (rank --rank on every Linear and
Conv2d of the UNet), run as LCM runs it: guidance 1, the LCM boundary condition
f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t).

Consistency distillation asks f to map every point of a teacher ODE trajectory to the trajectory's
end. LCM learns that by bootstrapping (one solver step, an EMA target); on a model this small the
teacher's whole solution is cheap, so this script computes it (30 DDIM steps with CFG from each
starting noise) and trains f towards it directly, on three kinds of point:
  1. the starting noise at t=999 (what a 1-step LCM job sees),
  2. the teacher's own intermediate states at their timesteps (the rest of the trajectory),
  3. the teacher's end point re-noised at the LCM sampler's later timesteps (what steps 2..4 of an
     LCM job see: LCM re-noises its estimate with fresh noise between steps).
Saved in the kohya / AUTOMATIC1111 format (`lora_unet_*.lora_down/lora_up/alpha`), so it loads
through the same path as any user's LoRA. Everything comes from seeded generators.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.train_shapes import sample

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets" / "models" / "shapes"
OUT = ROOT / "assets" / "lora" / "lcm-shapes.safetensors"
TEACHER_STEPS, TEACHER_GUIDANCE = 30, 7.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class LoraWrap(torch.nn.Module):
    """base(x) + up(down(x)) * alpha/rank, for a Linear or Conv2d base (the down conv keeps the base's
    kernel, stride and padding; the up conv is 1x1), so the fused weight is W + (alpha/rank) up @ down."""

    def __init__(self, base: torch.nn.Module, rank: int):
        super().__init__()
        self.base, self.rank, self.alpha, self.enabled = base, rank, float(rank), True
        if isinstance(base, torch.nn.Conv2d):
            self.down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        out = self.base(x)
        return out + self.up(self.down(x)) * (self.alpha / self.rank) if self.enabled else out


def add_lora(unet, rank: int) -> dict[str, LoraWrap]:
    wraps = {}
    targets = [(name, m) for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        wrap = LoraWrap(module, min(rank, getattr(module, "in_channels", getattr(module, "in_features", rank))))
        setattr(parent, child, wrap)
        wraps[name] = wrap
    for p in unet.parameters():
        p.requires_grad_(False)
    for w in wraps.values():
        w.down.weight.requires_grad_(True)
        w.up.weight.requires_grad_(True)
    return wraps


def kohya_state_dict(wraps: dict[str, LoraWrap]) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in wraps.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = w.down.weight.detach().to(torch.float16).contiguous()
        out[f"{key}.lora_up.weight"] = w.up.weight.detach().to(torch.float16).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha))
    return out


def load_parts():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    te = CLIPTextModel.from_pretrained(MODEL / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(MODEL / "unet").eval()
    return tok, te, unet


def scheduler_config() -> dict:
    return json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())


@torch.no_grad()
def embed(tok, te, prompts: list[str]) -> torch.Tensor:
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return te(ids)[0]


@torch.no_grad()
def teacher_trajectories(tok, te, unet, count: int, seed: int, batch: int = 64):
    """(start noise, states [N, S, 4, h, w] at timesteps [S], end latents, prompt embeddings) of DDIM + CFG."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config(), clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(TEACHER_STEPS)
    rng = np.random.default_rng(seed + 11)
    gen = torch.Generator().manual_seed(seed + 12)
    uncond1 = embed(tok, te, [""])
    states, ends, conds = [], [], []
    start = time.perf_counter()
    for i in range(0, count, batch):
        n = min(batch, count - i)
        cond = embed(tok, te, [sample(rng)[1] for _ in range(n)])
        x = torch.randn((n, 4, 16, 16), generator=gen)
        traj = []
        for t in sched.timesteps:
            traj.append(x.to(torch.float16))
            eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond1.expand(n, -1, -1), cond])
                                ).sample.chunk(2)
            x = sched.step(eps_u + TEACHER_GUIDANCE * (eps_c - eps_u), t, x).prev_sample
        states.append(torch.stack(traj, 1))
        ends.append(x)
        conds.append(cond)
        log(f"teacher {i + n}/{count} ({time.perf_counter() - start:.0f} s)")
    return torch.cat(states), sched.timesteps.clone(), torch.cat(ends), torch.cat(conds)


def lcm_boundary(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0):
    """LCMScheduler's c_skip, c_out for timesteps t (diffusers' defaults)."""
    st = t.float() * scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def lcm_timesteps(steps: int) -> torch.Tensor:
    from diffusers import LCMScheduler

    s = LCMScheduler.from_config(scheduler_config())
    s.set_timesteps(steps)
    return s.timesteps.clone()


def train(unet, data, steps: int, seed: int, lr: float, batch: int):
    states, t_states, ends, conds = data
    alphas = torch.tensor(np.asarray(_alphas_cumprod()), dtype=torch.float32)
    later = lcm_timesteps(4)[1:]  # what steps 2..4 of a 4-step LCM job see
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed + 13)
    n, s = states.shape[:2]
    third = batch // 3
    start, running = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = ends[idx]
        # 1. start noise at t=999
        x_a, t_a = states[idx[:third], 0].float(), torch.full((third,), 999)
        # 2. the teacher's own intermediate states
        k = torch.randint(1, s, (third,), generator=gen)
        x_b, t_b = states[idx[third:2 * third], k].float(), t_states[k]
        # 3. the end point re-noised at the LCM sampler's later timesteps (and anywhere, a quarter of them)
        m = batch - 2 * third
        t_c = later[torch.randint(0, len(later), (m,), generator=gen)]
        anywhere = torch.rand(m, generator=gen) < 0.25
        t_c = torch.where(anywhere, torch.randint(0, 1000, (m,), generator=gen), t_c)
        a_c = alphas[t_c].view(-1, 1, 1, 1)
        x_c = a_c.sqrt() * x0[2 * third:] + (1 - a_c).sqrt() * torch.randn(x0[2 * third:].shape, generator=gen)
        x, t = torch.cat([x_a, x_b, x_c]), torch.cat([t_a, t_b, t_c]).long()
        a = alphas[t].view(-1, 1, 1, 1)
        eps = unet(x, t, encoder_hidden_states=conds[idx]).sample
        x0_pred = (x - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip, c_out = lcm_boundary(t)
        f = c_skip * x + c_out * x0_pred
        loss = (torch.sqrt((f - x0) ** 2 + 0.03 ** 2) - 0.03).mean()  # pseudo-Huber, as LCM uses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"lora step {step}/{steps} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")


@torch.no_grad()
def evaluate(unet, wraps, steps_list=(1, 4)) -> dict:
    """The colour test (48 pictures) and mean PSNR to the teacher's picture of the same prompt and seed,
    at guidance 1 with the LCM sampler, with the LoRA and without it."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    from tools.shapes_score import PROMPTS, SEEDS, colours_right, prompt_text, psnr

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, unet=unet, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet.eval()

    def run(prompt, steps, guidance):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(SEEDS)]
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    num_images_per_prompt=SEEDS, width=128, height=128).images

    for w in wraps.values():
        w.enabled = False
    pipe.scheduler = DDIMScheduler.from_config(scheduler_config(), clip_sample=False, set_alpha_to_one=False)
    teacher = {p: run(prompt_text(*p), TEACHER_STEPS, TEACHER_GUIDANCE) for p in PROMPTS}
    pipe.scheduler = LCMScheduler.from_config(scheduler_config())
    out = {}
    for enabled in (False, True):
        for w in wraps.values():
            w.enabled = enabled
        for steps in steps_list:
            good, db = 0, []
            for p in PROMPTS:
                for image, ref in zip(run(prompt_text(*p), steps, 1.0), teacher[p]):
                    good += colours_right(image, p[0], p[2])
                    db.append(psnr(image, ref))
            name = f"{'lora' if enabled else 'plain'}_{steps}step"
            out[name] = {"colours": f"{good}/{len(db)}", "psnr_db": round(float(np.mean(db)), 2)}
            log(f"{name}: colours {good}/{len(db)}, PSNR to teacher {np.mean(db):.2f} dB")
    for w in wraps.values():
        w.enabled = True
    return out


def _alphas_cumprod():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config()).alphas_cumprod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trajectories", type=int, default=1536)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply trajectories and steps (0.05: smoke run)")
    p.add_argument("--no-eval", action="store_true", help="skip the 48-picture evaluation at the end")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "distil_lcm_lora")
    args = p.parse_args(argv)
    args.trajectories = max(8, int(args.trajectories * args.scale))
    args.steps = max(2, int(args.steps * args.scale))
    torch.manual_seed(args.seed)
    seconds = {}
    tok, te, unet = load_parts()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / f"teacher-{args.trajectories}-{args.seed}.pt"
    t0 = time.perf_counter()
    if cache.is_file():
        data = torch.load(cache)
    else:
        data = teacher_trajectories(tok, te, unet, args.trajectories, args.seed)
        torch.save(data, cache)
    seconds["teacher"] = round(time.perf_counter() - t0, 1)
    wraps = add_lora(unet, args.rank)
    t0 = time.perf_counter()
    unet.train()
    train(unet, data, args.steps, args.seed, args.lr, args.batch)
    seconds["train"] = round(time.perf_counter() - t0, 1)
    recipe_eval = evaluate(unet, wraps) if not args.no_eval else {}
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    recipe = {"script": "tools/distil_lcm_lora.py", "base": "builtin:shapes", "teacher": "DDIM 30 steps, CFG 7",
              "trajectories": args.trajectories, "steps": args.steps, "batch": args.batch, "rank": args.rank,
              "lr": args.lr, "seed": args.seed, "seconds": seconds, "eval": recipe_eval, "threads": torch.get_num_threads()}
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file(kohya_state_dict(wraps), str(tmp), metadata={"recipe": json.dumps(recipe), "ss_base_model": "sd1",
                                                           "ss_network_dim": str(args.rank)})
    tmp.replace(args.out)
    log(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); seconds {seconds}")


if __name__ == "__main__":
    main()
