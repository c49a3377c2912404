"""Speed and memory at 8B scale on a GPU, with randomly initialised weights of the
exact Llama-3.1-8B shape (bf16). Timing does not depend on the weights' values;
recall figures from random weights mean nothing and are not reported.

Times: covariance Ĉ over the project's reference texts, injecting 5 facts, injecting
50 facts in one solve, a nap on 10 facts (take-over, LoRA training, validation, all
of its work; whether random weights "recall" anything means nothing); and peak GPU
memory.

With `--deep 1000,10000` it times instead what a deep sleep does over that many held
facts (issue 25: ≤ 2 minutes for 10,000): a keyed memory of one entry per subject
(random δs; keys read on the model), then the deep sleep's passes over all of it —
reading every held fact's keys again, the teacher-forced check that each is still
answered (raw prompt and chat question), perplexity and locality, saving the table —
and v* solved again for `--resolve` of the subjects (the ones a real deep sleep finds
lost). Random weights answer nothing, so the real `Memory.sleep` would solve every
subject again: the passes are timed one by one instead, with the same code.

With `--quantize nf4` the decoder's linear maps are 4-bit NF4 with double quantization
(bitsandbytes `Linear4bit`, as `Memory(quantize="nf4")` loads them), built one map at a time on
the GPU from random bf16 values, so a 70B model never exists whole in bf16 (140 GB) anywhere;
the embeddings, norms and LM head stay bf16. Issue 27: 70B NF4 on one GPU.

With `--device-map auto` the model is placed over all visible GPUs by accelerate (random
weights: built on the host, then `dispatch_model`; `--model`: `load_model(device_map=...)`),
and the result records the number of GPUs and each one's peak memory.

    python benchmarks/scale.py --tokenizer DIR [--layers 12-19]
    python benchmarks/scale.py --tokenizer DIR --deep 1000,10000 [--resolve 0.05]
    python benchmarks/scale.py --shape llama-3.1-70b --tokenizer DIR --device-map auto --layers L-L
    python benchmarks/scale.py --shape llama-3.1-70b --tokenizer DIR --quantize nf4 [--layers 12-15]

DIR holds any tokenizer (the default model's works: its ids fit the Llama-3.1 vocabulary).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from capacity import parse_layers
from common import save

from sleepwake.config import MemoryConfig
from sleepwake.evaluate import held
from sleepwake.keyed import Entry, KeyedMemory
from sleepwake.memory import Memory
from sleepwake.models import Architecture, LoadedModel
from sleepwake.placement import check_device_map, spread
from sleepwake.synthetic import fictional_facts, lifelong_facts

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False),  # to try the code on a CPU
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                          rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
}


def sync() -> None:
    """Wait for every GPU (a device_map spreads the work over several)."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def peaks_gib() -> list[float]:
    """Peak memory of each GPU in GiB since `reset_peaks` (empty on the CPU)."""
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())]


def dispatched(model: torch.nn.Module, device_map: str | dict) -> torch.nn.Module:
    """A model built on the host, placed as `from_pretrained(device_map=...)` places one:
    a strategy is computed by accelerate (balanced over the GPUs for auto/balanced), a dict is used as is."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        split = model._no_split_modules
        memory = None
        if device_map != "sequential":
            memory = get_balanced_memory(model, no_split_module_classes=split, dtype=torch.bfloat16,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=split,
                                           dtype=torch.bfloat16)
    return dispatch_model(model, device_map=device_map)


def random_nf4(cfg, device: str) -> torch.nn.Module:
    """A model of `cfg`'s shape, random weights, its decoder's linear maps in 4-bit NF4.

    Built empty (accelerate's `init_empty_weights`: parameters on the meta device, the
    rotary buffers real), then each linear map of the decoder is drawn in bf16 on
    `device` and quantized there at once, so only one map is ever held in bf16."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from sleepwake.quantize import bitsandbytes, prepare

    linear4bit, params4bit = bitsandbytes().nn.Linear4bit, bitsandbytes().nn.Params4bit
    std = cfg.initializer_range
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if not isinstance(mod, torch.nn.Linear):
                continue
            q = linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                           compress_statistics=True, quant_type="nf4", device="meta")
            w = torch.randn(mod.out_features, mod.in_features, dtype=torch.bfloat16, device=device) * std
            q.weight = params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                  module=q).to(device)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
    for mod in model.modules():  # what is left on meta: embeddings, norms, LM head
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.ones(p.shape, dtype=p.dtype, device=device) if p.dim() == 1 else \
                    torch.randn(p.shape, dtype=p.dtype, device=device) * std
                mod._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        for name, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[name] = b.to(device)
    prepare(model)
    return model


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (a 4-bit weight packs two per byte)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def graph_check(mem: Memory, facts: list) -> dict:
    """v* for the same facts with and without the CUDA graph: time, and whether they agree."""
    from dataclasses import replace

    from sleepwake.inference import attention_kernels
    from sleepwake.memit.requests import build_requests
    from sleepwake.memit.targets import compute_targets, make_slots

    editor = mem.editor()
    runs = {}
    for name, graphs in (("eager", False), ("graph", True)):
        cfg = replace(editor.cfg, cuda_graphs=graphs)
        requests = build_requests(facts, mem.tokenizer, cfg)
        slots = make_slots(requests, cfg, mem.lm.device)
        with attention_kernels(mem.lm.device):  # as `MemitEditor.edit` runs it
            runs[name] = timed(lambda: compute_targets(mem.model, mem.lm.arch, mem.tokenizer, requests, slots,
                                                       editor.layers[-1], cfg))
    (e, e_s), (g, g_s) = runs["eager"], runs["graph"]
    rel = ((e.values - g.values).norm(dim=-1) / e.values.norm(dim=-1)).max()
    return {"v_star_5_eager_s": round(e_s, 3), "v_star_5_graph_s": round(g_s, 3),
            "v_loss_after_eager_graph": [round(e.loss_after, 4), round(g.loss_after, 4)],
            "v_values_max_rel_diff": float(rel)}


def peak_gib() -> float | None:
    """Peak GPU memory in GiB, of the GPU that used most; None on CPU (JSON has no NaN)."""
    return max(peaks_gib(), default=None)


def deep_sleep_costs(mem: Memory, n: int, resolve: float, tmp: str) -> dict:
    """The passes of a deep sleep over `n` held facts (module docstring), timed."""
    facts = lifelong_facts(n, seed=5)
    by_subject: dict[str, list] = {}
    for f in facts:
        by_subject.setdefault(f.subject_key, []).append(f)
    editor = mem.editor()
    reset_peaks()
    keys, build_s = timed(lambda: editor.subject_keys(facts))
    d = mem.model.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    entries = {s: Entry(s, (torch.randn(d, generator=gen) * 0.01).to(mem.lm.device), keys[s]) for s in by_subject}
    table = KeyedMemory(mem.layers[-1], mem.layers[0], mem.config.keyed_threshold, entries)
    mem._rebuild([], [], table)
    rekey, rekey_s = timed(lambda: editor.subject_keys(facts))
    _, check_s = timed(lambda: held(mem.model, mem.tokenizer, facts, chat=True))
    _, measure_s = timed(lambda: (mem.perplexity(), mem.locality()))
    _, save_s = timed(lambda: table.save(f"{tmp}/keyed-{n}.safetensors"))
    size = Path(f"{tmp}/keyed-{n}.safetensors").stat().st_size
    lost = list(by_subject)[: max(1, round(resolve * len(by_subject)))]
    redo = [f for s in lost for f in by_subject[s]]
    _, resolve_s = timed(lambda: [editor.subject_deltas(redo[i:i + 50]) for i in range(0, len(redo), 50)])
    mem._rebuild()
    total = rekey_s + check_s + measure_s + save_s + resolve_s
    return {"held_facts": n, "subjects": len(by_subject), "key_rows": sum(len(k.keys) for k in rekey.values()),
            "table_build_s": round(build_s, 2), "rekey_s": round(rekey_s, 2), "check_s": round(check_s, 2),
            "perplexity_locality_s": round(measure_s, 2), "save_s": round(save_s, 2), "table_mb": round(size / 1e6, 1),
            "resolved_subjects": len(lost), "resolved_facts": len(redo), "resolve_s": round(resolve_s, 2),
            "deep_sleep_s": round(total, 1), "peak_gpu_memory_gib": peak_gib(),
            "peak_gpu_memory_gib_per_gpu": peaks_gib()}


def deep_main(args: argparse.Namespace, lm: LoadedModel, layers: tuple[int, ...], n_params: int, weights: str) -> None:
    """`--deep`: a deep sleep's passes over each number of held facts, saved as one result."""
    mcfg = MemoryConfig(progress=False, batch_size=50).with_memit(layers=layers)
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory(lm, home=f"{tmp}/home", cache_dir=f"{tmp}/cache", config=mcfg, progress=False)
        _, cov_s = timed(mem.editor)
        rows = []
        for n in args.deep:
            rows.append(deep_sleep_costs(mem, n, args.resolve, tmp))
            print(rows[-1], flush=True)
    name = re.sub(r"[^a-z0-9.]+", "-", lm.name.lower()).strip("-") if args.model else args.shape
    save(f"scale-{name}-deep-{'cuda' if torch.cuda.is_available() else 'cpu'}", {
        "note": f"{weights}; timings only. One keyed entry per subject with a random delta; the deep sleep's "
                "passes timed one by one (module docstring)",
        "model": lm.name, "params_billion": round(n_params / 1e9, 3), "layers": list(layers),
        "gpus": torch.cuda.device_count(), "device_map": lm.device_map,
        "covariance_s": round(cov_s, 2), "resolve_share": args.resolve, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", help="a tokenizer's directory (for --shape)")
    ap.add_argument("--model", help="with --deep: a real model (path or id, as load_model takes it) instead of "
                                    "random weights of --shape")
    ap.add_argument("--layers", default=None, help="edited layers (default: 12-19 for --shape, the model's own)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one more 5-fact injection")
    ap.add_argument("--deep", type=lambda v: [int(x) for x in v.split(",")], metavar="N,N",
                    help="time a deep sleep's passes over these numbers of held facts instead")
    ap.add_argument("--resolve", type=float, default=0.05, help="share of subjects --deep solves again")
    ap.add_argument("--quantize", choices=["nf4"], help="the decoder's linear maps in 4-bit NF4 (random weights only)")
    ap.add_argument("--device-map", metavar="MAP", help="place the model over all visible GPUs with accelerate: "
                                                        "auto (or balanced, balanced_low_0, sequential)")
    args = ap.parse_args()
    try:
        device_map = check_device_map(args.device_map)
    except ValueError as exc:
        ap.error(f"--device-map: {exc}")
    if args.quantize and (device_map or args.model):
        ap.error("--quantize is for random weights on one device (not with --model or --device-map)")
    if args.model:
        if not args.deep:
            ap.error("--model is for --deep only")
        from sleepwake.models import load_model

        lm = load_model(args.model, progress=False, device_map=device_map)
        layers = parse_layers(args.layers) if args.layers else tuple(lm.default_layers())
        deep_main(args, lm, layers, sum(p.numel() for p in lm.model.parameters()), "the real weights of " + lm.name)
        return
    if not args.tokenizer:
        ap.error("--tokenizer is needed for random weights of --shape")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(**SHAPES[args.shape])
    torch.manual_seed(0)
    if args.quantize:
        model, build_s = timed(lambda: random_nf4(cfg, device))
    else:
        with torch.device("cpu" if device_map else device):  # placed by accelerate after, never whole on one GPU
            model, build_s = timed(lambda: AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16))
    if device_map:
        model, place_s = timed(lambda: dispatched(model, device_map))
        build_s += place_s
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    if args.quantize:  # a packed 4-bit weight counts as half its values
        n_params = sum(p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1) for p in model.parameters())
    model_gib = tensor_bytes(model) / 2**30
    lm = LoadedModel(model, tok, f"{args.shape} (random init)", f"random-{args.shape}", Architecture(model),
                     quantize=args.quantize, device_map=getattr(model, "hf_device_map", None) if device_map else None)
    layers = parse_layers(args.layers or "12-19")
    if args.deep:
        deep_main(args, lm, layers, n_params, "randomly initialised weights of the real shape")
        return
    mcfg = MemoryConfig(progress=False, batch_size=50).with_memit(layers=layers)
    facts = fictional_facts(80, 1, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory(lm, home=f"{tmp}/home", cache_dir=f"{tmp}/cache", config=mcfg, progress=False)
        reset_peaks()
        _, cov_s = timed(mem.editor)
        phase_peaks = {"covariance": peak_gib()}  # where the peak comes from (printed as it goes: an OOM keeps it)
        print(f"Ĉ {cov_s:.1f} s, peak {phase_peaks['covariance']} GiB", flush=True)
        mem.inject(facts[:5])  # warm-up: kernels, allocator
        five, steps, v_part = [], [], []
        for i in range(args.repeats):
            res, s = timed(lambda i=i: mem.inject(facts[5 + 5 * i : 10 + 5 * i]))
            five.append(s)
            steps.append(res.stats[0].v_steps)
            v_part.append(round(res.stats[0].v_seconds, 3))
        # CUDA graphs run on one GPU: a spread model steps eagerly (`targets.compute_targets`).
        one_gpu = device == "cuda" and not spread(model)
        phase_peaks["inject 5"] = peak_gib()
        print(f"inject 5: {five} s, peak {phase_peaks['inject 5']} GiB", flush=True)
        check = graph_check(mem, fictional_facts(100, 1, seed=4)[:5]) if one_gpu else {}
        phase_peaks["graph check"] = peak_gib()
        print(f"graph check: peak {phase_peaks['graph check']} GiB", flush=True)
        res50, fifty_s = timed(lambda: mem.inject(facts[30:80]))
        peak, peak_each = peak_gib(), peaks_gib()
        if args.profile:
            prof = cProfile.Profile()
            more = fictional_facts(90, 1, seed=3)[80:85]
            prof.runcall(lambda: (mem.inject(more), sync()))
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        mem.close()
        napper = Memory(lm, home=f"{tmp}/nap", cache_dir=f"{tmp}/cache", config=mcfg, progress=False)
        napper.inject(facts[:10])
        if args.profile:
            prof = cProfile.Profile()
            nap, nap_s = prof.runcall(lambda: timed(napper.nap))
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        else:
            nap, nap_s = timed(napper.nap)
        peak_nap, peak_nap_each = peak_gib(), peaks_gib()
    gpus = torch.cuda.device_count()
    save(f"scale-{args.shape}" + (f"-{args.quantize}" if args.quantize else "") + (f"-{gpus}gpu" if device_map else ""), {
        "note": "randomly initialised weights of the real shape; timings only",
        "quantize": args.quantize,
        "params_billion": round(n_params / 1e9, 2),
        "model_gib": round(model_gib, 2),
        "gpus": gpus,
        "device_map": lm.device_map,
        "layers": list(layers),
        "model_build_s": round(build_s, 1),
        "covariance_s": round(cov_s, 2),
        "inject5_s": [round(x, 3) for x in five],
        "inject5_median_s": round(statistics.median(five), 3),
        "inject5_v_steps": steps,
        "inject5_v_star_s": v_part,
        "inject50_one_solve_s": round(fifty_s, 3),
        "inject50_v_steps": res50.stats[0].v_steps,
        "peak_gpu_memory_gib": peak,
        "peak_gpu_memory_gib_per_gpu": peak_each,
        "peak_gpu_memory_gib_after": phase_peaks,
        **check,
        "nap10_s": round(nap_s, 2),
        "nap10_train_steps": nap.train_steps,
        "nap10_status": f"{nap.status} ({nap.reason})",
        "nap10_consolidated_kept": [len(nap.consolidated), len(nap.kept)],
        "nap10_phases_s": nap.phases,
        "peak_gpu_memory_with_nap_gib": peak_nap,
        "peak_gpu_memory_gib_per_gpu_with_nap": peak_nap_each,
    })


if __name__ == "__main__":
    main()
