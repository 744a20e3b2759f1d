"""One serving rank: ``torchrun ... -m zp_compile.server.worker --frontend HOST:PORT``.

``zp-compile serve`` starts these itself on one host (through torchrun). On several hosts, start them with
torchrun on each host and point them at the front end's worker port; they read the model and settings
from the front end, so every rank serves the same thing.

The front end and the ranks talk through a ``torch.distributed.TCPStore`` that the front end hosts, in
JSON (never pickle: the port carries no code). Keys live under ``g{generation}/`` so that ranks from
before a restart can never answer for the new ones:

- ``settings``: what to load (the front end writes it before ``generation``);
- ``pid/{rank}``: its process id, set first (the front end kills a hung local rank by pid);
- ``ready/{rank}``: a rank has loaded and compiled the model (value: facts about it);
- ``beat/{rank}``: a counter each rank bumps every 0.5 s from a side thread (liveness);
- ``step/{n}/{rank}``: the rank's batch for step n (every rank runs every step: the gathers are
  collectives), or ``{"stop": true}``;
- ``result/{n}/{rank}``: its readouts; ``error/{rank}``: why it failed, before it exits non-zero.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

PAD_MULTIPLE = 16  # sequence lengths are padded up to a multiple: fewer distinct shapes, fewer recompiles
_IDLE = timedelta(days=7)  # a rank waits this long for the next step; a dead front end fails it at once


def connect(address: str, timeout: timedelta = _IDLE) -> dist.TCPStore:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--frontend must be HOST:PORT, got {address!r}")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)


def batch_inputs(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token id lists to one [B, S] batch (S a multiple of PAD_MULTIPLE).

    Position ids count real tokens only, so a sequence's logits do not depend on how much padding its
    batch gave it (transformers would otherwise number the padding too).
    """
    width = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, S]
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # [B, S]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def readouts(logits: torch.Tensor, seqs: list[dict]) -> list[dict]:
    """What each sequence asked for, from its next-token logits ``[B, V]``.

    ``top``: the k most likely tokens with log-probabilities; ``tokens``: log-probabilities of the
    given token ids; ``next``: the greedy token, or one sampled with ``sample`` (temperature, top_p, seed).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    k = max([s.get("top", 0) for s in seqs] + [1])
    top_lp, top_id = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # [B, k]
    out = []
    for row, s in enumerate(seqs):
        # Host syncs: the forward is done, these are a few numbers per sequence.
        item = {"top": [[i, lp] for i, lp in zip(top_id[row, : s.get("top", 0)].tolist(), top_lp[row, : s.get("top", 0)].tolist())]}
        tokens = s.get("tokens") or []
        item["tokens"] = logprobs[row, tokens].tolist() if tokens else []
        choice = sample_token(logits[row].float(), s["sample"]) if s.get("sample") else int(top_id[row, 0])
        item["next"] = [choice, float(logprobs[row, choice])]
        out.append(item)
    return out


def sample_token(logits_V: torch.Tensor, sample: dict) -> int:
    """One token drawn from softmax(logits / temperature), restricted to the top_p nucleus."""
    probs = torch.softmax(logits_V / sample["temperature"], dim=-1)
    top_p = sample.get("top_p") or 1.0
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    generator = torch.Generator().manual_seed(sample["seed"]) if sample.get("seed") is not None else None
    return int(torch.multinomial(probs, 1, generator=generator))


def score(model, seqs: list[dict], pad_id: int, device: torch.device, kv=None) -> list[dict]:
    """Run one step's batch on this rank. An empty batch still takes part in the step's gathers.

    ``kv``: the rank's ``kv_cache.RankKVCache`` (its model switched to packed attention,
    ``packed.enable``): the step runs packed, each sequence computing only the tokens after its reused
    prefix (cached, or computed by a batch-mate; budget 0, KV-cache-free, keeps nothing between steps).
    None: a plain left-padded batch.
    """
    with torch.inference_mode():
        if not seqs:
            model(input_ids=torch.zeros((0, 1), dtype=torch.long, device=device))
            return []
        if kv is not None:
            return readouts(kv.forward(model, seqs, pad_id, device), seqs)
        batch = {k: v.to(device) for k, v in batch_inputs([s["ids"] for s in seqs], pad_id).items()}
        logits = model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]  # [B, V]
        return readouts(logits, seqs)


def _heartbeat(address: str, key: str) -> None:
    store = connect(address, timedelta(seconds=30))
    while True:
        try:
            store.add(key, 1)
        except Exception:
            # The front end is gone (killed, crashed): nobody will ever send another step. Exit now; the
            # main thread may be blocked in a read or in a collective with a peer that never returns.
            os._exit(3)
        time.sleep(0.5)


def resolve_transport(requested: str, device: torch.device, world: int, local: int) -> str:
    """``auto``: shared memory when every rank is a CPU process on one host (``local`` ranks on this
    host == ``world``), else collectives. Every rank decides alike without asking the others: torchrun
    gives all the same world size, local == world on one host only, and a GPU world is all NCCL."""
    if requested != "auto":
        return requested
    return "shm" if device.type == "cpu" and local == world else "collective"


def _load(settings: dict, device: torch.device):
    import zp_compile

    dtype = getattr(torch, settings["dtype"]) if settings.get("dtype") else None
    return zp_compile.from_pretrained(
        settings["model"],
        dtype=dtype,
        prefetch=settings["prefetch"],
        backend=settings["backend"],
        transport=settings["transport"],
        # One compile for every batch shape: the warm-up below pays it before the rank reports ready.
        dynamic=True,
    ).to(device)


def warm_up(model, device: torch.device, vocab: int, max_tokens: int = 0) -> None:
    """Compile before serving: batch 1 and batch > 1 are separate graphs (dynamo specialises size 1).

    ``max_tokens``: also run a step of that many tokens (the front end's largest). Inductor guards some
    lowerings on the token count: its stable sort of the MoE routing (tokens x top_k) takes another
    path from 32,767 elements on, so the first step of 8,192 tokens x top-4 would otherwise recompile
    while serving (~20 s on a CPU for the 82M benchmark model, inside a request's latency)."""
    ids = torch.arange(3, 3 + 2 * PAD_MULTIPLE).remainder(vocab).tolist()
    for rows in ([ids, ids[:-5]], [ids]):
        score(model, [{"ids": r, "top": 1} for r in rows], 0, device)
    if rows := largest_step(model, max_tokens, vocab):
        score(model, [{"ids": r, "top": 1} for r in rows], 0, device)


def largest_step(model, max_tokens: int, vocab: int, spare: int = 0) -> list[list[int]]:
    """The rows of a warm-up step of ``max_tokens`` tokens in all (none under 2 rows, so B > 1 as in the
    serving graph): rows of up to 256 tokens that leave ``spare`` of the model's positions free, the
    last one shorter if 256 does not divide ``max_tokens``."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 256
    width = min(256, (positions - spare) // PAD_MULTIPLE * PAD_MULTIPLE)
    if width <= 0 or max_tokens < 2 * width:
        return []
    lengths = [width] * (max_tokens // width) + ([max_tokens % width] if max_tokens % width else [])
    # Rows that differ from their first block on: a packed step would share identical prefixes.
    return [torch.arange(5 + i, 5 + i + n).remainder(vocab).tolist() for i, n in enumerate(lengths)]


def prepare(model, device: torch.device, vocab: int, cache_tokens: int, max_tokens: int):
    """Make a loaded rank ready to serve: packed steps (``packed.enable``) and their warm-up, and the
    rank's prefix KV cache of ``cache_tokens`` (the front end keeps its view with the same budget,
    server/prefix.py), returned for ``score``. A model that cannot run packed (sliding-window cache
    layers) gets left-padded batches and None, and cannot keep a cache."""
    from . import kv_cache, packed  # here, not at the top: kv_cache imports this module's helpers

    if (reason := packed.unsupported(model)) is None:
        packed.enable(model)  # every step runs packed: no padding, prefixes shared within a step
        kv_cache.warm_up(model, device, vocab, max_tokens)
        return kv_cache.RankKVCache(cache_tokens)
    if cache_tokens:
        raise ValueError(f"{reason}: prefix KV reuse cannot serve it; use --cache-tokens 0")
    warm_up(model, device, vocab, max_tokens)  # left-padded batches (a routing policy's FLOPs then leave out the padding)
    return None


def serve(address: str) -> None:

    store = connect(address)
    prefix = f"g{int(store.get('generation'))}"
    settings = json.loads(store.get(f"{prefix}/settings"))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    store.set(f"{prefix}/pid/{rank}", str(os.getpid()))  # lets the front end kill a hung rank on this host
    try:
        if world != settings["ranks"]:
            raise RuntimeError(f"the front end expects {settings['ranks']} ranks but torchrun started {world}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(settings.get("threads") or max(1, (os.cpu_count() or 1) // local))
        threading.Thread(target=_heartbeat, args=(address, f"{prefix}/beat/{rank}"), daemon=True).start()
        settings["transport"] = resolve_transport(settings.get("transport", "auto"), device, world, local)
        model = _load(settings, device)
        vocab = model.get_output_embeddings().weight.shape[0]
        kv = prepare(model, device, vocab, settings.get("cache_tokens") or 0, settings.get("max_tokens") or 0)
        info = {"vocab": vocab, "expert_bytes": model.zero_prefill.expert_bytes, "device": str(device),
                "transport": settings["transport"]}  # fmt: skip
        if settings.get("measure_threshold"):  # collective: every rank measures, all get the same T
            from dataclasses import asdict

            from ..threshold import saturation_threshold

            info["threshold"] = asdict(saturation_threshold(model))
        store.set(f"{prefix}/ready/{rank}", json.dumps(info))
        step = 0
        while True:
            msg = json.loads(store.get(f"{prefix}/step/{step}/{rank}"))
            if msg.get("stop"):
                break
            started = time.perf_counter()
            results = score(model, msg["seqs"], 0, device, kv)
            store.set(f"{prefix}/result/{step}/{rank}", json.dumps({"results": results, "seconds": time.perf_counter() - started}))
            step += 1
    except Exception as e:
        store.set(f"{prefix}/error/{rank}", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One zp-compile serving rank (start under torchrun).")
    parser.add_argument("--frontend", required=True, help="HOST:PORT of the front end's worker port")
    # A crash in native code (a kernel, a transport) then leaves every thread's Python stack in the log.
    faulthandler.enable()
    # And on SIGUSR1 (sent before the front end kills a hung rank): every thread's stack, then run on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    serve(parser.parse_args(argv).frontend)


if __name__ == "__main__":
    main()
