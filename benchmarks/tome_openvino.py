"""Token merging (tomesd) inside a converted OpenVINO UNet: does it convert, is it faster, how far does it move the output?

    python -m benchmarks.tome_openvino --model builtin:sd15 --size 512 --ratio 0.5 --json OUT.json

The UNet (batch 2: one image with guidance) is converted twice at exactly the timed shape: plain, and with
tomesd's patch (use_rand=False, so the graph holds no random draw). Both are compiled as the engine compiles
(LATENCY hint, fp32 or --hint bf16), then timed alternately, round after round. Also: how far OpenVINO's ToMe output is from
PyTorch's ToMe for the same inputs (does the conversion keep it), and how far ToMe moves the UNet's output.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


class _Wrap(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hint", default="f32", help="INFERENCE_PRECISION_HINT: f32, or bf16 where the CPU has it")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import openvino as ov
    import tomesd

    from engine.models.loading import load_model
    from engine.system import hardware

    pipe = load_model(args.model).pipe
    unet = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, args.size // 8, args.size // 8, generator=g)
    t, ehs = torch.tensor([500.0]), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()}
    core = ov.Core()
    out: dict = {"model": args.model, "size": args.size, "ratio": args.ratio, "hint": args.hint,
                 "machine": str(hardware.detect()).splitlines()[0], "convert_and_compile_s": {}}

    def convert(name):
        start = time.perf_counter()
        with torch.no_grad():
            model = ov.convert_model(_Wrap(unet), example_input=(x, t, ehs))
        for port, input_name in zip(model.inputs, feed):
            port.get_tensor().set_names({input_name})
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": args.hint})
        out["convert_and_compile_s"][name] = time.perf_counter() - start
        print(f"{name}: converted and compiled in {out['convert_and_compile_s'][name]:.1f} s", flush=True)
        return compiled

    with torch.no_grad():
        plain_torch = unet(x, t, ehs).sample.numpy()
    compiled = {"plain": convert("plain")}
    tomesd.apply_patch(pipe, ratio=args.ratio, use_rand=False)
    with torch.no_grad():
        tome_torch = unet(x, t, ehs).sample.numpy()
    compiled["tome"] = convert("tome")

    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    for request in requests.values():
        request.infer(feed)  # first call allocates
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.rounds):  # alternate: a slower spell of the machine hits both
        for name, request in requests.items():
            for _ in range(args.repeats):
                start = time.perf_counter()
                request.infer(feed)
                times[name].append(time.perf_counter() - start)
    outputs = {name: np.array(r.get_output_tensor(0).data) for name, r in requests.items()}
    s = {name: statistics.median(v) for name, v in times.items()}
    out.update(s_per_call=s, all_s=times, speedup=s["plain"] / s["tome"],
               openvino_tome_vs_torch_tome_rel_err=rel(outputs["tome"], tome_torch),
               openvino_plain_vs_torch_rel_err=rel(outputs["plain"], plain_torch),
               tome_vs_plain_rel_diff=rel(tome_torch, plain_torch))
    print(f"{args.model} {args.size}px ratio {args.ratio}: plain {s['plain']:.3f} s, ToMe {s['tome']:.3f} s per UNet "
          f"call -> {out['speedup']:.2f}x; OpenVINO ToMe vs PyTorch ToMe rel err "
          f"{out['openvino_tome_vs_torch_tome_rel_err']:.1e}; ToMe moves the output by {out['tome_vs_plain_rel_diff']:.3f}",
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
