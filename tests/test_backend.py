"""Registration with Inductor: a real uuid, and a user's own post-grad pass is kept."""

from __future__ import annotations

import torch

from zp_compile.backend import ChainedGraphPass, ZeroPrefillGraphPass, zero_prefill_backend


def test_uuid_is_stable_and_depends_on_prefetch():
    assert ZeroPrefillGraphPass(1).uuid() == ZeroPrefillGraphPass(1).uuid()
    assert ZeroPrefillGraphPass(1).uuid() != ZeroPrefillGraphPass(2).uuid()
    assert ZeroPrefillGraphPass(0).uuid() is not None


def test_user_post_grad_pass_is_kept_and_config_restored(monkeypatch):
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor import config as inductor_config

    def user_pass(graph):
        pass

    seen = {}

    def fake_compile_fx(gm, example_inputs):
        seen["passes"] = inductor_config.post_grad_custom_post_pass
        return gm

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    with inductor_config.patch(post_grad_custom_post_pass=user_pass):
        zero_prefill_backend(prefetch=1)(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), [])
        assert inductor_config.post_grad_custom_post_pass is user_pass
    first, ours = seen["passes"]
    assert first is user_pass and isinstance(ours, ZeroPrefillGraphPass) and ours.prefetch == 1


def test_chained_pass_for_torch_without_pass_lists():
    calls = []

    class UserPass(ZeroPrefillGraphPass):
        def __call__(self, graph):
            calls.append("user")

    class Ours(ZeroPrefillGraphPass):
        def __call__(self, graph):
            calls.append("ours")

    chain = ChainedGraphPass(UserPass(0), Ours(1))
    chain(torch.fx.Graph())
    assert calls == ["user", "ours"]
    assert chain.uuid() == (UserPass(0).uuid(), Ours(1).uuid())
    assert ChainedGraphPass(lambda graph: None, Ours(1)).uuid() is None  # a plain callable: no caching
