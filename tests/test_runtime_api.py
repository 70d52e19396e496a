"""User-model API: recompute of the user's own blocks (segments or whole) is bit-exact."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from lynxpipe.errors import LynxError  # noqa: E402
from lynxpipe.runtime.engine.blocks import use_engine, wrap_blocks  # noqa: E402
from lynxpipe.runtime.engine.recompute import RecomputeEngine  # noqa: E402
from lynxpipe.schedule.actions import Window  # noqa: E402

RECV = Window("recv", 0, 0, recv="RECV_B")


class Block(nn.Module):
    """A pre-norm block with dropout and q/k/v views of one projection (shared storages)."""

    def __init__(self, h: int = 16) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.drop = nn.Dropout(0.1)

    def attention(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        probs = self.drop(torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1))
        return x + self.drop(self.out(probs @ v))

    def mlp(self, x):
        return x + self.drop(self.fc2(nn.functional.gelu(self.fc1(self.ln2(x)))))

    def forward(self, x):
        return self.mlp(self.attention(x))


def _step(blocks, engine):
    use_engine(blocks, engine)
    for p in blocks.parameters():
        p.grad = None
    torch.manual_seed(7)
    losses = []
    for mb in range(2):
        with engine.forward(mb):
            h = torch.linspace(-1, 1, 2 * 8 * 16).view(2, 8, 16) * (mb + 1)
            for block in blocks:
                h = block(h)
            losses.append(h.square().mean())
    engine.run_tasks(RECV)
    for mb, loss in enumerate(losses):
        with engine.backward(mb):
            loss.backward()
    return [x.detach() for x in losses], [p.grad.clone() for p in blocks.parameters()], \
        engine.end_step()


def test_user_blocks_segments_whole_and_windows_are_bitwise_equal():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks = wrap_blocks([Block() for _ in range(3)],
                         segments=lambda b: [b.attention, b.mlp])
    ref_loss, ref_grad, ref = _step(blocks, RecomputeEngine())
    engines = {
        "segments": RecomputeEngine({0: {"seg0", "seg1"}, 1: {"seg1"}}),
        "whole": RecomputeEngine(full_layers=[0, 1, 2]),
        "window": RecomputeEngine({2: {"seg0", "seg1"}}, {RECV: [(0, 2, 0), (0, 2, 1)]}),
    }
    for name, engine in engines.items():
        losses, grads, stats = _step(blocks, engine)
        assert all(torch.equal(a, b) for a, b in zip(ref_loss, losses)), name
        assert all(torch.equal(a, b) for a, b in zip(ref_grad, grads)), name
        assert stats.peak_bytes < ref.peak_bytes, name
        assert stats.current_bytes == 0 and not stats.missed, name
        assert all((t.window or None) == t.planned for t in stats.tasks), name
    assert {(t.layer, t.segment, t.where) for t in stats.tasks if t.mb == 0} == {
        (2, 0, "recv"), (2, 1, "recv")}


def test_unknown_segment_is_refused():
    blocks = wrap_blocks([Block()])
    engine = RecomputeEngine({0: {"seg1"}})
    use_engine(blocks, engine)
    with pytest.raises(LynxError, match="its segments are \\['seg0'\\]"):
        with engine.forward(0):
            blocks[0](torch.zeros(1, 4, 16))
