"""`diagssm generate`: recurrent inference with a trained per-step model, one step at a time.

The prompt is the first `prompt_len` steps of one sequence of a split. The model reads it
through `SequenceModel.step` (O(N) state per channel, no convolution), then runs `steps` more
steps on one of three inputs:

    zeros:     silence. A delay model keeps replaying its prompt for `delay` steps: its
               output at t is the input at t - delay (the state still holds it).
    data:      the rest of the sequence; the outputs are compared with the task's targets.
    feedback:  its own previous output (needs a linear encoder and d_output == d_input).

It reports how far the step-by-step outputs are from `model(x)` on the same inputs (one
convolution over the whole sequence): the two must agree.
"""
import csv

import torch

from diagssm.tasks.base import model_input
from diagssm.train.objective import scored_steps

CONTINUATIONS = ("zeros", "data", "feedback")


def check_request(model, x, prompt_len, steps, then):
    """Errors naming the argument for requests this model or sequence cannot serve."""
    if model.pooling != "none":
        raise ValueError(f"generate needs a per-step model (pooling 'none'); this run's model has "
                         f"pooling={model.pooling!r}")
    if then not in CONTINUATIONS:
        raise ValueError(f"then={then!r}; allowed: {', '.join(CONTINUATIONS)}")
    L = x.shape[0]
    if not 1 <= prompt_len <= L:
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {L}] (the sequence's length)")
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if then == "data" and prompt_len + steps > L:
        raise ValueError(f"steps={steps}: with then='data' prompt_len + steps must be <= {L}")
    if model.length_dependent and model.L is not None and prompt_len + steps > model.L:
        raise ValueError(f"prompt_len + steps = {prompt_len + steps}: this model's DSS-softmax layers are defined "
                         f"for sequences of up to L = {model.L} steps")
    if then == "feedback" and (model.encoder_name != "linear" or model.d_output != model.d_input):
        raise ValueError("then='feedback' needs encoder 'linear' and d_output == d_input; this model has "
                         f"encoder {model.encoder_name!r}, d_input {model.d_input}, d_output {model.d_output}")


def next_input(then, x, t, out_t):
    """The input at step t (t >= prompt_len). Shapes: x (L, ...); out_t (1, d_output) -> (1, ...)"""
    if then == "data":
        return x[t:t + 1]
    if then == "zeros":
        return torch.zeros_like(x[:1])
    return out_t.to(x.dtype)


@torch.no_grad()
def generate(model, x, prompt_len, steps, then="zeros"):
    """Step `model` (eval mode) through x[:prompt_len], then `steps` more inputs (`then`). A DSS-softmax
    model's system is that of its `L`, else of x's length (or prompt_len + steps, if longer): the
    outputs do not depend on how many steps follow (it had been prompt_len + steps).

    Shapes: x (L,) int64 or (L, d_input) float -> inputs (T, ...), outputs (T, d_output),
        T = prompt_len + steps; and the max |step output - model(inputs)| over all steps
    """
    check_request(model, x, prompt_len, steps, then)
    model.eval()
    state = model.default_state(1)
    inputs, outputs, out_t = [], [], None
    # L for DSS-softmax: the model's (a variable-length task's longest sequence), else the example's
    # length (a fixed-length task's, which it was trained at), or the length generated if longer
    L = model.L or max(len(x), prompt_len + steps)
    for t in range(prompt_len + steps):
        x_t = x[t:t + 1] if t < prompt_len else next_input(then, x, t, out_t)  # (1, ...)
        out_t, state = model.step(x_t, state, L=L)  # (1, d_output)
        inputs.append(x_t)
        outputs.append(out_t)
    inputs, outputs = torch.cat(inputs), torch.cat(outputs)  # (T, ...), (T, d_output)
    full = model(inputs[None], L=L)[0]  # (T, d_output)
    return inputs, outputs, (full - outputs).abs().max().item()


def report(task, x, y, inputs, outputs, prompt_len, then, every):
    """Print every `every`-th step (input, output, and the target in 'data' mode)."""
    print(f"{'t':>6} {'input':>10} {'output':>10}" + (f" {'target':>10}" if then == "data" else ""))
    for t in range(0, len(outputs), every):
        row = f"{t:>6} {float(inputs[t].reshape(-1)[0]):>10.4f} {float(outputs[t, 0]):>10.4f}"
        if then == "data":
            row += f" {float(y[t].reshape(-1)[0]):>10.4f}"
        print(row + ("   <- prompt ends" if t == prompt_len - 1 else ""))
    if then == "data" and task.metric == "mse":
        mask = scored_steps(torch.tensor([len(outputs)]), len(outputs), task.score_start)[0]  # (T,)
        mse = ((outputs - y[:len(outputs)].reshape(outputs.shape)) ** 2)[mask].mean().item()
        print(f"mse against the targets on scored steps (t >= {task.score_start}): {mse:.4g}")


def write_csv(path, inputs, outputs):
    """One row per step: t, the input's channels, the output's channels."""
    ins = inputs.reshape(len(inputs), -1)  # (T, d_in)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["t"] + [f"input_{i}" for i in range(ins.shape[1])] +
                   [f"output_{i}" for i in range(outputs.shape[1])])
        for t in range(len(outputs)):
            w.writerow([t] + [f"{v:.6g}" for v in ins[t].tolist()] + [f"{v:.6g}" for v in outputs[t].tolist()])


def cmd_generate(args):
    from diagssm.train.commands import load_run

    if args.every < 1:
        raise ValueError(f"--every={args.every} must be >= 1")  # before the model runs, not in the report
    torch.set_flush_denormal(True)
    cfg, task, model, path, state = load_run(args.run_dir, args.checkpoint)
    dataset = task.split(args.split)
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index {args.index}: the {args.split} split has {len(dataset)} sequences")
    item = dataset[args.index]
    x, y = item[0][:int(item[2])] if len(item) == 3 else item[0], item[1]
    x = model_input(x)  # a token task's uint8 (the training batches' conversion)
    inputs, outputs, gap = generate(model, x, args.prompt_len, args.steps, args.then)
    print(f"{path} (step {state['step']}): {args.split}[{args.index}], prompt {args.prompt_len} steps, "
          f"then {args.steps} steps of {args.then}")
    report(task, x, y, inputs, outputs, args.prompt_len, args.then, args.every)
    print(f"max |step-by-step output - model(inputs)|: {gap:.3g}")
    if args.out:
        write_csv(args.out, inputs, outputs)
        print(f"saved {args.out}")
    return 0
