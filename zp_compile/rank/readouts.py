"""What a step's sequences asked for (``contract.Wants``), read from the forward's logits on the rank's
device and brought to the host in ONE device-to-host copy per step.

Per sequence: the next-token readouts (its top k, the log-probabilities of the tokens it asked about,
the next token, greedy or drawn) from its last position; with prompt logprobs (``Wants.prompt``), also
every prompt position's: the prompt token's log-probability given the tokens before it and the
``PROMPT_TOP`` most likely tokens there. Those are computed in chunks of rows (``CHUNK``), so no
float32 [tokens, vocab] tensor is ever made beyond one chunk, and only the token's value and the top
``PROMPT_TOP`` leave the device. They come back as a ``PromptTable`` per row, which the prefix cache
also keeps per cached block (``kv_cache.py``): a block's readouts are a function of its prefix alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..contract import PROMPT_TOP, Readout, Sample, Seq, Wants
from ..devices import to_device

CHUNK = 1024  # prompt positions per log-softmax: a float32 [CHUNK, vocab] at a time


@dataclass(frozen=True)
class PromptTable:
    """One row's prompt readouts at positions ``first`` .. ``first + m - 1`` on the host: ``lp`` [m]
    float32, the position's token log-probability given the tokens before it; ``top_id`` [m, PROMPT_TOP]
    int32 and ``top_lp`` [m, PROMPT_TOP] float32, the most likely tokens there, most likely first.
    Position 0 has nothing before it: a prompt's table starts at 1."""

    first: int
    lp: np.ndarray
    top_id: np.ndarray
    top_lp: np.ndarray

    def __len__(self) -> int:
        return len(self.lp)

    @property
    def nbytes(self) -> int:
        return self.lp.nbytes + self.top_id.nbytes + self.top_lp.nbytes

    def part(self, start: int, stop: int) -> PromptTable:
        """Positions [start, stop), copied (a cached block must not keep the whole step's table alive)."""
        a, b = start - self.first, stop - self.first
        if not 0 <= a <= b <= len(self):
            raise IndexError(f"positions [{start}, {stop}) outside this table's [{self.first}, {self.first + len(self)})")
        return PromptTable(start, self.lp[a:b].copy(), self.top_id[a:b].copy(), self.top_lp[a:b].copy())

    @staticmethod
    def cat(parts: list[PromptTable]) -> PromptTable:
        """Consecutive tables as one (each must start where the one before it ends)."""
        for x, y in zip(parts, parts[1:]):
            if x.first + len(x) != y.first:
                raise ValueError(f"prompt tables not consecutive: [{x.first}, {x.first + len(x)}) then [{y.first}, ...)")
        return PromptTable(parts[0].first, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("lp", "top_id", "top_lp")))


def readouts(logits: torch.Tensor, seqs: list[Seq], spans: list[tuple[int, int]] | None = None) -> tuple[list[Readout], list[PromptTable | None]]:
    """Each sequence's readouts from ``logits`` [K, V]: sequence b's rows are ``spans[b] = (a, e)``, the
    distributions after its last e - a positions (None: one row each, b). The last row gives the
    next-token readouts; with ``Wants.prompt`` the rows before it give positions n - (e - a) + 1 .. n - 1
    of its ``PromptTable`` (the readouts carry no prompt arrays yet: ``with_prompt``).

    Everything is computed on the logits' device; one float64 tensor (token ids < 2^53 are exact) comes
    back in one copy: per sequence its top-k ids and logprobs, the asked tokens' logprobs and the next
    token with its logprob, then per prompt position its token's logprob and top ``PROMPT_TOP``."""
    device = logits.device
    spans = spans if spans is not None else [(b, b + 1) for b in range(len(seqs))]
    last = to_device(torch.tensor([e - 1 for _, e in spans], dtype=torch.long), device)
    next_logits = logits.index_select(0, last)  # [B, V]
    logprobs = torch.log_softmax(next_logits.float(), dim=-1)  # [B, V]
    k = min(max([s.wants.top for s in seqs] + [1]), logprobs.shape[-1])
    top_lp, top_id = logprobs.topk(k, dim=-1)  # [B, k]
    T = max(len(s.wants.tokens) for s in seqs)
    asked = torch.tensor([list(s.wants.tokens) + [0] * (T - len(s.wants.tokens)) for s in seqs], dtype=torch.long)  # [B, T]
    tokens_lp = logprobs.gather(1, to_device(asked, device))  # [B, T]
    choice = top_id[:, 0].clone()  # [B]: greedy
    for row, s in enumerate(seqs):
        if s.wants.sample:
            choice[row] = sample_token(next_logits[row].float(), s.wants.sample)  # stays on the device
    choice_lp = logprobs.gather(1, choice[:, None])  # [B, 1]
    parts = [torch.cat([top_id.double(), top_lp.double(), tokens_lp.double(), choice[:, None].double(), choice_lp.double()], 1).flatten()]
    # Prompt positions: row j of a span (not its last) is the distribution after position p0 + j, read
    # for the token at p0 + j + 1.
    rows, targets, firsts = [], [], []
    for s, (a, e) in zip(seqs, spans):
        p0 = len(s.ids) - (e - a)
        firsts.append(p0 + 1)
        if s.wants.prompt is not None:
            rows += range(a, e - 1)
            targets += s.ids[p0 + 1 :]
    M = len(rows)
    if M:
        parts.append(_prompt_table(logits, to_device(torch.tensor(rows), device), to_device(torch.tensor(targets), device)).flatten())
    flat = torch.cat(parts).cpu().numpy()  # the one device-to-host copy
    width = 2 * k + T + 2
    table, prompt = flat[: len(seqs) * width].reshape(len(seqs), width), flat[len(seqs) * width :].reshape(M, 1 + 2 * PROMPT_TOP)
    out, tables, at = [], [], 0
    for row, s, first, (a, e) in zip(table.tolist(), seqs, firsts, spans):
        w = s.wants
        top = [(int(i), lp) for i, lp in zip(row[: w.top], row[k : k + w.top])]
        out.append(Readout(top, row[2 * k : 2 * k + len(w.tokens)], (int(row[-2]), row[-1])))
        if w.prompt is None:
            tables.append(None)
            continue
        p = prompt[at : at + e - a - 1]
        at += e - a - 1
        tables.append(PromptTable(first, p[:, 0].astype(np.float32), p[:, 1 : 1 + PROMPT_TOP].astype(np.int32), p[:, 1 + PROMPT_TOP :].astype(np.float32)))
    return out, tables


def _prompt_table(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[M, 1 + 2 * PROMPT_TOP] float64: per prompt position (logits row ``rows[i]``, token ``targets[i]``)
    the token's log-probability, the top ids, the top log-probabilities; log-softmax ``CHUNK`` rows at a time."""
    k = min(PROMPT_TOP, logits.shape[-1])
    out = []
    for c in range(0, rows.numel(), CHUNK):
        lp = torch.log_softmax(logits.index_select(0, rows[c : c + CHUNK]).float(), dim=-1)  # [<=CHUNK, V]
        top_lp, top_id = lp.topk(k, dim=-1)
        if k < PROMPT_TOP:  # a vocabulary smaller than PROMPT_TOP: pad (never read: k <= vocab)
            top_id = torch.nn.functional.pad(top_id, (0, PROMPT_TOP - k))
            top_lp = torch.nn.functional.pad(top_lp, (0, PROMPT_TOP - k), value=float("-inf"))
        out.append(torch.cat([lp.gather(1, targets[c : c + CHUNK, None]).double(), top_id.double(), top_lp.double()], 1))
    return torch.cat(out)


def with_prompt(readout: Readout, wants: Wants, table: PromptTable | None) -> Readout:
    """``readout`` with its prompt arrays from ``table`` (positions 1 .. n - 1), top trimmed to ``wants.prompt``."""
    if wants.prompt is None:
        return readout
    if table.first != 1:
        raise ValueError(f"a prompt's table must start at position 1, this one at {table.first}")
    k = wants.prompt
    arrays = (table.lp.astype("<f4"), table.top_id[:, :k].astype("<i4"), table.top_lp[:, :k].astype("<f4"))  # astype copies: contiguous
    return Readout(readout.top, readout.tokens, readout.next, *(a.tobytes() for a in arrays))


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
