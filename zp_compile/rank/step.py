"""One serving step on one rank: the forward over its batch, then what each sequence asked for.

``run_step(model, seqs, device, kv)`` is the rank's step function. With ``kv`` (a
``kv_cache.RankKVCache``: the model switched to packed attention) the batch runs packed, each
sequence computing only the tokens after its reused prefix; without, as one left-padded batch
(models with layers the packed kernel does not cover, ``packed.unsupported``).
"""

from __future__ import annotations

import torch

from ..contract import BLOCK, Readout, Sample, Seq
from ..devices import to_device

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
    """What each sequence asked for (``Seq.wants``), from its next-token logits ``[B, V]``.

    Everything is computed on the logits' device and comes back in ONE device-to-host copy: per row its
    top-k ids and logprobs, the logprobs of the tokens it asked about, and its next token (greedy, or
    drawn) with that token's logprob, side by side in one float64 tensor (token ids < 2^53 are exact).
    """
    device = logits.device
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    k = min(max([s.wants.top for s in seqs] + [1]), logprobs.shape[-1])
    top_lp, top_id = logprobs.topk(k, dim=-1)  # [B, k]
    T = max(len(s.wants.tokens) for s in seqs)
    asked = torch.tensor([list(s.wants.tokens) + [0] * (T - len(s.wants.tokens)) for s in seqs], dtype=torch.long)  # [B, T]
    tokens_lp = logprobs.gather(1, to_device(asked, device))  # [B, T]
    choice = top_id[:, 0].clone()  # [B]: greedy
    for row, s in enumerate(seqs):
        if s.wants.sample:
            choice[row] = sample_token(logits[row].float(), s.wants.sample)  # stays on the device
    choice_lp = logprobs.gather(1, choice[:, None])  # [B, 1]
    host = torch.cat([top_id.double(), top_lp.double(), tokens_lp.double(), choice[:, None].double(), choice_lp.double()], 1)
    table = host.cpu().tolist()  # the one device-to-host copy: [B, 2k + T + 2]
    out = []
    for row, s in zip(table, seqs):
        w = s.wants
        top = [(int(i), lp) for i, lp in zip(row[: w.top], row[k : k + w.top])]
        tokens = row[2 * k : 2 * k + len(w.tokens)]
        out.append(Readout(top, tokens, (int(row[-2]), row[-1])))
    return out


def sample_token(logits_V: torch.Tensor, sample: Sample) -> torch.Tensor:
    """One token (a 0-d tensor on the logits' device) drawn from softmax(logits / temperature),
    restricted to the top_p nucleus. A seed seeds a generator on that device (a CPU generator cannot
    draw for CUDA probabilities)."""
    probs = torch.softmax(logits_V / sample.temperature, dim=-1)
    top_p = sample.top_p or 1.0
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, torch.where(keep, sorted_p, 0.0))  # no boolean indexing: no sync
    generator = torch.Generator(device=probs.device).manual_seed(sample.seed) if sample.seed is not None else None
    return torch.multinomial(probs, 1, generator=generator)[0]


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
