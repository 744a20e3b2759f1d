"""One serving step on one rank: the forward over its batch, then what each sequence asked for.

``run_step(model, seqs, device, kv)`` is the rank's step function (what each sequence reads from the
logits: ``readouts.py``). With ``kv`` (a ``kv_cache.RankKVCache``: the model switched to packed
attention) the batch runs packed, each sequence computing only the tokens after its reused prefix;
without, as one left-padded batch (models with layers the packed kernel does not cover,
``packed.unsupported``), whose prompt logprobs read the logits of every position [B, S, V].
"""

from __future__ import annotations

import torch

from ..contract import BLOCK, Readout, Seq
from .readouts import readouts, with_prompt

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
            logits, spans, finish = kv.run(model, seqs, PAD_ID, device)
            outs, tables = readouts(logits, seqs, spans)
            return [with_prompt(o, s.wants, t) for o, s, t in zip(outs, seqs, finish(tables))]
        batch = {k: v.to(device) for k, v in batch_inputs([s.ids for s in seqs]).items()}
        if all(s.wants.prompt is None for s in seqs):
            logits = model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]  # [B, V]
            return readouts(logits, seqs)[0]
        # Prompt logprobs: every position's logits, [B, S, V] -> [B * S, V]; row b's last n_b of its S.
        logits = model(**batch, use_cache=False).logits
        B, S, V = logits.shape
        spans = [(b * S + S - len(s.ids), (b + 1) * S) for b, s in enumerate(seqs)]
        outs, tables = readouts(logits.reshape(B * S, V), seqs, spans)
        return [with_prompt(o, s.wants, t) for o, s, t in zip(outs, seqs, tables)]
