"""core.sampling: nucleus (top-p) sampling keeps the fewest most likely tokens whose probabilities
reach p, and a stop token ends each row on its own and generation once every row has stopped."""

import torch

from core.sampling import sample_tokens

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])


def _always(probs):
    return lambda window: torch.log(probs).expand(window.shape[0], -1)


def test_top_p_samples_only_from_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    out = sample_tokens(_always(PROBS), torch.zeros(1, 1, dtype=torch.long), 8, 400, generator=gen, top_p=0.7)
    seen = set(out[0, 1:].tolist())
    assert seen == {1, 3}                       # 0.5 + 0.3 reach 0.7; 0.15 and 0.05 never drawn
    gen = torch.Generator().manual_seed(0)
    out = sample_tokens(_always(PROBS), torch.zeros(1, 1, dtype=torch.long), 8, 400, generator=gen, top_p=1.0)
    assert set(out[0, 1:].tolist()) == {0, 1, 2, 3}


def test_a_stop_token_ends_each_row_and_then_generation():
    calls = []

    def logits(window):           # row 0 says 2 from its third new token on; row 1 after its fifth
        calls.append(window.shape[1])
        new = window.shape[1] - 1
        out = torch.full((2, 4), -10.0)
        out[:, 1] = 0.0
        if new >= 2:
            out[0] = torch.tensor([-10.0, -10.0, 0.0, -10.0])
        if new >= 4:
            out[1] = torch.tensor([-10.0, -10.0, 0.0, -10.0])
        return out

    got = sample_tokens(logits, torch.zeros(2, 1, dtype=torch.long), 16, 10, temperature=0, stop=2)
    assert got.tolist() == [[0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 2]]
    assert len(calls) == 5                      # ended when both rows had stopped, not after 10
