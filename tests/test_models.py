"""Models: residual block, sequence model, pooling, heads, padding, stepping, rate, dropout, contracts."""
import math

import pytest
import torch
from torch.nn import functional as F

from diagssm.layers import DSS, S4, S4D, S5
from diagssm.models import LAYER_NAMES, ResidualBlock, SequenceModel, TiedDropout, make_layer, pool
from diagssm.optim import param_groups
from helpers import assert_close, randn

F64 = torch.float64
H, N = 4, 8
SMALL = {"s4d": {"d_state": N}, "dss": {"d_state": N}, "s5": {"d_state": N}, "s4": {"d_state": N}}
COMBOS = [("classification", "mean"), ("classification", "last"), ("classification", "none"),
          ("regression", "mean"), ("regression", "last"), ("regression", "none"),
          ("per_step", "none"), ("retrieval", "mean"), ("retrieval", "last")]


def model(seed=0, layer="s4d", bidirectional=False, **kw):
    torch.manual_seed(seed)
    lk = dict(SMALL[layer], bidirectional=bidirectional)
    kw = {"d_input": 3, "d_output": 5, "d_model": H, "n_layers": 2, **kw}
    return SequenceModel(layer=layer, layer_kwargs=lk, **kw).double()


def tokens(B, L, vocab=3, seed=0):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def padded(x, lengths, seed=9):
    """x with large random garbage on its padded steps."""
    garbage = 1e3 * randn(*x.shape, seed=seed)
    real = (torch.arange(x.shape[1]) < lengths[:, None])[..., None]  # (B, L, 1)
    return torch.where(real, x, garbage)


def test_make_layer():
    assert [type(make_layer(n, H, **SMALL[n])) for n in LAYER_NAMES] == [S4D, DSS, S5, S4]
    assert make_layer("s5", H).d_state == 64  # S5's default d_state here
    assert make_layer("s4d", H, d_state=16, init="lin").d_state == 16


@pytest.mark.parametrize("encoder", ["embedding", "linear"])
@pytest.mark.parametrize("head,pooling", COMBOS)
def test_shapes(encoder, head, pooling):
    m = model(encoder=encoder, head=head, pooling=pooling)
    B, L = 2, 6
    x = tokens(B, L) if encoder == "embedding" else randn(B, L, 3)
    lengths = torch.tensor([6, 3])
    if head == "retrieval":
        x2 = tokens(B, 4, seed=1) if encoder == "embedding" else randn(B, 4, 3, seed=1)
        assert m.forward_pair(x, x2, lengths, None).shape == (B, 5)
        return
    want = (B, L, 5) if pooling == "none" else (B, 5)
    assert m(x).shape == want and m(x, lengths).shape == want


def test_pool_mean_and_last_honour_lengths():
    h, lengths = randn(3, 7, H), torch.tensor([7, 1, 4])
    mean, last = pool(h, lengths, "mean"), pool(h, lengths, "last")
    for b, n in enumerate(lengths.tolist()):
        assert_close(mean[b], h[b, :n].mean(0))
        assert_close(last[b], h[b, n - 1])
    assert_close(pool(h, None, "mean"), h.mean(1))
    assert_close(pool(h, None, "last"), h[:, -1])


@pytest.mark.parametrize("lengths,pooling,message", [
    (None, "max", r"pooling='max' is not allowed; allowed"),
    (torch.tensor([4, 4, 4]), "max", r"pooling='max' is not allowed; allowed"),
    (torch.tensor([9, 1, 1]), "mean", r"lengths=\[9, 1, 1\] out of range"),
    (torch.tensor([0, 1, 1]), "mean", r"lengths=\[0, 1, 1\] out of range"),
    (torch.tensor([0, 1, 1]), "last", r"lengths=\[0, 1, 1\] out of range"),
])
def test_pool_checks_its_arguments(lengths, pooling, message):
    """`pool` is public: it had pooled an unknown name as "last" or "mean", divided by lengths past L
    and given NaN or step -1 for a length of 0."""
    with pytest.raises(ValueError, match=message):
        pool(randn(3, 7, H), lengths, pooling)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("layer", ["s4d", "s5"])
def test_model_pooling_equals_unpadded(pooling, layer):
    """A padded batch's pooled output equals each sequence's own output without padding."""
    m = model(layer=layer, pooling=pooling).eval()
    lengths = torch.tensor([6, 2, 4])
    x = padded(randn(3, 6, 3), lengths)
    out = m(x, lengths)  # (B, d_output)
    for b, n in enumerate(lengths.tolist()):
        assert_close(out[b], m(x[b:b + 1, :n])[0], scale=100)


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_padding_does_not_leak_bidirectional(layer, prenorm):
    m = model(layer=layer, bidirectional=True, prenorm=prenorm, pooling="none").eval()
    randomise_norms(m)  # LayerNorm's bias maps a zeroed step to a nonzero one
    lengths = torch.tensor([7, 3])
    x = padded(randn(2, 7, 3), lengths)
    y = m(x, lengths)  # (B, L, d_output)
    assert not torch.allclose(m(x)[1, :3], y[1, :3])  # without lengths the garbage does leak
    for b, n in enumerate(lengths.tolist()):
        assert_close(y[b, :n], m(x[b:b + 1, :n])[0], scale=100)


def test_padding_does_not_leak_batchnorm_train_stats():
    """Training-mode BatchNorm takes its batch statistics over the real steps only."""
    m = model(layer="s4d", bidirectional=True, norm="batch", pooling="none").train()
    lengths = torch.tensor([5])
    x = padded(randn(1, 9, 3), lengths)
    y = m(x, lengths)[0, :5]
    stats = [b.norm.running_mean.clone() for b in m.blocks]
    m2 = model(layer="s4d", bidirectional=True, norm="batch", pooling="none").train()
    assert_close(y, m2(x[:, :5])[0], scale=100)
    for b, s in zip(m2.blocks, stats):
        assert_close(b.norm.running_mean, s, scale=100)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_padding_gets_no_gradient(norm):
    """Training mode, bidirectional, dropout: the loss does not depend on the padded inputs."""
    m = model(layer="s5", bidirectional=True, norm=norm, dropout=0.2, pooling="mean").train()
    lengths = torch.tensor([6, 2, 4])
    x = padded(randn(3, 6, 3), lengths).requires_grad_()
    m(x, lengths).square().sum().backward()
    real = torch.arange(6) < lengths[:, None]  # (B, L)
    assert torch.equal(x.grad[~real], torch.zeros_like(x.grad[~real]))
    assert (x.grad[real].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_padding_does_not_change_causal_outputs(layer):
    m = model(layer=layer, pooling="none").eval()
    lengths = torch.tensor([7, 3])
    x = padded(randn(2, 7, 3), lengths)
    y, y_nolen = m(x, lengths), m(x)
    for b, n in enumerate(lengths.tolist()):
        assert_close(y[b, :n], y_nolen[b, :n], scale=100)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomise_norms(m, seed=5):
    """Random affine maps and running statistics (at initialisation a norm maps 0 to 0)."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.copy_(torch.randn(H, generator=g, dtype=F64))
            mod.running_var.copy_(torch.rand(H, generator=g, dtype=F64) + 0.5)
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
            with torch.no_grad():
                mod.weight.copy_(torch.randn(H, generator=g, dtype=F64))
                mod.bias.copy_(torch.randn(H, generator=g, dtype=F64))


def rollout(m, x):
    state, outs = m.default_state(x.shape[0]), []
    for x_t in x.unbind(1):
        out_t, state = m.step(x_t, state)
        outs.append(out_t)
    return torch.stack(outs, 1)  # (B, L, d_output)


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_step_equals_forward(layer, prenorm, norm):
    m = model(layer=layer, prenorm=prenorm, norm=norm, pooling="none", dropout=0.3).eval()
    randomise_norms(m)
    x = randn(2, 9, 3)
    assert_close(rollout(m, x), m(x), scale=100)


@pytest.mark.parametrize("activation", ["gelu", "glu", "half_glu1", "half_glu2"])
def test_step_equals_forward_tokens_activations(activation):
    m = model(encoder="embedding", activation=activation, head="per_step", pooling="none").eval()
    x = tokens(2, 9)
    assert_close(rollout(m, x), m(x), scale=100)


def test_step_in_train_mode_uses_running_stats():
    """Stepping is inference: in train mode it still equals the eval-mode forward and changes no statistics."""
    m = model(norm="batch", pooling="none", dropout=0.5)
    randomise_norms(m)
    x = randn(2, 5, 3)
    m.train()
    y_step = rollout(m, x)
    m.eval()
    assert_close(y_step, m(x), scale=100)
    assert int(m.blocks[0].norm.num_batches_tracked) == 0


def rollout_kw(m, x, **kw):
    state, outs = m.default_state(x.shape[0]), []
    for x_t in x.unbind(1):
        out_t, state = m.step(x_t, state, **kw)
        outs.append(out_t)
    return torch.stack(outs, 1)  # (B, L, d_output)


def test_dss_softmax_model_steps_with_L():
    """DSS-softmax's system depends on the length: stepped with L = the sequence's length it equals
    forward; without L the layer says what to pass."""
    torch.manual_seed(0)
    lk = {"d_state": N, "variant": "softmax"}
    m = SequenceModel(3, 5, d_model=H, n_layers=2, layer="dss", layer_kwargs=lk, pooling="none").double().eval()
    randomise_norms(m)
    x = randn(2, 9, 3)
    assert_close(rollout_kw(m, x, L=9), m(x), scale=100)
    assert_close(rollout_kw(m, x, L=9, rate=2.0), m(x, rate=2.0), scale=100)
    assert not torch.allclose(rollout_kw(m, x, L=20), m(x))  # another length is another system
    with pytest.raises(ValueError, match="pass L="):
        m.step(x[:, 0], m.default_state(2))


def softmax_model(**kw):
    torch.manual_seed(0)
    lk = {"d_state": N, "variant": "softmax"}
    m = SequenceModel(3, 5, d_model=H, n_layers=2, layer="dss", layer_kwargs=lk, **kw).double().eval()
    randomise_norms(m)
    return m


def test_dss_softmax_model_with_L_does_not_depend_on_the_batch_padding():
    """With variable lengths the padded batch's length had been DSS-softmax's L, so a sequence's
    outputs changed with its batch neighbours; the model's L fixes the system (an error without it)."""
    m = softmax_model(L=12, pooling="mean")
    x = randn(2, 9, 3, seed=4)
    alone = m(x[:1, :6], torch.tensor([6]))  # (1, d_output)
    padded_by_a_neighbour = m(x, torch.tensor([6, 9]))[:1]
    assert_close(padded_by_a_neighbour, alone, scale=100)
    assert_close(m(x[:1, :6]), alone, scale=100)  # lengths or not: the system of L = 12
    m.L = None
    assert not torch.allclose(m(x[:1, :6]), m(x[:1]))  # each call's own length: another system
    with pytest.raises(ValueError, match=r"padded sequences \(lengths below the batch's length\) give "
                                         r"SequenceModel\(L=...\)"):
        m(x, torch.tensor([6, 9]))
    # a fixed-length task's batch (every length the batch's: no padding) needs no L; it had raised
    assert_close(m(x, torch.tensor([9, 9])), m(x), scale=100)


def test_dss_softmax_model_L_counts_steps_at_the_rate():
    """At rate r the model's L spans ceil(L / r) steps: the same time as L steps at rate 1."""
    m = softmax_model(L=12, pooling="none")
    x = randn(2, 6, 3, seed=7)
    assert_close(m(x, rate=2.0), m(x, rate=2.0, L=6), scale=100)
    assert_close(m(x[:, :5], rate=2.5), m(x[:, :5], rate=2.5, L=5), scale=100)
    assert not torch.allclose(m(x, rate=2.0), m(x, rate=2.0, L=12))
    longer = randn(2, 9, 3, seed=8)  # an input not resampled, longer than ceil(12 / 2): its own length
    assert_close(m(longer, rate=2.0), m(longer, rate=2.0, L=9), scale=100)
    assert_close(rollout_kw(m, x, rate=2.0), m(x, rate=2.0), scale=100)  # step's default too
    with pytest.raises(ValueError, match=r"L=0 must be None or an int >= 1"):
        softmax_model(L=0)


def test_dss_softmax_model_steps_with_its_L():
    m = softmax_model(L=12, pooling="none")
    x = randn(2, 9, 3, seed=5)
    assert_close(rollout_kw(m, x), m(x), scale=100)  # step's L defaults to the model's
    assert_close(rollout_kw(m, x, L=12), m(x), scale=100)


def test_generate_with_a_dss_softmax_model_of_fixed_L():
    """`generate` steps with the model's L: the outputs over the prompt no longer depend on how many
    steps follow (L had been prompt_len + steps); past L is an error."""
    from diagssm.train.generate import generate

    m = softmax_model(L=12, pooling="none")
    x = randn(12, 3, seed=6)
    _, short, gap_short = generate(m, x, prompt_len=5, steps=2)
    _, long, gap_long = generate(m, x, prompt_len=5, steps=7)
    assert_close(long[:7], short, scale=100)
    assert max(gap_short, gap_long) < 1e-10  # the steps equal the forward of the same inputs
    with pytest.raises(ValueError, match="defined for sequences of up to L = 12 steps"):
        generate(m, x, prompt_len=5, steps=8)
    m.L = None  # a fixed-length task's model: the system of x's length
    inputs, short, gap_short = generate(m, x, prompt_len=5, steps=2)
    _, long, gap_long = generate(m, x, prompt_len=5, steps=7)
    assert_close(long[:7], short, scale=100)
    assert max(gap_short, gap_long) < 1e-10
    assert_close(short, m(inputs[None], L=12)[0], scale=100)
    assert not torch.allclose(short, m(inputs[None])[0])  # the system of 7 steps is another
    generate(m, x, prompt_len=5, steps=20)  # past x: the system of the length generated


# --- sampling rate -------------------------------------------------------------------------------

def spy_on_steps(m):
    """Record the keyword arguments of every SSM layer's step."""
    calls = []
    for block in m.blocks:
        step = block.layer.step
        block.layer.step = lambda *a, _step=step, **kw: calls.append(kw) or _step(*a, **kw)
    return calls


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_rate_reaches_every_layer(layer):
    """forward(rate=r) and step(rate=r) hand r to each layer, and equal the model whose every dt is
    multiplied by r (log_dt + log r) at rate 1."""
    m = model(layer=layer, pooling="none").eval()
    seen = []
    for block in m.blocks:
        block.layer.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["rate"]), with_kwargs=True)
    x = randn(2, 7, 3)
    y = m(x, rate=2.5)
    assert seen == [2.5, 2.5]
    calls = spy_on_steps(m)
    m.step(x[:, 0], m.default_state(2), rate=2.5)
    assert [kw["rate"] for kw in calls] == [2.5, 2.5]
    scaled = model(layer=layer, pooling="none").eval()
    with torch.no_grad():
        for block in scaled.blocks:
            block.layer.log_dt.add_(math.log(2.5))
    assert_close(y, scaled(x))
    assert_close(rollout_kw(m, x, rate=2.5), scaled(x), scale=100)


def smooth(L, stride=1):
    """Three slow waves (periods 170 to 900 steps at the full rate), sampled at steps 1, 1 + stride, ..."""
    k = torch.arange(stride - 1, L, stride, dtype=F64)  # (L / stride,)
    w = 2 * math.pi * k  # (L / stride,)
    waves = [torch.sin(w / 400), torch.cos(w / 170 + 1), torch.sin(w / 900) ** 2]
    return torch.stack(waves, -1)[None]  # (1, L / stride, 3)


# measured relative errors at rate 2 (rate 1): s4d 0.010 (0.66), dss 0.011 (0.71), s5 0.0013 (0.14), s4 0.0049 (0.39)
@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_rate_two_reads_half_rate_signal(layer):
    """Zero-shot rate change (S5 paper, Sec. 6.3): on a smooth signal sampled at half the rate, the
    model at rate = 2 gives what it gives at rate = 1 on the full-rate signal at the same times, to
    first order in the step (< 2% relative); at rate = 1 it is off by > 10%."""
    torch.manual_seed(0)
    m = SequenceModel(3, 2, d_model=8, n_layers=2, layer=layer, layer_kwargs={"d_state": 16}, pooling="none",
                      head="regression").double().eval()
    with torch.no_grad():
        y_full = m(smooth(2000))[:, 1::2]  # (1, 1000, 2) at full-rate steps 1, 3, 5, ...
        y_rate2, y_rate1 = m(smooth(2000, 2), rate=2.0), m(smooth(2000, 2))
    assert rel(y_rate2, y_full) < 0.02
    assert rel(y_rate1, y_full) > 0.1


@pytest.mark.parametrize("activation", ["gelu", "glu", "half_glu1", "half_glu2"])
def test_activation_formulas(activation):
    torch.manual_seed(0)
    block = ResidualBlock(H, layer_kwargs=SMALL["s4d"], activation=activation).double().eval()
    y, W, b = randn(2, 5, H), block.out.weight, block.out.bias
    z = F.gelu(y)
    want = {"gelu": lambda: z @ W.T + b,
            "glu": lambda: (z @ W[:H].T + b[:H]) * torch.sigmoid(z @ W[H:].T + b[H:]),
            "half_glu1": lambda: z * torch.sigmoid(z @ W.T + b),
            "half_glu2": lambda: y * torch.sigmoid(z @ W.T + b)}[activation]()
    assert_close(block.output(y), want)


def test_dropout_mask_tied_over_length():
    torch.manual_seed(0)
    drop = TiedDropout(0.5).train()
    x = randn(8, 30, 16) + 10  # no zeros of its own
    out = drop(x)
    zero = out == 0  # (B, L, H)
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # the same pattern at every step
    assert 0.35 < zero[:, 0].double().mean() < 0.65
    assert_close(out[~zero], (x * 2)[~zero])  # kept entries scaled by 1/(1-p)
    assert torch.equal(drop.eval()(x), x)


def test_retrieval_head_order_matters():
    m = model(head="retrieval", pooling="mean", encoder="embedding").eval()
    x1, x2 = tokens(2, 6, seed=1), tokens(2, 5, seed=2)
    l1, l2 = torch.tensor([6, 4]), torch.tensor([5, 2])
    logits = m.forward_pair(x1, x2, l1, l2)
    o1, o2 = pool(m.encode(x1, l1), l1, "mean"), pool(m.encode(x2, l2), l2, "mean")
    assert_close(logits, m.head.mlp(torch.cat([o1, o2, o1 - o2, o1 * o2], -1)))
    assert not torch.allclose(logits, m.forward_pair(x2, x1, l2, l1))


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_param_groups(layer, capsys):
    m = model(layer=layer, norm="batch")
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(m, lr=0.01, verbose=False)}
    want_ssm = {f"{mod}.{p}" for mod, module in m.named_modules()
                for p, _ in module.named_parameters(recurse=False) if p in getattr(type(module), "ssm_params", ())}
    assert len(want_ssm) >= 2 * 3 and groups["ssm"] == want_ssm  # >= 3 SSM tensors in each of 2 blocks
    norms = {n for n, _ in m.named_parameters() if ".norm." in n or n.startswith("norm.")}
    biases = {n for n, _ in m.named_parameters() if n.endswith(".bias")}
    assert norms and groups["no_decay"] == norms | biases
    assert sum(map(len, groups.values())) == len(list(m.parameters()))


def test_state_dict_round_trip_and_seeded_determinism():
    a, b = model(seed=0, norm="batch"), model(seed=1, norm="batch")
    x = randn(2, 6, 3)
    a(x)  # update a's running statistics
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    c, d = model(seed=3, layer="s5"), model(seed=3, layer="s5")
    assert all(torch.equal(p, q) for p, q in zip(c.state_dict().values(), d.state_dict().values()))


ERRORS = [
    (lambda: make_layer("s6", H), r"layer='s6'.*allowed: \('s4d', 'dss', 's5', 's4'\)"),
    (lambda: make_layer("s4d", H, d_stat=8), r"\['d_stat'\].*allowed"),
    (lambda: model(encoder="conv"), r"encoder='conv'.*allowed"),
    (lambda: model(norm="group"), r"norm='group'.*allowed"),
    (lambda: model(activation="relu"), r"activation='relu'.*allowed"),
    (lambda: model(pooling="max"), r"pooling='max'.*allowed"),
    (lambda: model(head="seq"), r"head='seq'.*allowed"),
    (lambda: model(head="per_step", pooling="mean"), r"per_step.*pooling='none'"),
    (lambda: model(head="retrieval", pooling="none"), r"retrieval.*pooling='none'"),
    (lambda: model(dropout=1.5), r"dropout=1.5"),
    (lambda: model(n_layers=0), r"n_layers=0"),
    (lambda: SequenceModel(3, 5, layer_kwargs={"channels": 2}), r"channels=2.*allowed: 1"),
    (lambda: SequenceModel(3, 5, layer_kwargs=""), r"layer_kwargs='' must be None or a dict"),
    (lambda: SequenceModel(3, 5, layer_kwargs=[("d_state", 8)]), r"layer_kwargs=\[\('d_state', 8\)\] must be None"),
    (lambda: model(prenorm="no"), r"SequenceModel: prenorm='no' must be True or False"),
    (lambda: ResidualBlock(H, prenorm=1), r"ResidualBlock: prenorm=1 must be True or False"),
    (lambda: model(bidirectional=2), r"S4D: bidirectional=2 must be True or False"),
    (lambda: model(encoder="embedding")(randn(2, 5, 3)), r"x must be an int64 \(or int32\) tensor"),
    (lambda: model(encoder="embedding")(tokens(2, 5, vocab=4) + 3), r"tokens in.*d_input = 3"),
    (lambda: model()(tokens(2, 5)), r"x must be a torch.float64 tensor \(B, L, d_input\)"),
    (lambda: model()(randn(2, 5, 3).float()), r"x must be a torch.float64"),
    (lambda: model()(randn(2, 5, 4)), r"d_input = 3"),
    (lambda: model()(randn(2, 5, 3), torch.tensor([5, 6])), r"lengths=\[5, 6\] out of range"),
    (lambda: model()(randn(2, 5, 3), torch.tensor([5, 0])), r"lengths=\[5, 0\] out of range"),
    (lambda: model()(randn(2, 5, 3), torch.tensor([5.0, 2.0])), r"lengths must be an integer tensor"),
    (lambda: model()(randn(2, 5, 3), torch.tensor([5])), r"lengths must be .* shape \(B,\) = \(2,\)"),
    (lambda: model().step(randn(2, 3), model().default_state(2)), r"step needs pooling='none'"),
    (lambda: model(pooling="none").step(randn(2, 3), []), r"state must be a list of 2"),
    (lambda: model()(randn(2, 5, 3), rate=0), r"rate=0 is not allowed"),
    (lambda: model(pooling="none").step(randn(2, 3), model().default_state(2), rate=-1.0), r"rate=-1.0"),
    (lambda: model(head="retrieval")(randn(2, 5, 3)), r"forward_pair"),
    (lambda: model().forward_pair(randn(2, 5, 3), randn(2, 5, 3)), r"head='retrieval'"),
    (lambda: ResidualBlock(H, layer_kwargs=SMALL["s4d"]).double()(randn(2, 5, 3)), r"x must be \(B, L, H\)"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    make, match = ERRORS[i]
    with pytest.raises(ValueError, match=match):
        make()
