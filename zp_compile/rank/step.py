"""One serving step on one rank: the forward over its batch, then what each sequence asked for.

``run_step(model, seqs, device, kv)`` is the rank's step function. With ``kv`` (a
``kv_cache.RankKVCache``: the model switched to packed attention) the batch runs packed, each
sequence computing only the tokens after its reused prefix; without, as one left-padded batch
(models whose cache has sliding-window layers, ``packed.unsupported``).
"""

from __future__ import annotations

import torch

from ..contract import BLOCK, Readout, Sample, Seq

PAD_ID = 0  # left padding of padded batches: masked out, so any id in the vocabulary does


def batch_inputs(seqs: list[list[int]], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Left-pad token id lists to one [B, S] batch (S a multiple of ``BLOCK``: fewer distinct shapes,
    fewer recompiles).

    Position ids count real tokens only, so a sequence's logits do not depend on how much padding its
    batch gave it (transformers would otherwise number the padding too).
    """
    width = -(-max(len(s) for s in seqs) // BLOCK) * BLOCK
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, S]
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # [B, S]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def readouts(logits: torch.Tensor, seqs: list[Seq]) -> list[Readout]:
    """What each sequence asked for (``Seq.wants``), from its next-token logits ``[B, V]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    k = max([s.wants.top for s in seqs] + [1])
    top_lp, top_id = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # [B, k]
    out = []
    for row, s in enumerate(seqs):
        w = s.wants
        # Host syncs: the forward is done, these are a few numbers per sequence.
        top = list(zip(top_id[row, : w.top].tolist(), top_lp[row, : w.top].tolist()))
        tokens = logprobs[row, w.tokens].tolist() if w.tokens else []
        choice = sample_token(logits[row].float(), w.sample) if w.sample else int(top_id[row, 0])
        out.append(Readout(top, tokens, (choice, float(logprobs[row, choice]))))
    return out


def sample_token(logits_V: torch.Tensor, sample: Sample) -> int:
    """One token drawn from softmax(logits / temperature), restricted to the top_p nucleus."""
    probs = torch.softmax(logits_V / sample.temperature, dim=-1)
    top_p = sample.top_p or 1.0
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    generator = torch.Generator().manual_seed(sample.seed) if sample.seed is not None else None
    return int(torch.multinomial(probs, 1, generator=generator))


def run_step(model, seqs: list[Seq], device: torch.device, kv=None) -> list[Readout]:
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
            return readouts(kv.forward(model, seqs, PAD_ID, device), seqs)
        batch = {k: v.to(device) for k, v in batch_inputs([s.ids for s in seqs]).items()}
        logits = model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]  # [B, V]
        return readouts(logits, seqs)
