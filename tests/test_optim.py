"""param_groups puts every SSM parameter at ssm_lr without decay, and prints what it did."""
import torch
from torch import nn

from diagssm.layers import DSS, S4D
from diagssm.optim import param_groups


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm, self.ssm, self.out = nn.LayerNorm(4), layer, nn.Linear(4, 4)


def test_groups(capsys):
    model = nn.Sequential(Block(S4D(4, 8)), Block(DSS(4, 8)))
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, ssm_lr=0.001, weight_decay=0.1)}
    ssm = set(groups["ssm"]["param_names"])
    assert ssm == {"0.ssm.log_dt", "0.ssm.log_A_real", "0.ssm.A_imag", "0.ssm.B",
                   "1.ssm.log_dt", "1.ssm.log_Lambda_re", "1.ssm.Lambda_im", "1.ssm.W"}
    assert (groups["ssm"]["lr"], groups["ssm"]["weight_decay"]) == (0.001, 0.0)
    assert set(groups["no_decay"]["param_names"]) == {
        "0.norm.weight", "0.norm.bias", "0.out.bias", "1.norm.weight", "1.norm.bias", "1.out.bias"}
    assert set(groups["decay"]["param_names"]) == {"0.ssm.C", "0.ssm.D", "0.out.weight", "1.ssm.D", "1.out.weight"}
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (0.01, 0.1)
    n_grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters())
    printed = capsys.readouterr().out
    assert "ssm      lr=1.00e-03 weight_decay=0" in printed and "log_A_real" in printed
    torch.optim.AdamW(list(groups.values()))  # accepted by the optimiser as they are


def test_tied_weights_are_listed_once():
    """Tied input and output weights (one Parameter in two modules) had been put in the groups twice:
    AdamW then stepped that weight twice per update."""
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, S4D(8, 16), head)
    groups = param_groups(model, lr=0.01, verbose=False)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    names = [n for g in groups for n in g["param_names"]]
    assert "0.weight" in names and "2.weight" not in names
    opt = torch.optim.AdamW(groups)  # warns of a parameter in several groups when listed twice
    model(torch.randint(0, 10, (2, 5))).sum().backward()
    before = emb.weight.detach().clone()
    opt.step()
    moved = (emb.weight.detach() - before).abs().max()
    assert abs(float(moved) - 0.01) < 1e-3  # one Adam step of lr 0.01 (two steps moved it 0.02)
