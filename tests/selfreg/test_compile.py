"""SelfReg taps under ``torch.compile``.

Forward hooks registered before compilation are traced into the graph, so capture, logits, the SelfReg loss and
the gradients equal eager mode. Two torch (2.13) facts shape these tests: Dynamo does not guard on module hooks
by default (``torch._dynamo.config.skip_nnmodule_hook_guards = True``), so hooks added after a module was compiled
are silently ignored, and so is a fresh instance's hooks when another instance of the same class was compiled
without hooks earlier in the process (the cached graph is reused). Hence ``torch._dynamo.reset()`` before each
test, and ``skip_nnmodule_hook_guards=False`` makes both cases work (Dynamo then recompiles when hooks change).
"""

import copy
import os

import pytest
import torch

from lightning_selfreg import FeatureTaps, SelfRegLoss
from lightning_selfreg.models import UNet

dynamo = pytest.importorskip("torch._dynamo")


def train_step(model, module, x, taps=None):
    """Forward (capturing taps), SelfReg (ordered pairing) + a logits term, backward; returns logits, loss, grads."""
    spec = module.tap_spec
    own_taps = taps is None
    taps = taps or FeatureTaps(module, spec.paths, spec.nhwc)
    with taps.capture():
        logits = model(x)
    feats = taps.pop()
    if own_taps:
        taps.remove()
    assert sorted(feats) == sorted(spec.paths), f"captured {sorted(feats)}: hooks were ignored"
    loss = SelfRegLoss(spec.ifd_groups, spec.scr_groups, pairing="ordered")(feats, feats[spec.final])[0]
    (loss + logits.square().mean()).backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in module.named_parameters()}


INDUCTOR = pytest.mark.skipif(
    os.environ.get("LIGHTNING_SELFREG_TEST_INDUCTOR") != "1",
    reason="inductor code generation takes 1-3 min on 2 CPU cores; set LIGHTNING_SELFREG_TEST_INDUCTOR=1 to run it "
    "(aot_eager exercises the same Dynamo hook handling)",
)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, INDUCTOR])])
def test_taps_registered_before_compile_match_eager(backend):
    dynamo.reset()
    torch.manual_seed(0)
    eager = UNet(1, 3, base_channels=4, depth=2)
    net = copy.deepcopy(eager)
    taps = FeatureTaps(net, net.tap_spec.paths, net.tap_spec.nhwc)  # hooks first, then compile
    compiled = torch.compile(net, backend=backend)
    x = torch.randn(2, 1, 32, 32)
    ref_logits, ref_loss, ref_grads = train_step(eager, eager, x)
    try:
        logits, loss, grads = train_step(compiled, net, x, taps)
    except dynamo.exc.BackendCompilerFailed as err:
        pytest.skip(f"torch.compile backend {backend!r} cannot compile on this machine: {err}")
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # outside capture() nothing is kept, and the compiled net still gives the same logits
        net.eval()
        eager.eval()
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    assert taps.pop() == {}


def test_hooks_added_after_compile_work_with_hook_guards():
    dynamo.reset()
    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=4, depth=2)
    x = torch.randn(2, 1, 32, 32)
    with dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled = torch.compile(net, backend="aot_eager")
        compiled(x)  # compiled without hooks
        taps = FeatureTaps(net, net.tap_spec.paths)
        with taps.capture():
            compiled(x)  # the hook guard fails: recompiled with the hooks
        assert sorted(taps.pop()) == sorted(net.tap_spec.paths)


def test_taps_turn_the_hook_guards_on_for_graphs_compiled_afterwards():
    """The documented process-wide effect (FeatureTaps' docstring): once taps exist, a network compiled without
    hooks is recompiled when another instance of its class gets taps (without it, the cached graph is reused and
    the taps capture nothing)."""
    dynamo.reset()
    x = torch.randn(2, 1, 32, 32)
    with dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default, as in a fresh process
        first = UNet(1, 3, base_channels=4, depth=2)
        FeatureTaps(first, first.tap_spec.paths).remove()  # taps once: the guards are on from now on
        assert dynamo.config.skip_nnmodule_hook_guards is False
        torch.compile(first, backend="aot_eager")(x)  # compiled without hooks
        second = UNet(1, 3, base_channels=4, depth=2)
        taps = FeatureTaps(second, second.tap_spec.paths)
        with taps.capture():
            torch.compile(second, backend="aot_eager")(x)
        assert sorted(taps.pop()) == sorted(second.tap_spec.paths)
    dynamo.reset()
