"""Each layer learns a task that needs memory over hundreds of steps (slow: a few seconds each).

Task (`tasks.memory.delayed_signal`): reproduce a smooth unit-variance input 200 steps later, on
sequences of length 512; scored by mean squared error on held-out sequences after step 200.
Predicting zero scores 1.0; the model is linear encoder -> layer -> linear decoder, so the delay
must be held in the SSM state. Denormal floats are flushed, as the training tools do: decaying
states otherwise make the CPU up to 6x slower without changing the result.
"""
import pytest
import torch
from torch import nn

from diagssm import layers
from diagssm.optim import param_groups
from diagssm.tasks.memory import delayed_signal

L, DELAY, H = 512, 200, 16


class DelayModel(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.encoder, self.ssm, self.decoder = nn.Linear(1, H), layer, nn.Linear(H, 1)

    def forward(self, u):
        return self.decoder(self.ssm(self.encoder(u)))


def train_delay(layer, steps=600, lr=3e-3):
    model = DelayModel(layer)
    opt = torch.optim.AdamW(param_groups(model, lr=lr, ssm_lr=lr, verbose=False))
    train_gen, test_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(steps):
        u, y = delayed_signal(32, L, DELAY, generator=train_gen)
        loss = ((model(u) - y)[:, DELAY:] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    u, y = delayed_signal(256, L, DELAY, generator=test_gen)
    with torch.no_grad():
        return ((model(u) - y)[:, DELAY:] ** 2).mean().item()


# layer, held-out MSE it must reach in 600 steps (measured on 2 CPU cores in brackets)
LAYERS = {
    "S4D": (lambda: layers.S4D(H, 64), 0.06),  # (0.025)
    # DSS at its default size (d_state 128 = the DSS paper's N = 64 complex modes): 0.021 (seed 0), 0.018 (1).
    # At d_state 64 (32 modes, as here before session 26) it took 0.039 with the earlier draw of its
    # step sizes (Re, Im apart) and 0.060-0.062 with the DSS code's (equal start), just past 0.06.
    "DSS": (lambda: layers.DSS(H), 0.06),
    "S5": (lambda: layers.S5(H, 256), 0.06),  # (0.048) one shared state: P = 256 for 16 channels
    "S4": (lambda: layers.S4(H, 64), 0.12),  # (0.085) Lambda and P tied across channels
}


@pytest.fixture(autouse=True)
def flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)  # torch's default


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERS)
def test_layer_learns_delay_of_200_steps(name):
    make, threshold = LAYERS[name]
    torch.manual_seed(0)
    mse = train_delay(make())
    assert mse < threshold, f"{name}: held-out MSE {mse:.4f} >= {threshold}"
