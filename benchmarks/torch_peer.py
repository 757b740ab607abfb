"""The same model and training step in PyTorch (eager and torch.compile), timed alternately with ours.

    python benchmarks/torch_peer.py --config=configs/perf.py --out=results/perf/cpu_torch_peer.json
    python benchmarks/torch_peer.py --config=configs/perf.py:preset=tiny --compile_backend=none   # smoke

Three trainers on one synthetic batch and thread count, timed alternately: ``jax`` (the library's step),
``torch_eager`` (``config.model``'s ViT, BERT, co-attention, MLP head written in torch below under our parameter
names; AdamW on our schedule, clipping) and ``torch_compile``. First the torch model takes our initial parameters
and must give our loss and gradients on the batch (``equality_check``), else nothing is timed. Writes one JSON object:
that check, step times, torch / ours ratios (> 1: ours faster), each side's MFU against its own matmul peak, both
parameter counts and torch's FLOP counter beside our analytic count.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as jax_bench  # noqa: E402  (benchmarks/train_step.py)

from vtfusion_jax import layers, losses, models, optim, speed  # noqa: E402
from vtfusion_jax.models.vtfusion import shared_settings  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6  # equality_check's tolerance: float32 summation-order noise passes (see there)
LN_EPS = layers.LayerNorm.epsilon  # the fusion's and the head's LayerNorms


class MHA(nn.ModuleDict):
    """attention.MultiHeadAttention: query/key/value/out projections around F.scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int):
        super().__init__({n: nn.Linear(d, d) for n in ("query", "key", "value", "out")})
        self.heads = heads

    def forward(self, xq, xkv=None, key_mask=None):  # [B, Lq, D], [B, Lk, D], [B, Lk] (True = may attend)
        xkv = xq if xkv is None else xkv
        split = lambda n, x: self[n](x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [B, H, L, Dh]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(split("query", xq), split("key", xkv), split("value", xkv), attn_mask=mask)
        return self["out"](o.transpose(1, 2).flatten(2))


def mlp(d: int, m: int) -> nn.Sequential:  # layers.MLP: exact (erf) GELU
    return nn.Sequential(OrderedDict(fc1=nn.Linear(d, m), act=nn.GELU(), fc2=nn.Linear(m, d)))


def stack(n: int, make) -> nn.ModuleDict:  # layers.Repeated's unrolled names
    return nn.ModuleDict({f"layers_{i}": make() for i in range(n)})


class Block(nn.ModuleDict):
    """layers.TransformerBlock of encoder ``enc`` (our flax module): pre-LN x + f(LN(x)) or post-LN LN(x + f(x))."""

    def __init__(self, enc):
        d, ln = enc.width, lambda: nn.LayerNorm(enc.width, eps=enc.ln_epsilon)  # noqa: E731
        super().__init__(dict(self_attn_ln=ln(), self_attn=MHA(d, enc.num_heads), mlp_ln=ln(), mlp=mlp(d, enc.mlp_dim)))
        self.post_ln = getattr(enc, "post_ln", False)

    def forward(self, x, key_mask=None):
        for name, f in (("self_attn", functools.partial(self["self_attn"], key_mask=key_mask)), ("mlp", self["mlp"])):
            x = self[f"{name}_ln"](x + f(x)) if self.post_ln else x + f(self[f"{name}_ln"](x))
        return x


class CoAttentionLayer(nn.ModuleDict):
    """fusion.CoAttentionBlock: self-attention per stream, cross-attention both ways, an MLP per stream."""

    def __init__(self, fusion):
        d, h = fusion.width, fusion.num_heads
        lns = {f"{s}_{n}_ln": nn.LayerNorm(d, eps=LN_EPS) for s in ("text", "image") for n in ("self", "cross", "mlp")}
        attn = {n: MHA(d, h) for n in ("text_self_attn", "image_self_attn", "text_to_image", "image_to_text")}
        super().__init__({**lns, **attn, "text_mlp": mlp(d, fusion.mlp_dim), "image_mlp": mlp(d, fusion.mlp_dim)})

    def forward(self, t, i, t_mask):
        t = t + self["text_self_attn"](self["text_self_ln"](t), key_mask=t_mask)
        i = i + self["image_self_attn"](self["image_self_ln"](i))
        tq, iq = self["text_cross_ln"](t), self["image_cross_ln"](i)  # both cross-attentions read post-self tokens
        t, i = t + self["text_to_image"](tq, iq), i + self["image_to_text"](iq, tq, key_mask=t_mask)
        return t + self["text_mlp"](self["text_mlp_ln"](t)), i + self["image_mlp"](self["image_mlp_ln"](i))


class TorchModel(nn.Module):
    """VisionTextModel with ViT (no CLS), BERT, co-attention, classification head, sized by our flax modules built
    from ``cfg["model"]``; parameter paths as ours (``torch_tensors``): a part it lacks fails the strict load."""

    def __init__(self, cfg: dict):
        super().__init__()
        m, shared, b = cfg["model"], shared_settings(cfg["model"]), cfg["bench"]
        if [m[t]["name"] for t in ("image_encoder", "text_encoder", "fusion")] != ["vit", "bert", "co_attention"]:
            raise ValueError("the torch peer implements the vit, bert and co_attention towers only")
        vit = models.get_image_encoder(m["image_encoder"], shared)
        bert = models.get_text_encoder(m["text_encoder"], shared)
        f, p, d, self.post_ln = models.get_fusion(m["fusion"], shared), vit.patch_size, shared["width"], bert.post_ln
        self.depths = dict(image_encoder=vit.depth, text_encoder=bert.depth, fusion=f.num_layers)
        ln = lambda d, eps=LN_EPS: nn.LayerNorm(d, eps=eps)  # noqa: E731
        pos = nn.ParameterDict(dict(pos_embedding=torch.zeros((int(b["image_size"]) // p) ** 2, d)))
        self.image_encoder = nn.ModuleDict(dict(patch_embed=nn.Conv2d(3, d, p, stride=p), pos_emb=pos))
        self.image_encoder.update(dict(encoder=stack(vit.depth, lambda: Block(vit)), final_ln=ln(d, vit.ln_epsilon)))
        emb = dict(word=bert.vocab_size, position=bert.max_len, token_type=bert.type_vocab_size)
        self.text_encoder = nn.ModuleDict({f"{k}_embeddings": nn.Embedding(n, d) for k, n in emb.items()})
        self.text_encoder.update({"embeddings_ln" if bert.post_ln else "final_ln": ln(d, bert.ln_epsilon)})
        self.text_encoder["encoder"] = stack(bert.depth, lambda: Block(bert))
        blocks = stack(f.num_layers, lambda: CoAttentionLayer(f))
        self.fusion = nn.ModuleDict(dict(blocks=blocks, text_final_ln=ln(d), image_final_ln=ln(d)))
        h = models.get_head(m["head"], shared, num_classes=int(b["num_classes"]))
        head = dict(ln=ln(2 * d), hidden=nn.Linear(2 * d, h.hidden_dim), act=nn.GELU())
        self.head = nn.Sequential(OrderedDict(head, logits=nn.Linear(h.hidden_dim, h.num_classes)))

    def forward(self, image, ids, mask):  # [B, 3, H, W], [B, L], [B, L] -> logits [B, C]
        v, b, f = self.image_encoder, self.text_encoder, self.fusion
        i = v["patch_embed"](image).flatten(2).transpose(1, 2) + v["pos_emb"]["pos_embedding"]  # [B, N, D]
        i = v["final_ln"](functools.reduce(lambda x, blk: blk(x), v["encoder"].values(), i))
        t = b["word_embeddings"](ids) + b["position_embeddings"].weight[: ids.shape[1]]
        t = t + b["token_type_embeddings"].weight[0]
        t = b["embeddings_ln"](t) if self.post_ln else t
        t = functools.reduce(lambda x, blk: blk(x, mask), b["encoder"].values(), t)
        t = (t if self.post_ln else b["final_ln"](t)) * mask[..., None]  # [B, L, D], zero at padding
        for layer in f["blocks"].values():
            t, i = layer(t, i, mask)
        t, i, w = f["text_final_ln"](t), f["image_final_ln"](i), mask[..., None].float()
        return self.head(torch.cat([(t * w).sum(1) / w.sum(1).clamp(min=1.0), i.mean(1)], -1))  # masked means


def torch_tensors(tree, depths: dict) -> dict[str, torch.Tensor]:
    """Our flax parameters (or gradients) as TorchModel's state dict: the path dot-joined (our LayerNorm's inner "ln"
    dropped), Dense kernels [in, out] and head-split ones ([D, H, Dh], out [H, Dh, D]) as torch's [out, in] weights,
    conv kernels HWIO as OIHW, scanned layers unrolled (``depths``: layers per tower)."""
    out = {}
    tree = {k: layers.scanned_to_unrolled(v, depths.get(k, 0)) for k, v in tree.items()}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        keys, x = [p.key for p in path], np.array(x, np.float32)
        if keys[-2] == "ln":
            del keys[-2]
        if keys[-1] == "kernel":
            x = x.reshape(-1, x.shape[-1]) if keys[-2] == "out" else x.reshape(x.shape[0], -1) if x.ndim < 4 else x
            x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
        keys[-1] = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(keys[-1], keys[-1])
        out[".".join(keys)] = torch.from_numpy(np.ascontiguousarray(x.reshape(-1) if keys[-1] == "bias" else x))
    return out


class TorchTrainer:
    """AdamW (decay on matrices only) on Bench's lr schedule, global-norm clipping, cross-entropy: optim.py's step."""

    def __init__(self, model: nn.Module, cfg: dict, batch: dict, compile_backend: str | None):
        o, self.model = cfg["optim"], model
        self.fwd = torch.compile(model, backend=compile_backend) if compile_backend else model
        groups = [dict(params=[p for p in model.parameters() if (p.ndim >= 2) == decay]) for decay in (True, False)]
        groups[0]["weight_decay"], groups[1]["weight_decay"] = o["weight_decay"], 0.0
        kw = dict(lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
        try:
            self.opt, self.opt_kind = torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (RuntimeError, TypeError):
            self.opt, self.opt_kind = torch.optim.AdamW(groups, foreach=True, **kw), "foreach"
        # The lr of each update (Bench's schedule spans 10_000), ahead: no jax call in the timed step.
        self.lrs, self.updates = np.asarray(jax.jit(optim.schedule(o, 10_000))(np.arange(10_000))), 0
        self.clip, self.last_loss = float(o["grad_clip_norm"]), float("nan")
        ids, mask, label = (torch.from_numpy(batch[k]) for k in ("text_ids", "text_mask", "label"))
        image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
        self.inputs, self.label = (image, ids.long(), mask), label.long()  # TorchModel's arguments, the targets

    def forward_backward(self):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.fwd(*self.inputs), self.label)
        loss.backward()
        return loss

    def step(self) -> float:
        t0, loss = time.perf_counter(), self.forward_backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        for g in self.opt.param_groups:
            g["lr"] = float(self.lrs[self.updates])
        self.opt.step()
        self.last_loss, self.updates = loss.item(), self.updates + 1
        return time.perf_counter() - t0


@functools.cache
def jax_loss_and_grad(ours):
    """Bench ``ours``'s training loss and its gradient, jitted once per Bench (with its compiler options)."""
    loss = functools.partial(losses.classification_loss, ours.model)  # -> (loss, aux)
    grad_fn = jax.grad(lambda *a: (lambda out: (out[0], out))(loss(*a)), has_aux=True)  # -> grads, (loss, aux)
    return jax.jit(grad_fn, compiler_options=ours.compiler_options)


def equality_check(ours, trainer: TorchTrainer) -> dict:
    """Loads our current parameters into ``trainer.model``, whose loss and gradients on the batch must then be ours
    (float32, highest matmul precision): |loss diff| <= RTOL |loss| and in every gradient entry |g_torch - g_jax| <=
    RTOL |g_jax| + ATOL G, G = the largest |g_jax| (so noise passes where a gradient is zero: key biases); else
    ValueError (nothing is timed then). Returns {"loss_jax", "loss_torch", "max_abs_grad_diff", "max_rel_grad_diff"
    (largest max |diff| / max |g_jax| over parameters with max |g_jax| > ATOL G), "tolerance_used" (<= 1 passes),
    "worst", "tolerance", "passed"}."""
    depths, params = trainer.model.depths, ours.state.params
    trainer.model.load_state_dict(torch_tensors(params, depths))  # strict: the same names and shapes as ours
    with jax.default_matmul_precision("highest"), jax.set_mesh(ours.mesh):
        grads, (loss, _) = jax_loss_and_grad(ours)(params, ours.batch, jax.random.key(0))
    loss, loss_torch, want = float(loss), trainer.forward_backward().item(), torch_tensors(grads, depths)
    pairs = [(n, (p.grad - want[n]).abs(), want[n].abs()) for n, p in trainer.model.named_parameters()]
    big = max(g.max() for _, _, g in pairs)
    used = {n: (d / (RTOL * g + ATOL * big)).max().item() for n, d, g in pairs}
    used["loss"] = abs(loss_torch - loss) / (RTOL * abs(loss))
    worst = max(used, key=used.get)
    r = dict(loss_jax=loss, loss_torch=loss_torch, max_abs_grad_diff=max(d.max().item() for _, d, _ in pairs))
    r["max_rel_grad_diff"] = max((d.max() / g.max()).item() for _, d, g in pairs if g.max() > ATOL * big)
    r.update(tolerance_used=used[worst], worst=worst, passed=used[worst] <= 1)
    r["tolerance"] = f"|d| <= {RTOL} |g_jax| + {ATOL} max|g_jax| in every gradient entry; loss {RTOL} relative"
    if not r["passed"]:
        raise ValueError(f"the torch port is not our function (refusing to time two different computations): {r}")
    return r


def torch_matmul_peak(n: int, reps: int = 5, inner: int = 8) -> float:
    """Best FLOP/s of ``inner`` chained [n, n] float32 matmuls in torch: measured as vtfusion_jax.speed.matmul_peak
    measures jax's (same n, chain length and best of ``reps``), so that both peaks mean the same thing."""
    a, b, times = torch.randn(n, n), torch.randn(n, n) / n**0.5, []
    for _ in range(reps + 1):  # the first chain warms up
        t0, y = time.perf_counter(), a
        for _ in range(inner):
            y = torch.mm(y, b)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 * inner / min(times[1:])


def run(cfg: dict, compile_backend: str, pause_s: float, command: str = "", bench=None) -> dict:
    """Times ours, torch eager and torch.compile alternately (see the module docstring); ``bench`` reuses a built
    benchmarks/train_step.py Bench. Returns the JSON-able result."""
    b = cfg["bench"]
    torch.set_num_threads(os.cpu_count() or 1)
    load_start = speed.loadavg()
    batch = jax_bench.synthetic_batch(cfg, int(cfg["seed"]))
    ours = bench or jax_bench.Bench(cfg)
    compile_info = ours.compile()
    eager_model = TorchModel(cfg)
    trainers = {"torch_eager": TorchTrainer(eager_model, cfg, batch, None)}
    check = equality_check(ours, trainers["torch_eager"])  # our parameters now in eager_model (and its copy)
    compile_s = None
    if compile_backend != "none":
        trainers["torch_compile"] = TorchTrainer(copy.deepcopy(eager_model), cfg, batch, compile_backend)
        compile_s = trainers["torch_compile"].step()  # the first call compiles (dynamo + inductor)
    runners = {"jax": ours.step, **{n: t.step for n, t in trainers.items()}}
    with FlopCounterMode(display=False) as counter:  # one forward + backward
        trainers["torch_eager"].forward_backward()
    times = jax_bench.alternate(runners, int(b["steps"]), pause_s, warmup=int(b["warmup"]))
    jax_peak = speed.matmul_peak(jax.numpy.float32, int(b["matmul_size"]))["flops_per_s"]
    t_peak = torch_matmul_peak(int(b["matmul_size"]))
    step_flops = jax_bench.analytic_flops(cfg)["train"] * int(b["batch_size"])
    med = {n: float(np.median(t)) for n, t in times.items()}
    r = dict(jax_bench.record("torch_peer", command, cfg, load_start), torch=torch.__version__, equality_check=check)
    r["threads"] = {"torch": torch.get_num_threads(), "xla_cpu_count": os.cpu_count()}
    r["num_params"] = {"jax": ours.num_params, "torch": sum(p.numel() for p in eager_model.parameters())}
    r.update(flops_per_step_train=step_flops, torch_flop_counter_per_step=counter.get_total_flops())
    r.update(jax_compile_s=compile_info["total_s"], torch_compile_first_step_s=compile_s)
    r.update(torch_optimizer=trainers["torch_eager"].opt_kind, pause_between_steps_s=pause_s, step_s_median=med)
    r.update(step_s_min={n: float(np.min(t)) for n, t in times.items()}, step_s_all=times)
    r["peak_flops_per_s"] = {"jax": jax_peak, "torch": t_peak}
    r["mfu_measured_peak"] = {n: step_flops / med[n] / (jax_peak if n == "jax" else t_peak) for n in runners}
    r["speedup_vs"] = {n: med[n] / med["jax"] for n in runners if n != "jax"}
    r["final_loss"] = {"jax": ours.loss(), **{n: trainers[n].last_loss for n in trainers}}
    return r


def main(argv: Sequence[str] | None = None) -> dict:
    p = jax_bench.parser(__doc__)
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend, or 'none' to skip it")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, cfg, env, command = jax_bench.cli(p, argv, "torch_peer.py")  # host-memory reuse covers torch too
    return speed.emit_result({**run(cfg, args.compile_backend, args.pause, command), **env}, args.out)


if __name__ == "__main__":
    main()
